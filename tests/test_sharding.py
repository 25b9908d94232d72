"""Logical axis names map to mesh axes in one place; a model runs the same sharded over a mesh."""

from __future__ import annotations

import dataclasses
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import pytest
from jax.sharding import PartitionSpec as P

from jaxllm.config import ModelConfig, RopeScaling
from jaxllm.models.registry import build_model, param_shapes
from jaxllm.sharding import ShardingRules, make_mesh, param_shardings

LLAMA3_8B = ModelConfig(
    model_type="llama",
    vocab_size=128256,
    hidden_size=4096,
    intermediate_size=14336,
    num_layers=32,
    num_heads=32,
    num_kv_heads=8,
    head_dim=128,
    rope_theta=500000.0,
    rope_scaling=RopeScaling("llama3", 8.0, 1.0, 4.0, 8192),
    max_position_embeddings=131072,
)


def _flat(tree, is_leaf=None):
    flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)[0]
    key = lambda k: str(getattr(k, "key", getattr(k, "name", k)))  # dict keys, QuantizedWeight fields
    return {"/".join(key(k) for k in path): leaf for path, leaf in flat}


def _shapes(scan_layers: bool) -> dict:
    boxed = param_shapes(build_model(LLAMA3_8B, scan_layers=scan_layers))["params"]
    return {k: v.value.shape for k, v in _flat(boxed, is_leaf=lambda x: hasattr(x, "names")).items()}


def test_full_size_shapes_without_allocating():
    flat = _shapes(scan_layers=True)
    assert flat["embed"] == (128256, 4096)
    assert flat["layers/attn/qkv"] == (32, 4096, 8, 6, 128)  # 4 query heads + k + v per kv head
    assert flat["layers/attn/o"] == (32, 32, 128, 4096)
    assert flat["layers/mlp/gate_up"] == (32, 4096, 14336, 2)  # gate and up of each MLP unit side by side
    total = sum(math.prod(s) for s in flat.values())
    assert 8.0e9 < total < 8.1e9  # Llama-3-8B has 8.03B parameters


def test_unrolled_layout_holds_the_same_params_per_layer():
    stacked, unrolled = _shapes(scan_layers=True), _shapes(scan_layers=False)
    assert "layers/attn/qkv" not in unrolled and "layers_32/attn/qkv" not in unrolled
    for i in (0, 31):
        assert unrolled[f"layers_{i}/attn/qkv"] == stacked["layers/attn/qkv"][1:]
        assert unrolled[f"layers_{i}/mlp/down"] == stacked["layers/mlp/down"][1:]
    assert sum(map(math.prod, unrolled.values())) == sum(map(math.prod, stacked.values()))


def test_rules_map_logical_axes_and_refuse_collisions():
    rules = ShardingRules()
    assert rules.spec(("layers", "embed", "kv_heads", None, "head_dim")) == P(None, None, "model", None, None)
    assert rules.spec(("batch", "vocab")) == P("data", "model")
    with pytest.raises(ValueError, match="one mesh axis"):
        rules.spec(("q_heads", "mlp"))


def test_param_shardings_follow_the_logical_names():
    mesh = make_mesh(1, 1)

    def specs(scan_layers):
        shapes = param_shapes(build_model(LLAMA3_8B, scan_layers=scan_layers))
        return _flat(jax.tree.map(lambda s: s.spec, param_shardings(shapes, mesh)))

    stacked, unrolled = specs(True), specs(False)
    assert stacked["params/layers/attn/qkv"] == P(None, None, "model", None, None)
    assert stacked["params/layers/mlp/gate_up"] == P(None, None, "model", None)
    assert stacked["params/embed"] == P("model", None)
    assert unrolled["params/layers_7/attn/qkv"] == P(None, "model", None, None)
    assert unrolled["params/layers_7/mlp/gate_up"] == P(None, "model", None)


def test_quantized_params_follow_the_same_description():
    from jaxllm.loading.quant_plan import isq_plan
    from jaxllm.models.registry import describe_params
    from jaxllm.quant.isq import parse_scheme

    plan = isq_plan(parse_scheme("int4"), describe_params(LLAMA3_8B), LLAMA3_8B)
    shapes = param_shapes(build_model(LLAMA3_8B, quant=plan))
    flat = _flat(shapes["params"], is_leaf=lambda x: hasattr(x, "names"))
    assert flat["layers/attn/qkv/q"].value.shape == (32, 8 * 6 * 128, 4096 // 2)  # [L, N, K/2] nibbles
    assert flat["layers/attn/qkv/scale"].value.shape == (32, 8 * 6 * 128, 4096 // 32)
    assert flat["layers/attn/o/q"].names == ("layers", "embed", "q_heads")
    specs = _flat(jax.tree.map(lambda s: s.spec, param_shardings(shapes, make_mesh(1, 1))))
    assert specs["params/layers/attn/qkv/q"] == P(None, "model", None)  # N is kv-head major
    assert specs["params/layers/attn/o/offset"] == P(None, None, "model")  # K is q-head major
    nbytes = sum(math.prod(v.value.shape) * v.value.dtype.itemsize for v in flat.values())
    assert nbytes < 0.35 * 8.03e9 * 4  # the float embedding and LM head stay; the rest is 4.5 bits a weight


@pytest.mark.slow
def test_tiny_model_gives_the_same_logits_sharded_over_8_cpu_devices(tiny_models, tmp_path):
    folder, _ = tiny_models["llama"]
    script = textwrap.dedent(f"""
        import jax, jax.numpy as jnp, numpy as np
        from jaxllm.loading.load import Parallelism, load_model
        from jaxllm.models.registry import param_shapes
        from jaxllm.sharding import make_mesh, param_shardings
        assert len(jax.devices()) == 8
        one = Parallelism(tensor_parallel=1)  # loaded onto one device, sharded by hand below
        m = load_model({str(folder)!r}, progress=False, parallel=one)
        tokens = jnp.asarray([[1, 5, 9, 200, 17, 3, 44, 8]] * 4)
        pos = jnp.broadcast_to(jnp.arange(8), (4, 8))
        run = lambda p: m.model.apply(p, tokens, pos, None, None, jnp.zeros((4,), jnp.int32))[0]
        ref = np.asarray(jax.jit(run)(m.params))
        mesh = make_mesh(data=4, model=2)
        sharded = jax.device_put(m.params, param_shardings(param_shapes(m.model), mesh))
        qkv = sharded["params"]["layers"]["attn"]["qkv"]
        assert len(qkv.sharding.device_set) == 8 and qkv.addressable_shards[0].data.shape[2] == 1
        out = np.asarray(jax.jit(run)(sharded))
        np.testing.assert_allclose(out, ref, atol=1e-5)
        # The research forward (jaxllm.load(...).forward) and its gradient, on the sharded params, and with an adapter.
        np.testing.assert_allclose(np.asarray(jax.jit(m.forward)(sharded, tokens)), ref, atol=1e-5)
        from jaxllm import lora
        ad = lora.init(m.config, lora.LoraConfig(rank=2, targets=("q_proj", "down_proj")))
        ad.weights = jax.tree.map(lambda w: w + 0.1, ad.weights)
        loss = lambda p, a: jnp.mean(m.forward(p, tokens, adapter=a) ** 2)
        grad = jax.jit(jax.grad(loss, argnums=(0, 1)))
        for want, got in zip(jax.tree.leaves(grad(m.params, ad)), jax.tree.leaves(grad(sharded, ad)), strict=True):
            np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)
        u = load_model({str(folder)!r}, progress=False, scan_layers=False, parallel=one)  # per-layer params, unrolled
        u_sharded = jax.device_put(u.params, param_shardings(param_shapes(u.model), mesh))
        assert len(u_sharded["params"]["layers_1"]["mlp"]["down"].sharding.device_set) == 8
        u_run = lambda p: u.model.apply(p, tokens, pos, None, None, jnp.zeros((4,), jnp.int32))[0]
        np.testing.assert_allclose(np.asarray(jax.jit(u_run)(u_sharded)), ref, atol=1e-5)
        # A decode step over the paged cache (on the CPU: the native attention kernel) sharded the same way.
        from jaxllm.engine.kv_cache import KVCache
        from jaxllm.models.registry import forward
        tables = jnp.arange(16, dtype=jnp.int32).reshape(4, 4)
        def decode(p):
            _, cache = forward(m.model, p, tokens[:, :6], pos[:, :6], KVCache.zeros(m.config, 16, 4), tables,
                               jnp.zeros((4,), jnp.int32), 0)
            one = jnp.full((4, 1), 6)
            return forward(m.model, p, tokens[:, 6:7], one, cache, tables, jnp.full((4,), 6, jnp.int32), 16)[0]
        assert "jaxllm_ragged_paged" in jax.jit(decode).lower(sharded).as_text()
        np.testing.assert_allclose(np.asarray(jax.jit(decode)(sharded)), np.asarray(jax.jit(decode)(m.params)),
                                   atol=1e-5)
        from jaxllm.loading.load import LoadOptions
        for quant in ("int8", "fp8"):  # quantized weights sharded the same way (qmatmul: the native kernel)
            qm = load_model({str(folder)!r}, progress=False, options=LoadOptions(quant=quant), parallel=one)
            q_run = lambda p: qm.model.apply(p, tokens, pos, None, None, jnp.zeros((4,), jnp.int32))[0]
            q_sharded = jax.device_put(qm.params, param_shardings(param_shapes(qm.model), mesh))
            assert len(q_sharded["params"]["layers"]["attn"]["qkv"].q.sharding.device_set) == 8
            np.testing.assert_allclose(np.asarray(jax.jit(q_run)(q_sharded)), np.asarray(jax.jit(q_run)(qm.params)),
                                       atol=1e-5)
        print("SHARDED-OK")
    """)
    env = {
        **os.environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
        "JAX_PLATFORMS": "cpu",
        "PYTHONPATH": str(Path(__file__).resolve().parent.parent),
    }
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert "SHARDED-OK" in proc.stdout, proc.stderr[-3000:]


SMOL_LIKE = dataclasses.replace(LLAMA3_8B, num_heads=9, num_kv_heads=3, head_dim=64, hidden_size=576)


def test_a_size_that_does_not_split_the_heads_or_needs_more_devices_is_refused():
    from jaxllm.errors import PlacementError
    from jaxllm.sharding import choose_placement

    with pytest.raises(PlacementError, match="does not split the model's 9 query heads and 3 KV heads"):
        choose_placement(SMOL_LIKE, tensor_parallel=2)
    with pytest.raises(PlacementError, match="needs 3 devices, but 1 are available"):
        choose_placement(SMOL_LIKE, tensor_parallel=3, devices=jax.devices()[:1])
    with pytest.raises(PlacementError, match="tensor parallelism 3 x data parallelism 3 needs 9 devices, but 8"):
        choose_placement(SMOL_LIKE, tensor_parallel=3, data_parallel=3, devices=jax.devices() * 8)
    with pytest.raises(PlacementError, match="must be at least 1"):
        choose_placement(SMOL_LIKE, data_parallel=0)
    assert choose_placement(SMOL_LIKE, tensor_parallel=None, devices=jax.devices()[:1]) is None  # one device


def test_fewer_kv_heads_than_devices_store_each_kv_head_once_per_device_of_its_group():
    import numpy as np

    from jaxllm.models.llama_weights import qkv_rows, qkv_source_rows
    from jaxllm.sharding import Placement, shard_config

    cfg = dataclasses.replace(LLAMA3_8B, num_heads=8, num_kv_heads=2, head_dim=4, hidden_size=32)
    four = Placement(make_mesh(1, 1))  # shard_config reads only the tensor-parallel size
    object.__setattr__(four, "mesh", type("M", (), {"shape": {"model": 4, "data": 1}})())
    copied = shard_config(cfg, four)
    assert (copied.num_kv_heads, copied.source_kv_heads, copied.num_groups) == (4, 2, 2)
    rows = qkv_rows(copied).reshape(4, 2 + 2, 4)  # per kv copy: 2 query heads, its k, its v (head_dim 4)
    q_head = lambda r: r[0] // 4
    assert [q_head(rows[j, 0]) for j in range(4)] == [0, 2, 4, 6]  # query heads keep their order
    k_src = [(rows[j, 2][0] - 8 * 4) // 4 for j in range(4)]
    assert k_src == [0, 0, 1, 1]  # copies 0, 1 of kv head 0, then of kv head 1
    assert qkv_source_rows(copied) == (8 + 2 * 2) * 4 and rows.max() < qkv_source_rows(copied)
    np.testing.assert_array_equal(qkv_rows(shard_config(cfg, None)), qkv_rows(cfg))


PARALLEL_SCRIPT = r"""
import sys
import jax, numpy as np
from jax.sharding import PartitionSpec as P
from flax import linen as nn
from jaxllm import LLM, SamplingParams
from jaxllm.models.registry import param_shapes
from jaxllm.sharding import device_bytes

assert len(jax.devices()) == 8
params = SamplingParams(temperature=0, max_tokens=12, min_tokens=12, logprobs=3)


def outputs(llm, prompts):
    outs = [o.outputs[0] for o in llm.generate(prompts, params, use_tqdm=False)]
    return [o.token_ids for o in outs], [[(t.logprob, [lp for _, lp in t.top]) for t in o.logprobs] for o in outs]


def same_run(a, b, prompts):
    (ids_a, lp_a), (ids_b, lp_b) = outputs(a, prompts), outputs(b, prompts)
    assert ids_a == ids_b, (ids_a, ids_b)
    flat = lambda lps: [x for seq in lps for chosen, top in seq for x in (chosen, *top)]
    diff = max(abs(x - y) for x, y in zip(flat(lp_a), flat(lp_b)))
    assert diff <= 1e-4, diff


def check_shardings(llm):
    # every param array is split as its logical axes say (where the size divides), and the matmuls are split
    boxed = param_shapes(llm.loaded.model)["params"]
    placement = llm.loaded.placement
    flat_boxed = jax.tree_util.tree_flatten_with_path(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))[0]
    flat = dict(jax.tree_util.tree_flatten_with_path(llm.loaded.params["params"])[0])
    split = set()
    for path, box in flat_boxed:
        array = flat[path]
        want = [placement.rules.axis(n) for n in box.names]
        got = tuple(array.sharding.spec) + (None,) * (array.ndim - len(array.sharding.spec))
        for w, g, d in zip(want, got, array.shape):
            assert g in (w, None), (path, want, got)
            quantized_part = any(f".{f}" in jax.tree_util.keystr(path) for f in ("q", "scale", "offset"))
            assert g == w or d % placement.axis_size(w) or quantized_part, (path, want, got)  # (K may stay whole)
        if "model" in got:
            split.add(jax.tree_util.keystr(path))
    return split


def per_device_fraction(llm):
    per = device_bytes(llm.loaded.params)
    assert len(per) == llm.loaded.placement.tensor_parallel
    return max(per.values()) / llm.weight_bytes


def gathered_logits(llm, params):
    # the all-gathers of [rows, vocab] arrays in the compiled decode step that serves `params`
    import re
    from jaxllm.sharding import placed

    seen = {}
    llm.engine.on_step = lambda inp: inp.decode is not None and seen.setdefault("decode", inp.decode)
    llm.generate(["hello there the"], params, use_tqdm=False)
    llm.engine.on_step = None
    r = llm.runner
    with placed(r.placement):
        hlo = r._decode.lower(r.params, r.cache, r.state, seen["decode"], r.stop_mask).compile().as_text()
    wide = re.compile(rf"\[\d+,{llm.config.vocab_size}[\],]")
    return [line for line in hlo.splitlines() if " all-gather(" in line and wide.search(line.split("=")[1])]


def check_data_parallel(one, llm, prompts):
    # the same outputs, with rows on both replicas, each replica's pages and slots on its own devices
    placement = llm.loaded.placement
    assert placement.data_parallel == 2
    replicas = set()
    llm.engine.on_step = lambda inp: inp.decode is not None and replicas.update(
        i * 2 // inp.decode.rows for i in np.flatnonzero(inp.decode.active))
    same_run(one, llm, prompts + prompts[:1])
    assert replicas == {0, 1}, replicas
    assert tuple(llm.runner.cache.k.sharding.spec)[1:4] == ("data", None, "model")
    assert tuple(llm.runner.state.counts.sharding.spec)[0] == "data"
    cache = device_bytes(llm.runner.cache)  # each device: its replica's pages, its KV heads
    total = llm.runner.cache.k.nbytes + llm.runner.cache.v.nbytes
    assert len(cache) == placement.mesh.size and max(cache.values()) * placement.mesh.size == total
    weights = device_bytes(llm.loaded.params)  # replicated over the replicas, split over the model axis
    share, tp = max(weights.values()) / llm.weight_bytes, placement.tensor_parallel
    assert len(weights) == placement.mesh.size and 1 / tp <= share < 1 / tp + 0.05


def check_data_parallel_workload(folder):
    # sampling, penalties, n, shared prefixes and preemption (a small pool) come out as on one device
    from jaxllm.engine.kv_cache import bytes_per_token

    shared = "the quick brown fox jumps over the lazy dog " * 2
    prompts = [shared + "and then", shared + "but later", "hello there the", "xyz", shared + "and then"]
    plist = [
        SamplingParams(temperature=0, max_tokens=20, min_tokens=20, logprobs=2),
        SamplingParams(temperature=0.9, seed=5, max_tokens=20, n=2, top_p=0.9),
        SamplingParams(temperature=0, max_tokens=20, repetition_penalty=1.3, frequency_penalty=0.5, logit_bias={5: 3}),
        SamplingParams(temperature=0.7, seed=11, max_tokens=20, top_k=5),
        SamplingParams(temperature=0, max_tokens=20, min_tokens=20, logprobs=2),
    ]

    mixed = []  # per mixed step: (tokens of replica 0, of replica 1, decodes beside chunks)

    def record(inp):
        if inp.mixed is not None:
            m, half = inp.mixed, len(inp.mixed.q_lens) // 2
            mixed.append((m.q_lens[:half].sum(), m.q_lens[half:].sum(), m.decoding.any() and (m.q_lens > 1).any()))

    def run(tp, dp):
        cfg = LLM(folder, tensor_parallel=1, progress=False).config
        gib = dp * 12 * 16 * bytes_per_token(cfg, "float32") / 2**30  # 12 pages of 16 tokens per replica
        llm = LLM(folder, tensor_parallel=tp, data_parallel=dp, kv_cache_memory=gib, max_model_len=128,
                  max_num_seqs=4 * dp, token_budget=16, progress=False)
        llm.engine.on_step = record if dp > 1 else None
        outs = llm.generate(prompts, plist, use_tqdm=False)
        ids = [[c.token_ids for c in o.outputs] for o in outs]
        return ids, [t.logprob for o in outs for c in o.outputs for t in (c.logprobs or [])], llm

    ids_one, lp_one, _ = run(1, 1)
    ids, lp, llm = run(2, 2)
    assert ids == ids_one, (ids, ids_one)
    assert max(abs(a - b) for a, b in zip(lp, lp_one)) <= 1e-4
    # the mixed step (the CPU default) ran with both replicas busy at once, and with decodes beside chunks
    assert llm.engine.mixed_step and any(a and b for a, b, _ in mixed) and any(m for *_, m in mixed), mixed
    sched = llm.engine.scheduler
    assert sched.preemptions > 0 and sum(p.hits for p in sched.pools) > 0, (sched.preemptions, sched.pools)


which = sys.argv[1]
if which == "tiny":
    folder = sys.argv[2]
    prompts = ["hello there the", "the cat sat on the mat and", "xyz"]
    one = LLM(folder, tensor_parallel=1, progress=False)
    for tp in (2, 4):  # 2 KV heads: at 4 each is stored on the 2 devices of its query heads
        llm = LLM(folder, tensor_parallel=tp, progress=False)
        assert llm.loaded.placement.tensor_parallel == tp and llm.config.num_kv_heads == max(2, tp)
        same_run(one, llm, prompts)
        split = check_shardings(llm)
        for name in ("qkv", "'o'", "gate_up", "down", "embed"):
            assert any(name in s for s in split), (name, split)
        assert tuple(llm.runner.cache.k.sharding.spec)[3] == "model"  # the KV pool: split over KV heads
        frac = per_device_fraction(llm)
        assert 1 / tp <= frac < 1 / tp + 0.05, (tp, frac)
    # logits are gathered only as far as sampling needs: greedy takes the argmax of each device's share of
    # the vocabulary and combines those; top-k sampling needs the whole rows
    assert gathered_logits(llm, SamplingParams(temperature=0, max_tokens=6)) == []
    assert gathered_logits(llm, SamplingParams(temperature=0.8, top_k=5, seed=1, max_tokens=6))
    same_run(one, LLM(folder, tensor_parallel=2, scan_layers=False, progress=False), prompts)  # per-layer params
    same_run(one, LLM(folder, tensor_parallel=2, mixed_step=True, token_budget=8, progress=False), prompts)
    check_data_parallel(one, LLM(folder, tensor_parallel=2, data_parallel=2, progress=False), prompts)
    check_data_parallel(one, LLM(folder, tensor_parallel=4, data_parallel=2, progress=False), prompts)  # KV copies
    check_data_parallel_workload(folder)
    # after warm-up, data-parallel mixed and decode steps compile nothing new
    warm = LLM(folder, tensor_parallel=2, data_parallel=2, max_num_seqs=4, max_model_len=64, token_budget=16,
               progress=False)
    shapes, _ = warm.engine.warmup()
    traced = dict(warm.runner.compiles)
    same_run(one, warm, prompts)
    # under a grammar (the model and sampling halves, sharded): the same tokens as one device
    constrained = SamplingParams(max_tokens=8, temperature=0, regex="[a-z]{3,20}")
    got = [[c.token_ids for c in o.outputs] for o in warm.generate(prompts, constrained, use_tqdm=False)]
    assert got == [[c.token_ids for c in o.outputs] for o in one.generate(prompts, constrained, use_tqdm=False)]
    # tokens 16/18 x sequences 1/2 x 2 variants, 2 scoring shapes, decode rows 1/2 x 2 variants; the same
    # mixed steps and one-step decodes under a grammar
    assert shapes == 14 * 2 and dict(warm.runner.compiles) == traced, (shapes, traced, warm.runner.compiles)
    q_one = LLM(folder, tensor_parallel=1, quant="int8", progress=False)
    q_tp = LLM(folder, tensor_parallel=2, quant="int8", progress=False)
    assert q_tp.loaded.params["params"]["layers"]["mlp"]["down"].q.sharding.spec[-1] == "model"  # K split
    same_run(q_one, q_tp, prompts)
    print("TINY-OK")
elif which == "smollm2":
    chats = [[{"role": "user", "content": "What is the capital of France?"}],
             [{"role": "user", "content": "Tell me a story about a dragon."}]]
    prompts = [None, None]
    one = LLM("smollm2", tensor_parallel=1, progress=False)
    prompts = [one.apply_chat_template(c) for c in chats]
    llm = LLM("smollm2", progress=False)  # the default: 9 query / 3 KV heads split over 3 of the 8 devices
    assert llm.loaded.placement.tensor_parallel == 3 and llm.config.num_kv_heads == 3
    same_run(one, llm, prompts)
    check_shardings(llm)
    frac = per_device_fraction(llm)
    assert 1 / 3 <= frac < 1 / 3 + 0.02, frac
    both = LLM("smollm2", data_parallel=2, progress=False)  # 2 replicas x 3 devices
    assert both.loaded.placement.tensor_parallel == 3
    check_data_parallel(one, both, prompts)
    del both
    from jaxllm.eval.perplexity import perplexity, read_text_ids
    ids = read_text_ids(one.tokenizer, sys.argv[2])[:1024]
    ppl_one, ppl_tp = perplexity(one.loaded, ids).perplexity, perplexity(llm.loaded, ids).perplexity
    assert abs(ppl_tp / ppl_one - 1) < 1e-4, (ppl_one, ppl_tp)
    print("SMOLLM2-OK")
"""


def _run_on_8_devices(*args) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
        "JAX_PLATFORMS": "cpu",
        "PYTHONPATH": str(Path(__file__).resolve().parent.parent),
    }
    return subprocess.run(
        [sys.executable, "-c", PARALLEL_SCRIPT, *args], capture_output=True, text=True, env=env, timeout=900
    )


@pytest.mark.slow
def test_tensor_parallel_tiny_models_generate_as_one_device(tiny_models):
    proc = _run_on_8_devices("tiny", str(tiny_models["llama"][0]))
    assert "TINY-OK" in proc.stdout, proc.stderr[-3000:]


@pytest.mark.slow
def test_tensor_parallel_smollm2_generates_as_one_device(smollm2_path):
    proc = _run_on_8_devices("smollm2", str(Path(__file__).resolve().parent / "data" / "perplexity.txt"))
    assert "SMOLLM2-OK" in proc.stdout, proc.stderr[-3000:]

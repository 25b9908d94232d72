"""Logical axis names map to mesh axes in one place; a model runs the same sharded over a mesh."""

from __future__ import annotations

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
        assert "jaxllm_paged_decode" in jax.jit(decode).lower(sharded).as_text()
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

"""In-situ quantization keeps host memory near the quantized size plus one float layer while it loads.

A random-weight Llama folder of ~540 MiB of float32 is loaded in a fresh process that samples its own
anonymous resident memory (`RssAnon`) every millisecond; the peak above the memory held before loading is
compared with the quantized weights' bytes plus one float32 layer (and a fixed allowance for what the runtime
itself allocates while loading: compiled copies, caches). Loading the same folder as float32 exceeds that
bound, so the bound is one that a loader holding the float weights would fail.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import write_byte_tokenizer

pytestmark = pytest.mark.slow

HIDDEN, INTER, LAYERS, VOCAB, HEADS, KV_HEADS = 1024, 4096, 8, 8192, 16, 8
FLOAT_LAYER_BYTES = 4 * (2 * HIDDEN * HIDDEN + 2 * HIDDEN * (HIDDEN // HEADS * KV_HEADS) + 3 * HIDDEN * INTER)
RUNTIME_ALLOWANCE = 128 << 20

MEASURE = """
import json, sys, threading, time
import jax, jax.numpy as jnp
jnp.zeros(1).block_until_ready()
from jaxllm.loading.load import LoadOptions, load_model

def anon():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("RssAnon:"))

peak, done = [0], threading.Event()

def watch():
    while not done.is_set():
        peak[0] = max(peak[0], anon())
        time.sleep(0.001)

base = anon()
watcher = threading.Thread(target=watch)
watcher.start()
loaded = load_model(sys.argv[1], progress=False, options=LoadOptions(quant=sys.argv[2] or None))
jax.block_until_ready(loaded.params)
done.set()
watcher.join()
print(json.dumps({"peak": max(peak[0], anon()) - base, "weights": loaded.weight_bytes}))
"""


@pytest.fixture(scope="module")
def float_folder(tmp_path_factory):
    """A Llama folder of random float32 weights, one safetensors file per layer."""
    from safetensors.numpy import save_file

    folder = tmp_path_factory.mktemp("isq-memory")
    config = dict(
        architectures=["LlamaForCausalLM"],
        model_type="llama",
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=INTER,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    (folder / "config.json").write_text(json.dumps(config))
    write_byte_tokenizer(folder, VOCAB)
    rng = np.random.default_rng(0)
    rand = lambda *shape: rng.standard_normal(shape, dtype=np.float32) * 0.02
    weight_map = {}

    def shard(name, tensors):
        save_file(tensors, str(folder / name))
        weight_map.update(dict.fromkeys(tensors, name))

    ones = np.ones(HIDDEN, np.float32)
    shard(
        "outer.safetensors",
        {
            "model.embed_tokens.weight": rand(VOCAB, HIDDEN),
            "lm_head.weight": rand(VOCAB, HIDDEN),
            "model.norm.weight": ones,
        },
    )
    kv = HIDDEN // HEADS * KV_HEADS
    for i in range(LAYERS):
        pre = f"model.layers.{i}."
        shapes = {
            "self_attn.q_proj": (HIDDEN, HIDDEN),
            "self_attn.k_proj": (kv, HIDDEN),
            "self_attn.v_proj": (kv, HIDDEN),
            "self_attn.o_proj": (HIDDEN, HIDDEN),
            "mlp.gate_proj": (INTER, HIDDEN),
            "mlp.up_proj": (INTER, HIDDEN),
            "mlp.down_proj": (HIDDEN, INTER),
        }
        tensors = {f"{pre}{k}.weight": rand(*s) for k, s in shapes.items()}
        tensors |= {f"{pre}input_layernorm.weight": ones, f"{pre}post_attention_layernorm.weight": ones}
        shard(f"layer-{i}.safetensors", tensors)
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return folder


def peak_while_loading(folder, quant: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", MEASURE, str(folder), quant], capture_output=True, text=True, timeout=600, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def float_peak(float_folder):
    return peak_while_loading(float_folder, "")["peak"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_isq_peak_host_memory_is_the_quantized_size_plus_one_layer(float_folder, float_peak, quant):
    got = peak_while_loading(float_folder, quant)
    bound = got["weights"] + FLOAT_LAYER_BYTES + RUNTIME_ALLOWANCE
    assert got["peak"] <= bound, (got, bound)
    assert float_peak > bound  # a loader holding the float weights would not fit under it

"""SmolLM2 with its GGUF weights kept quantized, and quantized in situ, against the dequantized float32 run."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm import LLM, SamplingParams
from jaxllm.quant import QuantizedWeight
from jaxllm.quant.format import Q_DTYPES

pytestmark = pytest.mark.slow

FRANCE = [{"role": "user", "content": "What is the capital of France?"}]
STORY = "Once upon a time, in a small village by the sea, there lived an old fisherman who"


def _logits(llm, ids):
    from jaxllm.engine.kv_cache import KVCache
    from jaxllm.models.registry import forward

    m, n = llm.loaded, len(ids)
    cache = KVCache.zeros(m.config, 1, n)
    tokens, positions = jnp.asarray([ids]), jnp.arange(n)[None]
    out, _ = forward(m.model, m.params, tokens, positions, cache, None, jnp.zeros((1,), "int32"), 0)
    return np.asarray(out[0])


def _prompts(llm):
    chat = llm.tokenizer.encode(llm.apply_chat_template(FRANCE), add_special_tokens=False)
    return [chat, llm.tokenizer.encode(STORY)]


@pytest.fixture(scope="module")
def kept(smollm2_path):
    return LLM(str(smollm2_path), progress=False)


@pytest.fixture(scope="module")
def kept_q8(smollm2_q8_0):
    return LLM(str(smollm2_q8_0), progress=False)


@pytest.fixture(scope="module")
def float_q8(smollm2_q8_0):
    return LLM(str(smollm2_q8_0), dequantize=True, progress=False)


def test_gguf_loads_kept_quantized_by_default(kept, smollm2):
    layers = kept.loaded.params["params"]["layers"]
    assert isinstance(layers["attn"]["qkv"], QuantizedWeight) and layers["attn"]["qkv"].kind == "uint4"
    assert isinstance(kept.loaded.params["params"]["embed"], QuantizedWeight)  # the Q8_0 embedding and LM head
    assert not smollm2.loaded.quant  # dequantize=True: the old float path
    assert kept.weight_bytes <= 0.35 * smollm2.weight_bytes


@pytest.mark.parametrize("which", ["Q4_1", "Q8_0"])
def test_logits_and_greedy_tokens_equal_the_dequantized_run(which, kept, smollm2, kept_q8, float_q8):
    quantized, reference = (kept, smollm2) if which == "Q4_1" else (kept_q8, float_q8)
    _assert_same_run(quantized, reference)


@pytest.mark.parametrize("which", ["f16", "bf16"])
def test_f16_and_bf16_tensors_stay_in_their_dtype_and_run_as_the_float32_copy(which, request):
    path = request.getfixturevalue(f"smollm2_{which}")
    kept, full = LLM(str(path), progress=False), LLM(str(path), dequantize=True, progress=False)
    qkv = kept.loaded.params["params"]["layers"]["attn"]["qkv"]
    assert isinstance(qkv, QuantizedWeight) and qkv.kind == which and qkv.q.dtype == Q_DTYPES[which]
    layers = lambda llm: sum(a.nbytes for a in jax.tree.leaves(llm.loaded.params["params"]["layers"]))
    assert layers(kept) <= 0.51 * layers(full)  # two bytes a weight, and the float32 norms
    _assert_same_run(kept, full)


def _assert_same_run(quantized, reference):
    params = SamplingParams(temperature=0, max_tokens=32, min_tokens=32)
    for ids in _prompts(reference):
        np.testing.assert_allclose(_logits(quantized, ids), _logits(reference, ids), atol=1e-3, rtol=0)
        want = reference.generate(ids, params, use_tqdm=False)[0].outputs[0].token_ids
        assert quantized.generate(ids, params, use_tqdm=False)[0].outputs[0].token_ids == want


def test_kept_quantized_answers_paris(kept):
    out = kept.chat(FRANCE, SamplingParams(temperature=0, max_tokens=32))
    assert "Paris" in out[0].outputs[0].text


def test_int8_isq_weight_bytes(smollm2_path, smollm2):
    isq = LLM(str(smollm2_path), quant="int8", progress=False)
    embed = smollm2.loaded.params["params"]["embed"]
    assert isinstance(isq.loaded.params["params"]["layers"]["mlp"]["down"], QuantizedWeight)
    assert not isinstance(isq.loaded.params["params"]["embed"], QuantizedWeight)  # kept float unless asked
    assert isq.weight_bytes <= 0.30 * smollm2.weight_bytes + embed.nbytes
    out = isq.chat(FRANCE, SamplingParams(temperature=0, max_tokens=32))
    assert "Paris" in out[0].outputs[0].text


def test_perplexity_of_each_quantization_stays_near_float32(smollm2):
    from pathlib import Path

    from jaxllm.eval.perplexity import perplexity, read_text_ids
    from jaxllm.loading.load import LoadOptions, load_model

    text = Path(__file__).resolve().parents[1] / "data" / "perplexity.txt"
    ids = read_text_ids(smollm2.tokenizer, text)[:1024]  # 1,024 tokens of English: 5 runs within CI's time
    assert len(ids) == 1024
    base = perplexity(smollm2.loaded, ids).perplexity
    for quant, bound in (("int8", 0.01), ("int4", 0.08), ("fp8", 0.02)):
        loaded = load_model("smollm2", progress=False, options=LoadOptions(quant=quant))
        ppl = perplexity(loaded, ids).perplexity
        assert abs(ppl / base - 1) <= bound, (quant, ppl, base)
    kept = perplexity(load_model("smollm2", progress=False), ids).perplexity
    assert abs(kept / base - 1) < 1e-4

"""The real SmolLM2-135M GGUF against transformers' own loading of the same file."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from jaxllm import SamplingParams

FRANCE = [{"role": "user", "content": "What is the capital of France?"}]

pytestmark = pytest.mark.slow


def _prompt_ids(llm):
    return llm.tokenizer.encode(llm.apply_chat_template(FRANCE), add_special_tokens=False)


def test_prefill_logits_match_transformers(smollm2, hf_smollm2):
    import jax.numpy as jnp

    from jaxllm.models.registry import forward

    model, _ = hf_smollm2
    ids = _prompt_ids(smollm2)
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0].numpy()
    loaded = smollm2.loaded
    n = len(ids)
    logits, _ = forward(
        loaded.model,
        loaded.params,
        jnp.asarray([ids]),
        jnp.arange(n)[None],
        _empty_cache(loaded.config, n),
        None,
        jnp.zeros((1,), jnp.int32),
        0,
    )
    np.testing.assert_allclose(np.asarray(logits[0]), ref, atol=1e-3, rtol=0)


def _empty_cache(cfg, n):
    from jaxllm.engine.kv_cache import KVCache

    return KVCache.zeros(cfg, 1, n)


def test_greedy_answer_names_paris(smollm2):
    out = smollm2.chat(FRANCE, SamplingParams(temperature=0, max_tokens=32))
    assert "Paris" in out[0].outputs[0].text


def test_64_greedy_tokens_match_transformers(smollm2, hf_smollm2):
    model, _ = hf_smollm2
    ids = _prompt_ids(smollm2)
    with torch.no_grad():
        ref = model.generate(torch.tensor([ids]), max_new_tokens=64, min_new_tokens=64, do_sample=False)
    ref_tokens = ref[0, len(ids) :].tolist()
    # min_tokens masks EOS for all 64 tokens, exactly as transformers' min_new_tokens does.
    out = smollm2.generate(ids, SamplingParams(temperature=0, max_tokens=64, min_tokens=64), use_tqdm=False)
    assert out[0].outputs[0].token_ids == ref_tokens

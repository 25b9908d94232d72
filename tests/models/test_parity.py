"""Parity with Hugging Face transformers on tiny random-weight models of every supported architecture."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jaxllm import LLM, SamplingParams
from jaxllm.engine.kv_cache import KVCache
from jaxllm.loading.load import load_model
from jaxllm.models.registry import forward
from tests.conftest import TINY_ARCHS

PROMPT = [1, 17, 42, 99, 5, 250, 8, 64, 77, 3, 120, 33]
STEPS = 16


def _hf_reference(model, prompt):
    """Prefill logits [T, V], per-step logits of STEPS greedy decode steps, and the greedy tokens."""
    ids = torch.tensor([prompt])
    with torch.no_grad():
        prefill = model(ids).logits[0].numpy()
        out = model.generate(
            ids,
            max_new_tokens=STEPS,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
            eos_token_id=None,
            pad_token_id=0,
        )
    tokens = out.sequences[0, len(prompt) :].tolist()
    step_logits = np.stack([lg[0].numpy() for lg in out.logits])
    return prefill, step_logits, tokens


def _our_logits(loaded, prompt, tokens, page_size=64):
    """Our prefill logits [T, V] and the logits of the decode steps fed `tokens` (teacher forcing), over a
    64-token cache in pages of `page_size` (64: one contiguous page), the pages in scrambled order."""
    cfg, model, params = loaded.config, loaded.model, loaded.params
    n_pages = 64 // page_size
    cache = KVCache.zeros(cfg, n_pages + 1, page_size, per_layer=not model.scan_layers)
    table = jnp.asarray([np.random.default_rng(0).permutation(n_pages + 1)[:n_pages]], jnp.int32)
    n = len(prompt)
    step = jax.jit(forward, static_argnums=(0, 7))
    ids = jnp.asarray([prompt], jnp.int32)
    logits, cache = step(model, params, ids, jnp.arange(n)[None], cache, table, jnp.zeros((1,), jnp.int32), 0)
    prefill = np.asarray(logits[0])
    outs = [np.asarray(logits[0, -1])]
    for i, tok in enumerate(tokens[:-1]):
        pos = n + i
        logits, cache = step(
            model,
            params,
            jnp.asarray([[tok]], jnp.int32),
            jnp.asarray([[pos]]),
            cache,
            table,
            jnp.asarray([pos], jnp.int32),
            64,
        )
        outs.append(np.asarray(logits[0, 0]))
    return prefill, np.stack(outs)


@pytest.mark.slow
@pytest.mark.parametrize("arch", list(TINY_ARCHS))
def test_logits_and_greedy_match_transformers(tiny_models, arch):
    folder, hf_model = tiny_models[arch]
    hf_prefill, hf_steps, hf_tokens = _hf_reference(hf_model, PROMPT)
    loaded = load_model(folder, progress=False)
    prefill, steps = _our_logits(loaded, PROMPT, hf_tokens)
    np.testing.assert_allclose(prefill, hf_prefill, atol=1e-4, rtol=0)
    np.testing.assert_allclose(steps, hf_steps, atol=1e-4, rtol=0)
    # The same through small scrambled pages, crossing page boundaries in prefill and decode.
    paged_prefill, paged_steps = _our_logits(loaded, PROMPT, hf_tokens, page_size=4)
    np.testing.assert_allclose(paged_prefill, prefill, atol=1e-4, rtol=0)
    np.testing.assert_allclose(paged_steps, steps, atol=1e-4, rtol=0)
    assert (paged_steps.argmax(-1) == steps.argmax(-1)).all()

    for page_size in (4, 16, 128):  # 128: one page per sequence, the contiguous layout
        llm = LLM(loaded=loaded, max_model_len=128, page_size=page_size)
        out = llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=STEPS, ignore_eos=True), use_tqdm=False)
        assert out[0].outputs[0].token_ids == hf_tokens, page_size


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["mistral", "qwen3"])
def test_scanned_and_unrolled_layers_load_and_compute_the_same(tiny_models, arch):
    """Stacked params under a layer scan with a stacked cache, and per-layer params run unrolled with a
    cache buffer per layer: the same weights, the same logits."""
    folder, _ = tiny_models[arch]
    scanned = load_model(folder, progress=False, scan_layers=True)
    unrolled = load_model(folder, progress=False, scan_layers=False)
    assert scanned.model.scan_layers and not unrolled.model.scan_layers
    n_layers = scanned.config.num_layers
    stacked = scanned.params["params"]["layers"]
    for i in range(n_layers):
        per_layer = unrolled.params["params"][f"layers_{i}"]
        jax.tree.map(lambda a, b, i=i: np.testing.assert_array_equal(a[i], b), stacked, per_layer)
    tokens = [5, 9, 11, 200]
    ref_prefill, ref_steps = _our_logits(scanned, PROMPT, tokens, page_size=4)
    prefill, steps = _our_logits(unrolled, PROMPT, tokens, page_size=4)
    np.testing.assert_allclose(prefill, ref_prefill, atol=1e-5, rtol=0)
    np.testing.assert_allclose(steps, ref_steps, atol=1e-5, rtol=0)
    greedy = SamplingParams(temperature=0, max_tokens=STEPS, ignore_eos=True)
    outs = [
        LLM(loaded=m, max_model_len=128, page_size=4).generate(PROMPT, greedy, use_tqdm=False)
        for m in (scanned, unrolled)
    ]
    assert outs[0][0].outputs[0].token_ids == outs[1][0].outputs[0].token_ids
    with pytest.raises(ValueError, match="stacked KV cache"):
        cache = KVCache.zeros(scanned.config, 4, 4, per_layer=True)
        ids = jnp.asarray([PROMPT], jnp.int32)
        positions = jnp.arange(len(PROMPT))[None]
        forward(
            scanned.model,
            scanned.params,
            ids,
            positions,
            cache,
            jnp.zeros((1, 4), jnp.int32),
            jnp.zeros((1,), jnp.int32),
            4,
        )


@pytest.mark.slow
def test_config_reflects_architecture_features(tiny_models):
    cfgs = {arch: load_model(folder, progress=False).config for arch, (folder, _) in tiny_models.items()}
    assert cfgs["llama3_rope"].rope_scaling.rope_type == "llama3"
    assert cfgs["mistral"].sliding_window == 8
    assert cfgs["qwen2"].attention_bias and cfgs["qwen2"].tie_word_embeddings
    assert cfgs["qwen3"].qk_norm and cfgs["qwen3"].head_dim == 32


@pytest.mark.slow
def test_the_model_through_the_pallas_kernels_equals_the_reference(tiny_models, monkeypatch):
    """The Pallas kernels (interpreted) inside the model: prefill and decode over scrambled pages."""
    loaded = load_model(tiny_models["mistral"][0], progress=False)  # GQA and a sliding window of 8
    prompt, tokens = PROMPT, [5, 9, 11, 200]
    ref_prefill, ref_steps = _our_logits(loaded, prompt, tokens, page_size=4)
    monkeypatch.setenv("JAXLLM_ATTENTION", "pallas-interpret")
    jax.clear_caches()  # the choice is made at trace time
    try:
        prefill, steps = _our_logits(loaded, prompt, tokens, page_size=4)
    finally:
        monkeypatch.delenv("JAXLLM_ATTENTION")
        jax.clear_caches()
    np.testing.assert_allclose(prefill, ref_prefill, atol=1e-4, rtol=0)
    np.testing.assert_allclose(steps, ref_steps, atol=1e-4, rtol=0)

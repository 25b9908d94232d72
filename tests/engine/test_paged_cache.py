"""The paged KV cache end to end with the real SmolLM2: paged equals contiguous, preemption, prefix caching."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm import LLM, SamplingParams
from jaxllm.engine.kv_cache import KVCache, bytes_per_token
from jaxllm.models.registry import forward

pytestmark = pytest.mark.slow

SYSTEM = (
    "You are a meticulous assistant for a small bakery. You answer questions about opening hours, "
    "ingredients, allergens, prices and orders. Opening hours: Monday to Friday 7am to 6pm, Saturday "
    "8am to 2pm, closed on Sunday. All breads are baked with organic flour; rye and spelt loaves contain "
    "gluten; the almond croissant contains nuts; vegan options are marked with a green leaf on the shelf. "
    "Prices: baguette 1.20 euros, sourdough loaf 4.50 euros, croissant 1.10 euros, almond croissant 1.80 "
    "euros. Orders for more than twenty items need one day of notice. Deliveries within five kilometres cost "
    "three euros and arrive before noon when ordered the day before. We accept cash, cards and vouchers "
    "from the town's merchant association. Birthday cakes are made to order in three sizes, with a "
    "written message of up to twenty letters. Keep answers short and friendly."
)


def _chat(llm, question):
    msgs = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]
    return llm.tokenizer.encode(llm.apply_chat_template(msgs), add_special_tokens=False)


def _llm(smollm2, **kw):
    return LLM(loaded=smollm2.loaded, max_model_len=kw.pop("max_model_len", 512), progress=False, **kw)


def test_paged_logits_equal_contiguous_logits(smollm2):
    loaded = smollm2.loaded
    cfg = loaded.config
    prompt = _chat(smollm2, "When are you open on Saturday?")
    n, steps, length = len(prompt), 12, 256
    step = jax.jit(forward, static_argnums=(0, 7))

    def run(page_size):
        n_pages = length // page_size
        cache = KVCache.zeros(cfg, n_pages + 3, page_size)
        table = jnp.asarray([np.random.default_rng(1).permutation(n_pages + 3)[:n_pages]], jnp.int32)
        logits, cache = step(
            loaded.model, loaded.params, jnp.asarray([prompt]), jnp.arange(n)[None], cache, table, jnp.zeros(1, int), 0
        )
        out, tok = [np.asarray(logits[0, -1])], int(jnp.argmax(logits[0, -1]))
        for i in range(steps):
            pos = jnp.asarray([n + i])
            logits, cache = step(
                loaded.model, loaded.params, jnp.asarray([[tok]]), pos[None], cache, table, pos, length
            )
            out.append(np.asarray(logits[0, 0]))
            tok = int(jnp.argmax(logits[0, 0]))
        return np.stack(out)

    contiguous, paged = run(length), run(16)
    np.testing.assert_allclose(paged, contiguous, atol=1e-4, rtol=0)
    assert (paged.argmax(-1) == contiguous.argmax(-1)).all()


def test_paged_generation_equals_contiguous_generation(smollm2):
    prompts = [_chat(smollm2, q) for q in ("Do you sell baguettes?", "Is the croissant vegan?")]
    params = [SamplingParams(temperature=0, max_tokens=40), SamplingParams(temperature=0.8, seed=3, max_tokens=40)]
    paged = _llm(smollm2, page_size=16).generate(prompts, params, use_tqdm=False)
    contiguous = _llm(smollm2, page_size=512).generate(prompts, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in paged] == [o.outputs[0].token_ids for o in contiguous]


def test_preempted_requests_complete_with_their_solo_output(smollm2):
    questions = ["What does rye bread contain?", "How much is a sourdough loaf?", "Can I order 30 croissants?"]
    prompts = [_chat(smollm2, q) for q in questions]
    params = [SamplingParams(temperature=0.7, seed=11 + i, max_tokens=64, ignore_eos=True) for i in range(3)]
    solo = _llm(smollm2)
    alone = [
        solo.generate(p, sp, use_tqdm=False)[0].outputs[0].token_ids for p, sp in zip(prompts, params, strict=True)
    ]
    # Room for 512 tokens: one sequence of the longest fits, three of ~200 tokens each do not.
    page_bytes = bytes_per_token(smollm2.config, jnp.float32) * 16
    tight = _llm(smollm2, page_size=16, kv_cache_memory=33 * page_bytes / 2**30, prefix_caching=False)
    out = tight.generate(prompts, params, use_tqdm=False)
    assert tight.engine.scheduler.preemptions > 0
    assert [o.outputs[0].token_ids for o in out] == alone
    assert tight.engine.scheduler.pool.num_used == 0


def test_a_shared_system_prompt_is_prefilled_once(smollm2):
    first, second = _chat(smollm2, "Are you open on Sunday?"), _chat(smollm2, "What is in the almond croissant?")
    shared = next(i for i, (a, b) in enumerate(zip(first, second, strict=False)) if a != b)
    assert shared >= 200
    params = SamplingParams(temperature=0, max_tokens=24)
    cold = _llm(smollm2, prefix_caching=False).generate(second, params, use_tqdm=False)[0].outputs[0]

    llm = _llm(smollm2)
    llm.generate(first, params, use_tqdm=False)
    before = llm.engine.prefilled_tokens
    warm = llm.generate(second, params, use_tqdm=False)[0].outputs[0]
    reused = shared // 16 * 16
    assert llm.engine.prefilled_tokens - before == len(second) - reused
    assert warm.token_ids == cold.token_ids


def test_eviction_under_pressure_keeps_outputs_correct(smollm2):
    questions = ["Price of a baguette?", "Do you bake spelt?", "Closing time on Friday?", "Any vegan bread?"]
    prompts = [_chat(smollm2, q) for q in questions]
    params = SamplingParams(temperature=0, max_tokens=16)
    cold = _llm(smollm2, prefix_caching=False)
    expected = [cold.generate(p, params, use_tqdm=False)[0].outputs[0].token_ids for p in prompts]
    page_bytes = bytes_per_token(smollm2.config, jnp.float32) * 16
    llm = _llm(smollm2, page_size=16, kv_cache_memory=36 * page_bytes / 2**30)  # ~2 sequences' worth
    for _ in range(2):  # the second round finds some pages evicted and others still cached
        for p, want in zip(prompts, expected, strict=True):
            assert llm.generate(p, params, use_tqdm=False)[0].outputs[0].token_ids == want
    pool = llm.engine.scheduler.pool
    assert 0 < pool.hits < pool.queries  # some prefixes found, some evicted


def test_penalties_are_the_same_after_prefix_reuse_chunking_and_preemption(smollm2):
    """Repetition/presence/frequency penalties see exactly the prompt and the outputs, however the
    prompt reached the cache: found by prefix, prefilled in chunks, or recomputed after preemption."""
    first, second = _chat(smollm2, "Do you deliver?"), _chat(smollm2, "What do you accept as payment?")
    params = SamplingParams(
        temperature=0, max_tokens=48, repetition_penalty=1.3, presence_penalty=0.4, frequency_penalty=0.4
    )
    cold = _llm(smollm2, prefix_caching=False)
    want = [cold.generate(p, params, use_tqdm=False)[0].outputs[0].token_ids for p in (first, second)]

    warm = _llm(smollm2)  # the second request finds the system prompt, in the slot the first one used
    got = [warm.generate(p, params, use_tqdm=False)[0].outputs[0].token_ids for p in (first, second)]
    assert warm.engine.scheduler.pool.hits > 0 and got == want

    chunked = _llm(smollm2, prefix_caching=False, token_budget=64)
    assert chunked.generate(second, params, use_tqdm=False)[0].outputs[0].token_ids == want[1]

    page_bytes = bytes_per_token(smollm2.config, jnp.float32) * 16
    # 20 pages = one sequence of max_model_len 320; the three share ~13 pages of system prompt and need
    # ~5 more each.
    tight = _llm(smollm2, max_model_len=320, page_size=16, kv_cache_memory=20.5 * page_bytes / 2**30)
    out = tight.generate([first, second, first], params, use_tqdm=False)
    assert tight.engine.scheduler.preemptions > 0
    assert [o.outputs[0].token_ids for o in out] == [want[0], want[1], want[0]]

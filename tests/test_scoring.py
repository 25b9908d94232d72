"""Scoring through the Python API: prompt logprobs, LLM.score and the rolling log-likelihood, against
transformers' log-softmax on the same SmolLM2 weights."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from jaxllm import LLM, SamplingParams
from jaxllm.errors import InvalidRequestError, InvalidSamplingParamsError
from jaxllm.scoring import encode_pair, rolling_windows

TEXT = "The quick brown fox jumps over the lazy dog. Paris is the capital of France, and Berlin is the capital of"
MC20 = Path(__file__).parent / "data" / "mc20.jsonl"


def hf_logprobs(model, ids: list[int]) -> np.ndarray:
    """transformers' log-softmax [len(ids), vocab] over one sequence."""
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids])).logits[0], -1).numpy()


def mc20_questions() -> list[dict]:
    return [json.loads(line) for line in MC20.read_text().splitlines()]


def mc_context(q: dict) -> str:
    return f"Question: {q['question']}\nAnswer:"


def test_encode_pair_moves_the_context_s_trailing_spaces_and_keeps_ids_as_given():
    class Chars:  # a tokenizer of one id per character
        def encode(self, text):
            return [ord(c) for c in text]

    assert encode_pair(Chars(), "Answer: ", "Paris") == ([ord(c) for c in "Answer:"], [ord(c) for c in " Paris"])
    assert encode_pair(Chars(), [1, 2], [3]) == ([1, 2], [3])
    with pytest.raises(InvalidRequestError, match="both as text or both as token ids"):
        encode_pair(Chars(), "a", [3])


def test_rolling_windows_score_every_token_once_after_the_token_before_it():
    ids = list(range(10, 33))  # 23 tokens
    windows = rolling_windows(ids, prefix=1, width=8)
    assert all(len(w) <= 8 and ctx == 1 for w, ctx in windows)
    assert [t for w, _ in windows for t in w[1:]] == ids  # scored tokens: each once, in order
    assert windows[0][0][0] == 1 and all(w[0] == ids[ids.index(w[1]) - 1] for w, _ in windows[1:])


@pytest.fixture(scope="module")
def chunked(smollm2):
    """SmolLM2 (float) with 16-token chunks and prefix caching on."""
    return LLM(loaded=smollm2.loaded, max_num_seqs=8, max_model_len=256, token_budget=16)


def test_prompt_logprobs_equal_transformers_across_chunks_with_prefix_caching_on(chunked, hf_smollm2):
    model, _ = hf_smollm2
    ids = chunked.tokenizer.encode(TEXT)
    # The same prompt without prompt logprobs finds most of it cached: the cache is on and holds this prompt.
    plain = chunked.generate([ids], SamplingParams(temperature=0, max_tokens=1), use_tqdm=False)[0]
    again = chunked.generate([ids], SamplingParams(temperature=0, max_tokens=1), use_tqdm=False)[0]
    assert again.outputs[0].token_ids == plain.outputs[0].token_ids
    assert chunked.engine.scheduler.pools[0].hits > 0
    params = SamplingParams(temperature=0, max_tokens=0, prompt_logprobs=3)
    out = chunked.generate([ids], params, use_tqdm=False)[0]
    ref = hf_logprobs(model, ids)
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(ids)
    ours = np.array([lp.logprob for lp in out.prompt_logprobs[1:]])
    np.testing.assert_allclose(ours, ref[np.arange(len(ids) - 1), ids[1:]], atol=1e-4, rtol=0)
    assert [lp.token_id for lp in out.prompt_logprobs[1:]] == ids[1:]
    for p, lp in enumerate(out.prompt_logprobs[1:]):  # the 3 most likely next tokens, as transformers ranks them
        assert [t for t, _ in lp.top] == list(np.argsort(-ref[p])[:3])
        np.testing.assert_allclose([v for _, v in lp.top], np.sort(ref[p])[::-1][:3], atol=1e-4, rtol=0)
    assert out.outputs[0].token_ids == [] and out.outputs[0].finish_reason == "length"  # max_tokens 0: scored only
    # With generation too, beside another request: the prompt's logprobs are the same, and its output too.
    both = chunked.generate(
        [ids, TEXT[:40]], [SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0), params], use_tqdm=False
    )
    assert [lp.logprob for lp in both[0].prompt_logprobs[1:]] == pytest.approx(list(ours), abs=1e-5)
    assert both[0].prompt_logprobs[1].top == [] and both[0].outputs[0].token_ids == plain.outputs[0].token_ids


def test_score_and_rolling_loglikelihood_equal_transformers(chunked, hf_smollm2):
    model, _ = hf_smollm2
    questions = mc20_questions()[:4]
    contexts = [mc_context(q) for q in questions for _ in q["choices"]]
    continuations = [" " + c for q in questions for c in q["choices"]]
    scores = chunked.score(contexts, continuations)
    for ctx, cont, s in zip(contexts, continuations, scores, strict=True):
        c_ids, x_ids = encode_pair(chunked.tokenizer, ctx, cont)
        ref = hf_logprobs(model, c_ids + x_ids)
        positions = np.arange(len(c_ids) - 1, len(c_ids) + len(x_ids) - 1)
        assert s.tokens == len(x_ids)
        assert s.logprob == pytest.approx(float(ref[positions, x_ids].sum()), abs=1e-3)
        assert s.greedy == bool(np.all(ref[positions].argmax(-1) == x_ids))
    # What greedy decoding generates is greedy, with the logprobs it was generated with.
    c_ids = chunked.tokenizer.encode(contexts[0])
    greedy = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, logprobs=0)
    gen = chunked.generate([c_ids], greedy, use_tqdm=False)[0]
    (mine,) = chunked.score([c_ids], [gen.outputs[0].token_ids])
    assert mine.greedy and mine.tokens == 4
    assert mine.logprob == pytest.approx(sum(lp.logprob for lp in gen.outputs[0].logprobs), abs=1e-4)
    # The rolling log-likelihood: windows of the context (here 256 tokens), each after the token before it.
    text = " ".join([TEXT] * 12)
    ids = chunked.tokenizer.encode(text)
    total = chunked.loglikelihood_rolling([text, ids])
    bos = chunked.tokenizer.bos_id
    want = 0.0
    for window, ctx in rolling_windows(ids, bos, 255):
        ref = hf_logprobs(model, window)
        want += float(ref[np.arange(ctx - 1, len(window) - 1), window[ctx:]].sum())
    assert total == pytest.approx([want, want], abs=5e-3)
    assert len(ids) > 255  # it took more than one window


def test_prompt_logprobs_need_the_mixed_step(chunked):
    separate = LLM(loaded=chunked.loaded, max_num_seqs=2, max_model_len=64, mixed_step=False)
    with pytest.raises(InvalidRequestError, match="prompt_logprobs needs the mixed step"):
        separate.generate(["hello"], SamplingParams(max_tokens=0, prompt_logprobs=1), use_tqdm=False)
    with pytest.raises(InvalidSamplingParamsError, match="prompt_logprobs must be an integer in"):
        SamplingParams(prompt_logprobs=21)

"""Scoring text with the model: the log-likelihood of a continuation given a context, and of a whole text.

These are the two numbers evaluation harnesses ask for (lm-evaluation-harness's `loglikelihood` and
`loglikelihood_rolling`). Both come from prompt logprobs (`SamplingParams(prompt_logprobs=1)` with
`max_tokens=0`), so they are computed from the prefill's own logits inside the compiled step, in the same
batches as any other request.
"""

from __future__ import annotations

import dataclasses

from jaxllm.errors import InvalidRequestError
from jaxllm.sampling_params import SamplingParams

SCORE_PARAMS = SamplingParams(temperature=0.0, max_tokens=0, prompt_logprobs=1)


@dataclasses.dataclass(frozen=True)
class Score:
    """A continuation's summed log-likelihood, whether each of its tokens is the most likely one at its
    position (greedy decoding would produce it), and how many tokens it has."""

    logprob: float
    greedy: bool
    tokens: int


def encode_pair(tokenizer, context, continuation) -> tuple[list[int], list[int]]:
    """Token ids of a context and its continuation (strings, or lists of token ids). Strings are encoded
    together, so that a word split across the boundary tokenizes as it would in running text, and the
    continuation is what follows the context's own tokens; trailing spaces of the context move to the
    continuation first (as lm-evaluation-harness does)."""
    if not isinstance(context, str) or not isinstance(continuation, str):
        if isinstance(context, str) or isinstance(continuation, str):
            raise InvalidRequestError("give the context and the continuation both as text or both as token ids")
        return list(context), list(continuation)
    spaces = len(context) - len(context.rstrip(" "))
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer.encode(context + continuation)
    ctx = tokenizer.encode(context) if context else []
    return ctx, whole[len(ctx) :]


def with_prefix(tokenizer, ctx: list[int]) -> list[int]:
    """A context that gives the first continuation token something to be predicted from: the context itself,
    or the beginning-of-sequence token when it is empty."""
    if ctx:
        return ctx
    if tokenizer.bos_id is None:
        raise InvalidRequestError("an empty context needs a beginning-of-sequence token, and this model has none")
    return [tokenizer.bos_id]


def score_of(output, context_len: int) -> Score:
    """The Score of the tokens after the first `context_len` of a scored prompt (a RequestOutput)."""
    lps = output.prompt_logprobs[context_len:]
    ids = output.prompt_token_ids[context_len:]
    greedy = all(lp.top and lp.top[0][0] == tok for lp, tok in zip(lps, ids, strict=True))
    return Score(sum(lp.logprob for lp in lps), greedy, len(ids))


def rolling_windows(ids: list[int], prefix: int, width: int) -> list[tuple[list[int], int]]:
    """Cut a text's tokens into prompts of at most `width` tokens that together score every token once:
    each is (prompt, context_len), its first `context_len` tokens only context (the first window's is the
    prefix token, each later one's the token before it)."""
    out, start = [], 0
    while start < len(ids):
        end = min(start + width - 1, len(ids))
        before = [prefix] if start == 0 else [ids[start - 1]]
        out.append((before + ids[start:end], 1))
        start = end
    return out

"""How chat completions show outputs: OpenAI's choice, message, tool_calls and logprobs entries."""

from __future__ import annotations

from jaxllm.outputs import CompletionOutput


def logprobs_entries(lps) -> list[dict]:
    """OpenAI's chat logprobs entries of the tokens (named by the output processor)."""

    def entry(text, lp):
        return {"token": text, "logprob": lp, "bytes": list(text.encode())}

    def top(lp):
        return [entry(t, v) for t, (_, v) in zip(lp.top_tokens, lp.top, strict=True)]

    return [{**entry(lp.token, lp.logprob), "top_logprobs": top(lp)} for lp in lps]


def choice_of(c: CompletionOutput, logprobs: bool) -> dict:
    """A chat choice: the message (content, or the calls with any content around them), logprobs, reason."""
    message = {"role": "assistant", "content": c.text}
    if c.tool_calls:
        message = {"role": "assistant", "content": c.text or None, "tool_calls": calls_of(c.tool_calls)}
    lp = {"content": logprobs_entries(c.logprobs)} if logprobs else None
    return {"index": c.index, "message": message, "logprobs": lp, "finish_reason": c.finish_reason}


def calls_of(calls, first_index: int | None = None) -> list[dict]:
    """OpenAI's tool_calls entries; for stream deltas, numbered from `first_index` (the calls sent before)."""
    out = []
    for k, c in enumerate(calls):
        entry = {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
        out.append(entry if first_index is None else {"index": first_index + k, **entry})
    return out

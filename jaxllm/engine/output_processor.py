"""The front-end stage between the engine's tokens and the user: text, stop strings, logprob texts, tool calls.

The engine and its scheduler deal in tokens (`TokenOutput`: what each sequence took in a step, finished by
token conditions only). This stage turns them into `StreamDelta`s: it detokenizes incrementally (never
splitting a multi-byte character), finds stop strings (holding back the tail of the text that could begin
one, so that no piece of a stop string is ever shown), names the tokens of logprobs, and with a tool-call
format parses the calls out of the text as they complete. A stop string found in the text finishes the
sequence: the caller hands those back to the engine (`OutputProcessor.step` does both).
"""

from __future__ import annotations

import dataclasses

from jaxllm.engine.sequence import Sequence, TokenLogprob, TokenOutput
from jaxllm.outputs import StreamDelta
from jaxllm.structured.tool_calls import ToolCallStream
from jaxllm.tokenizer import IncrementalDetokenizer, Tokenizer


@dataclasses.dataclass
class Processed:
    """One step's deltas, and the sequences a stop string finished, with that string (for `Engine.finish`)."""

    deltas: list[StreamDelta]
    stopped: list[tuple[Sequence, str]]


class _Text:
    """One sequence's text so far and what of it has been handed out."""

    def __init__(self, seq: Sequence, tokenizer: Tokenizer, tool_format: str | None):
        self.detok = IncrementalDetokenizer(tokenizer, seq.prompt_ids, seq.params.skip_special_tokens)
        self.text = ""  # the output's text, cut at a stop string once one is found
        self.emitted = 0  # characters of `text` handed on
        self.hold = max((len(s) for s in seq.params.stop), default=1) - 1
        self.tools = ToolCallStream(tool_format) if tool_format else None


class OutputProcessor:
    """Per-sequence text state for the requests added to it; `process` turns token outputs into deltas."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self._texts: dict[Sequence, _Text] = {}

    def add(self, seqs: list[Sequence], tool_format: str | None = None) -> None:
        """Follow the sequences of a new request; with `tool_format` (see `jaxllm.structured.tool_calls`),
        tool calls are parsed out of their text."""
        for s in seqs:
            self._texts[s] = _Text(s, self.tokenizer, tool_format)

    def drop(self, request_id: str) -> None:
        """Forget a request's sequences (aborted: nothing more is handed out for them)."""
        for s in [s for s in self._texts if s.request_id == request_id]:
            del self._texts[s]

    def __len__(self) -> int:
        return len(self._texts)

    def step(self, engine) -> list[StreamDelta]:
        """Run one engine step and return its deltas, finishing in the engine the sequences a stop string
        ended."""
        processed = self.process(engine.step())
        for seq, stop in processed.stopped:
            engine.finish(seq, "stop", stop)
        return processed.deltas

    def process(self, outputs: list[TokenOutput]) -> Processed:
        """The deltas of one step's token outputs (one per output of a followed sequence)."""
        deltas, stopped = [], []
        for out in outputs:
            state = self._texts.get(out.seq)
            if state is None:
                continue
            delta = self._delta(out, state)
            if delta.finish_reason is not None:
                del self._texts[out.seq]
                if not out.finished:
                    stopped.append((out.seq, delta.stop_reason))
            deltas.append(delta)
        return Processed(deltas, stopped)

    def _delta(self, out: TokenOutput, st: _Text) -> StreamDelta:
        s, ids = out.seq, out.token_ids
        finished, reason, stop_reason = out.finished, s.finish_reason, s.stop_reason
        if finished and reason == "stop" and isinstance(stop_reason, int) and ids and ids[-1] == stop_reason:
            ids = ids[:-1]  # a stop token ends the text without being part of it
        st.text += st.detok.add(ids) if ids else ""
        if finished:
            st.text += st.detok.flush()
        if s.params.stop:
            hit = self._stop_string(s, st)
            if hit is not None:
                finished, reason, stop_reason = True, "stop", hit
        end = len(st.text) if finished else max(st.emitted, len(st.text) - st.hold)
        text, st.emitted = st.text[st.emitted : end], end
        calls = []
        if st.tools is not None:
            text = st.tools.feed(text)
            calls = st.tools.take_calls()
            if finished:
                rest, more = st.tools.finish()
                text, calls = text + rest, calls + more
                if st.tools.count:
                    reason = "tool_calls"
        return StreamDelta(
            s.index,
            text,
            list(out.token_ids),
            [self._named(lp) for lp in out.logprobs],
            reason if finished else None,
            stop_reason if finished else None,
            s.cached_tokens if s.index == 0 else 0,
            None if out.prompt_logprobs is None else [lp and self._named(lp) for lp in out.prompt_logprobs],
            calls,
            s.request_id,
        )

    def _stop_string(self, s: Sequence, st: _Text) -> str | None:
        """The first stop string in the text not handed out yet (the text is cut before it), or None."""
        start = max(0, st.emitted - st.hold - 1)
        hits = [(st.text.find(stop, start), stop) for stop in s.params.stop]
        hits = [(i, stop) for i, stop in hits if i >= 0]
        if not hits:
            return None
        i, stop = min(hits)
        st.text = st.text[:i]
        return stop

    def _named(self, lp: TokenLogprob) -> TokenLogprob:
        """The logprob with the texts of its tokens (as shown in logprobs: one token decoded alone)."""
        name = self.tokenizer.token_str
        return dataclasses.replace(lp, token=name(lp.token_id), top_tokens=[name(t) for t, _ in lp.top])

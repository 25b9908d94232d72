"""SamplingParams: what a caller asks of one generation, validated on construction."""

from __future__ import annotations

import dataclasses

from jaxllm.errors import InvalidSamplingParamsError

MAX_TOP_LOGPROBS = 20


@dataclasses.dataclass
class SamplingParams:
    """How to pick tokens and when to stop. temperature 0 means greedy; top_k 0 means no top-k limit.
    logprobs: the chosen token's logprob and the N most likely at each generated step; prompt_logprobs: the
    same for every prompt token after the first (from the prefill's own logits), as vLLM names it; with
    max_tokens 0 a request only scores its prompt."""

    max_tokens: int = 256
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] | None = None
    seed: int | None = None
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    min_tokens: int = 0
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    n: int = 1
    skip_special_tokens: bool = True
    json_schema: dict | str | None = None
    json_object: bool = False
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    # The one output constraint above, as a `jaxllm.structured.GrammarSpec` (None: free output).
    structured: object = dataclasses.field(default=None, init=False, compare=False, repr=False)

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = [int(t) for t in (self.stop_token_ids or [])]
        self.logit_bias = {int(k): float(v) for k, v in (self.logit_bias or {}).items()}
        self._check()
        self.structured = self._structured()

    def _structured(self):
        from jaxllm.structured import GrammarSpec

        given = {
            "json_schema": self.json_schema,
            "json_object": True if self.json_object else None,
            "regex": self.regex,
            "choice": self.choice,
            "grammar": self.grammar,
        }
        given = {k: v for k, v in given.items() if v is not None}
        if len(given) > 1:
            raise InvalidSamplingParamsError(
                f"give at most one output constraint, got {', '.join(given)}", param=next(iter(given))
            )
        return GrammarSpec.of(*next(iter(given.items()))) if given else None

    def _check(self):
        def bad(msg):
            raise InvalidSamplingParamsError(msg, param=msg.split(" ", 1)[0])

        if not isinstance(self.max_tokens, int) or self.max_tokens < 0:
            bad(f"max_tokens must be an integer >= 0 (0: score the prompt only), got {self.max_tokens!r}")
        if not 0.0 <= self.temperature <= 100.0:
            bad(f"temperature must be in [0, 100], got {self.temperature}")
        if not isinstance(self.top_k, int) or not 0 <= self.top_k < 2**31:
            bad(f"top_k must be an integer >= 0 (0 disables it), got {self.top_k!r}")
        if not 0.0 < self.top_p <= 1.0:
            bad(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0.0 <= self.min_p <= 1.0:
            bad(f"min_p must be in [0, 1], got {self.min_p}")
        if not 0.0 < self.repetition_penalty <= 1e6:
            bad(f"repetition_penalty must be in (0, 1e6], got {self.repetition_penalty}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                bad(f"{name} must be in [-2, 2], got {getattr(self, name)}")
        for tok, b in self.logit_bias.items():
            if not -100.0 <= b <= 100.0:
                bad(f"logit_bias for token {tok} must be in [-100, 100], got {b}")
        if self.seed is not None and not isinstance(self.seed, int):
            bad(f"seed must be an integer, got {self.seed!r}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            bad("stop must be a non-empty string or a list of non-empty strings")
        if not isinstance(self.min_tokens, int) or not 0 <= self.min_tokens <= self.max_tokens:
            bad(f"min_tokens must be in [0, max_tokens], got {self.min_tokens!r}")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_TOP_LOGPROBS:
            bad(f"logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {self.logprobs}")
        if self.prompt_logprobs is not None and not (
            isinstance(self.prompt_logprobs, int) and 0 <= self.prompt_logprobs <= MAX_TOP_LOGPROBS
        ):
            bad(f"prompt_logprobs must be an integer in [0, {MAX_TOP_LOGPROBS}], got {self.prompt_logprobs!r}")
        if not isinstance(self.n, int) or self.n < 1:
            bad(f"n must be an integer >= 1, got {self.n!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def check_vocab(self, vocab_size: int):
        """Token ids in logit_bias and stop_token_ids must exist in the vocabulary."""
        for name, toks in (("logit_bias", list(self.logit_bias)), ("stop_token_ids", self.stop_token_ids)):
            for tok in toks:
                if not 0 <= tok < vocab_size:
                    raise InvalidSamplingParamsError(
                        f"{name}: token id {tok} is outside the vocabulary [0, {vocab_size})", param=name
                    )

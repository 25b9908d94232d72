"""Structured-output constraints as llguidance grammars: what a request asks for, compiled and checked once.

A request constrains its output with one of: a JSON schema, any JSON object, a regular expression, a
choice among strings, or a Lark grammar (`GrammarSpec`). `GrammarCompiler` turns a spec into an llguidance
grammar for one tokenizer, checks it (a bad schema, regex or grammar is an `InvalidRequestError` naming the
problem), and makes a `Matcher` per sequence.
"""

from __future__ import annotations

import dataclasses
import functools
import json

from jaxllm.errors import InvalidRequestError

KINDS = ("json_schema", "json_object", "regex", "choice", "grammar")
# JSON on one line, items and keys separated by ", " and ": ": with free whitespace allowed, small models fill
# the output with newlines and never close the object (a schema's "x-guidance" options override these).
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


@dataclasses.dataclass(frozen=True)
class GrammarSpec:
    """kind: one of KINDS; value: the schema (as a JSON string), the regex, the choices (a tuple of
    strings) or the Lark grammar (None for json_object)."""

    kind: str
    value: str | tuple[str, ...] | None = None

    @classmethod
    def of(cls, kind: str, value=None) -> GrammarSpec:
        """A spec from request values, checked for type (not for meaning: see `GrammarCompiler.compile`)."""
        if kind not in KINDS:
            raise InvalidRequestError(f"unknown structured output kind {kind!r}: use one of {', '.join(KINDS)}")
        if kind == "json_object":
            return cls(kind)
        if kind == "json_schema":
            if isinstance(value, str):
                try:
                    value = json.loads(value)
                except json.JSONDecodeError as e:
                    raise InvalidRequestError(f"json_schema is not valid JSON: {e}", param=kind) from None
            if not isinstance(value, dict | bool):
                raise InvalidRequestError("json_schema must be a JSON schema object", param=kind)
            return cls(kind, json.dumps(value))  # key order kept: properties are generated in schema order
        if kind == "choice":
            if isinstance(value, str) or not value or not all(isinstance(c, str) for c in value):
                raise InvalidRequestError("choice must be a non-empty list of strings", param=kind)
            return cls(kind, tuple(value))
        if kind in ("regex", "grammar"):
            if not isinstance(value, str) or not value:
                raise InvalidRequestError(f"{kind} must be a non-empty string", param=kind)
            return cls(kind, value)
        return cls(kind)

    def to_llguidance(self) -> str:
        """The llguidance grammar (unchecked)."""
        from llguidance import LLMatcher

        if self.kind == "json_schema":
            return LLMatcher.grammar_from_json_schema(self.value, defaults=JSON_OPTIONS)
        if self.kind == "json_object":
            return LLMatcher.grammar_from_json_schema({"type": "object"}, defaults=JSON_OPTIONS)
        if self.kind == "regex":
            return LLMatcher.grammar_from_regex(self.value)
        if self.kind == "choice":  # Lark string literals take JSON's escapes
            return LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in self.value))
        return LLMatcher.grammar_from_lark(self.value)


class GrammarCompiler:
    """Grammars for one tokenizer (a `jaxllm.tokenizer.Tokenizer` over `vocab_size` model tokens, with the
    model's end-of-sequence ids): checked once per spec, and a fresh `Matcher` per sequence."""

    def __init__(self, tokenizer, vocab_size: int, eos_ids: tuple[int, ...]):
        self.tokenizer, self.vocab_size, self.eos_ids = tokenizer, vocab_size, tuple(eos_ids)

    @functools.cached_property
    def ll_tokenizer(self):
        """llguidance's view of the tokenizer (built once: about a second for a 50k vocabulary)."""
        from llguidance import LLTokenizer

        eos = list(self.eos_ids) or ([self.tokenizer.eos_id] if self.tokenizer.eos_id is not None else None)
        return LLTokenizer(self.tokenizer.backend.to_str(), n_vocab=self.vocab_size, eos_token=eos)

    @functools.lru_cache(maxsize=256)  # noqa: B019 (one compiler per engine: the cache lives as long as it)
    def compile(self, spec: GrammarSpec) -> str:
        """The checked llguidance grammar of `spec`; `InvalidRequestError` saying what is wrong otherwise."""
        from llguidance import LLMatcher

        try:
            grammar = spec.to_llguidance()
        except (ValueError, TypeError) as e:
            raise InvalidRequestError(f"{spec.kind}: {e}", param=spec.kind) from None
        error = LLMatcher.validate_grammar(grammar, self.ll_tokenizer)
        if error:
            raise InvalidRequestError(f"{spec.kind} is not usable: {_first_line(error)}", param=spec.kind)
        return grammar

    def matcher(self, spec: GrammarSpec) -> Matcher:
        """A matcher at the start of `spec`'s grammar, for one sequence."""
        from llguidance import LLMatcher

        return Matcher(LLMatcher(self.ll_tokenizer, self.compile(spec), log_level=0), self.vocab_size)


class Matcher:
    """One sequence's place in its grammar: which tokens may come next, fed the tokens that came."""

    def __init__(self, ll_matcher, vocab_size: int):
        self.ll, self.vocab_size = ll_matcher, vocab_size

    @property
    def words(self) -> int:
        """int32 words of a mask row: one bit per token."""
        return (self.vocab_size + 31) // 32

    def fill(self, row) -> None:
        """Write the allowed next tokens into `row`, a C-contiguous int32 numpy array of `words` (bit t % 32 of
        word t // 32 set: token t allowed); once the grammar is done, only end-of-sequence tokens are."""
        assert row.dtype.name == "int32" and row.flags["C_CONTIGUOUS"] and row.size == self.words
        self.ll.unsafe_compute_mask_ptr(row.ctypes.data, row.size * 4)

    def accept(self, token: int) -> bool:
        """Advance past `token` (False: the grammar does not allow it; the matcher is then in error)."""
        return bool(self.ll.consume_token(int(token)))

    @property
    def done(self) -> bool:
        """The grammar is complete and takes nothing more (end of sequence is all that may follow)."""
        return bool(self.ll.is_stopped())

    @property
    def accepting(self) -> bool:
        """The output so far is a complete match (it may also go on)."""
        return bool(self.ll.is_accepting())

    @property
    def error(self) -> str:
        return self.ll.get_error() if self.ll.is_error() else ""


def _first_line(text: str) -> str:
    return next((line.strip() for line in text.splitlines() if line.strip()), text)

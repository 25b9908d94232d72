"""Grammars on llguidance for the real SmolLM2 tokenizer: each kind of constraint allows exactly the tokens of
a valid output and refuses an invalid one; bad schemas, regexes and grammars are clear errors; the jitted
bitmask equals llguidance's own reference."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest
from llguidance.numpy import apply_token_bitmask_inplace

from jaxllm.engine.sampling import apply_token_bitmask
from jaxllm.errors import InvalidRequestError
from jaxllm.loading.gguf_file import GGUFFile
from jaxllm.structured import GrammarCompiler, GrammarSpec
from jaxllm.tokenizer import Tokenizer

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "color": {"enum": ["red", "green"]},
        "tags": {"type": "array", "items": {"type": "string"}},
    },
    "required": ["name", "age", "color", "tags"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def compiler(smollm2_path):
    tok = Tokenizer.from_gguf_metadata(GGUFFile(smollm2_path).metadata)
    return GrammarCompiler(tok, tok.vocab_size, (tok.eos_id,))


def _walk(compiler, spec: GrammarSpec, text: str) -> tuple[bool, bool]:
    """Feed `text`'s tokens through a matcher, each checked against the mask first: (every token was
    allowed, the grammar is complete afterwards)."""
    m = compiler.matcher(spec)
    row = np.zeros((m.words,), np.int32)
    for t in compiler.tokenizer.encode(text, add_special_tokens=False):
        m.fill(row)
        if not (row[t // 32] >> (t % 32)) & 1 or not m.accept(t):
            return False, False
    return True, m.accepting


@pytest.mark.parametrize(
    "kind, value, good, bad",
    [
        ("json_schema", SCHEMA, json.dumps({"name": "Ann", "age": 3, "color": "red", "tags": ["a"]}), '{"name": 3}'),
        ("json_object", None, '{"a": [1, 2]}', "[1, 2]"),
        ("regex", r"\d{3}-[a-z]+", "123-abc", "12-abc"),
        ("choice", ["yes", "no", 'it\'s "complicated"'], 'it\'s "complicated"', "maybe"),
        ("grammar", 'start: "(" NUMBER ("+" NUMBER)* ")"\nNUMBER: /[0-9]+/', "(1+22+3)", "(1+)"),
    ],
)
def test_each_kind_allows_a_valid_output_and_refuses_an_invalid_one(compiler, kind, value, good, bad):
    spec = GrammarSpec.of(kind, value)
    assert _walk(compiler, spec, good) == (True, True)
    assert _walk(compiler, spec, bad) != (True, True)


def test_a_finished_grammar_allows_only_the_end_of_sequence(compiler):
    m = compiler.matcher(GrammarSpec.of("choice", ["yes", "no"]))
    for t in compiler.tokenizer.encode("yes", add_special_tokens=False):
        assert m.accept(t)
    row = np.zeros((m.words,), np.int32)
    m.fill(row)
    allowed = [t for t in range(compiler.vocab_size) if (row[t // 32] >> (t % 32)) & 1]
    assert allowed == [compiler.tokenizer.eos_id]


@pytest.mark.parametrize(
    "kind, value, words",
    [
        ("regex", "(ab", "regex"),
        ("grammar", "start: foo", "grammar"),
        ("json_schema", {"type": "no-such-type"}, "json_schema"),
        ("json_schema", "{not json", "not valid JSON"),
        ("choice", [], "non-empty list"),
        ("nope", None, "unknown structured output kind"),
    ],
)
def test_bad_constraints_are_clear_errors(compiler, kind, value, words):
    with pytest.raises(InvalidRequestError, match=words):
        compiler.compile(GrammarSpec.of(kind, value))


def test_the_jitted_bitmask_equals_llguidance_s_reference():
    rng = np.random.default_rng(0)
    vocab = 1000  # not a multiple of 32
    logits = rng.normal(size=(3, vocab)).astype(np.float32)
    mask = rng.integers(-(2**31), 2**31, size=(3, (vocab + 31) // 32), dtype=np.int64).astype(np.int32)
    want = logits.copy()
    apply_token_bitmask_inplace(want[:2], mask[:2])  # row 2 is not constrained
    got = apply_token_bitmask(jnp.asarray(logits), jnp.asarray(mask), jnp.asarray([True, True, False]))
    np.testing.assert_array_equal(np.asarray(got), want)

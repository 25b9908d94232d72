"""The tokenizer built from GGUF metadata against transformers' GGUF tokenizer; incremental detokenization."""

from __future__ import annotations

import pytest

from jaxllm.tokenizer import IncrementalDetokenizer

TEXTS = [
    "Hello, world!",
    "The capital of France is Paris.",
    "  leading spaces and\ttabs\t\tand   runs    of     spaces  ",
    "naïve café déjà vu — “quotes” and ‘apostrophes’",
    "日本語のテキストと中文文本，还有한국어.",
    "emoji 🤖🚀👍🏽 and flags 🇫🇷🇯🇵",
    "def f(x):\n    return {'a': [1, 2, 3]}  # comment\n\n\nclass A:\n\tpass\n",
    "numbers 1234567890 3.14159 -42 1e-5 0x1F",
    "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
    "line1\r\nline2\n\n\nline3   \n",
    "Ünïcödé Ωμέγα Привет мир مرحبا بالعالم",
    "",
]


@pytest.mark.slow
def test_gguf_tokenizer_matches_transformers(smollm2, hf_smollm2):
    _, hf_tok = hf_smollm2
    for text in TEXTS:
        assert smollm2.tokenizer.encode(text) == hf_tok(text)["input_ids"], text


@pytest.mark.slow
def test_streamed_text_equals_final_text(smollm2):
    tok = smollm2.tokenizer
    for text in TEXTS:
        ids = tok.encode(text, add_special_tokens=False)
        detok = IncrementalDetokenizer(tok)
        pieces = [detok.add([i]) for i in ids]
        pieces.append(detok.flush())
        assert "".join(pieces) == tok.decode(ids), text
        assert all("\ufffd" not in p for p in pieces), text

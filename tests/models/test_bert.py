"""The BERT-family encoder (`jaxllm.models.bert`) and `Embedder`: all-MiniLM-L6-v2 against sentence-transformers,
tiny random BERT and RoBERTa against transformers' hidden states, sentence-transformers folder configs, pooling
modes against NumPy, `dimensions` and too long inputs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from jaxllm.embeddings import Embedder, is_encoder_model, pool
from jaxllm.errors import ContextLengthError, InvalidRequestError, UnsupportedModelError
from jaxllm.loading.sentence_transformers import load_encoder
from jaxllm.models import bert
from tests.conftest import make_tiny_model, minilm_folder, write_byte_tokenizer

SENTENCES = [
    "Hello world.",
    "The quick brown fox jumps over the lazy dog.",
    "A",
    "JAX compiles numerical programs with XLA for CPUs, GPUs and TPUs.",
    "Ünïcödé, çafé and naïve résumés: accents are stripped by the uncased tokenizer!",
    "What is the capital of France? Paris, of course, as everybody knows.",
    "1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20",
    "Sentence embeddings map text to vectors so that similar meanings lie close together, which is what "
    "semantic search, clustering and retrieval-augmented generation rely on; this sentence is long on purpose "
    "so that its batch is padded to a larger bucket than the short ones, and it goes on a little longer still.",
    "   leading and trailing spaces   ",
    "Emoji 🙂 and symbols #$%&*() in one line",
    "def f(x):\n    return x * 2",
    "Short again.",
]


@pytest.fixture(scope="module")
def minilm():
    return Embedder.load(minilm_folder())


@pytest.fixture(scope="module")
def st_minilm():
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(minilm_folder()), device="cpu")


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


@pytest.mark.slow
def test_minilm_equals_sentence_transformers(minilm, st_minilm):
    assert (minilm.dim, minilm.max_model_len, minilm.pooling, minilm.normalized) == (384, 256, "mean", True)
    ids = [minilm.tokenizer.encode(s) for s in SENTENCES]
    assert ids == [st_minilm.tokenizer(s)["input_ids"] for s in SENTENCES]
    assert len({len(i) for i in ids}) > 8  # padded together in batches
    got = minilm.embed(SENTENCES)
    want = st_minilm.encode(SENTENCES, convert_to_numpy=True)
    assert got.vectors.shape == want.shape and got.vectors.dtype == np.float32
    cos = _cosines(got.vectors, want)
    assert (cos >= 1 - 1e-4).all(), cos
    assert got.prompt_tokens == sum(map(len, ids))
    np.testing.assert_allclose(np.linalg.norm(got.vectors, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(minilm.embed(ids).vectors, got.vectors, atol=1e-6)  # token ids used as given
    alone = minilm.embed([SENTENCES[7]]).vectors[0]
    np.testing.assert_allclose(alone, got.vectors[7], atol=2e-6)  # padding changes nothing


@pytest.mark.slow
def test_minilm_compiles_one_shape_per_bucket(minilm):
    minilm.embed(["one two three", "four five six seven eight nine"])  # rows 2, bucket 16
    before = minilm._step._cache_size()
    minilm.embed(["ten eleven", "a b c d e f g h"])
    assert minilm._step._cache_size() == before


@pytest.mark.slow
def test_dimensions_truncate_and_renormalise(minilm):
    full = minilm.embed(SENTENCES[:3]).vectors
    cut = minilm.embed(SENTENCES[:3], dimensions=64).vectors
    assert cut.shape == (3, 64)
    np.testing.assert_allclose(cut, full[:, :64] / np.linalg.norm(full[:, :64], axis=1, keepdims=True), atol=1e-6)
    assert minilm.embed(SENTENCES[:1], dimensions=384).vectors.shape == (1, 384)
    for bad in (0, 385, -1, True, 2.0):
        with pytest.raises(InvalidRequestError, match="dimensions") as e:
            minilm.embed(SENTENCES[:1], dimensions=bad)
        assert e.value.param == "dimensions"


@pytest.mark.slow
def test_too_long_inputs_are_refused(minilm):
    long_text = "word " * 300
    with pytest.raises(ContextLengthError, match=r"input 1 is \d+ tokens long; .* at most 256") as e:
        minilm.embed(["fine", long_text])
    assert "\n" not in str(e.value)
    with pytest.raises(ContextLengthError, match="input 0 is 257 tokens"):
        minilm.embed([[101] * 257])
    assert minilm.embed([[101] * 256]).vectors.shape == (1, 384)
    with pytest.raises(InvalidRequestError, match="outside the vocabulary"):
        minilm.embed([[101, 30522, 102]])
    with pytest.raises(InvalidRequestError, match="input"):
        minilm.embed([])


# ---- tiny random encoders against transformers --------------------------------------------------------------
TINY = dict(
    vocab_size=300,
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=96,
    max_position_embeddings=64,
    hidden_act="gelu",
)


def make_tiny_encoder(folder: Path, kind: str, seed: int = 0):
    """A random transformers encoder saved to `folder`: 'bert' (BertModel: names without a prefix), 'bert-mlm'
    (BertForMaskedLM: names under 'bert.'), 'roberta' (positions after the padding id). Returns the encoder."""
    import transformers

    torch.manual_seed(seed)
    if kind == "roberta":
        cfg = transformers.RobertaConfig(**{**TINY, "max_position_embeddings": 66}, pad_token_id=1, type_vocab_size=1)
        model = transformers.RobertaModel(cfg)
    else:
        cfg = transformers.BertConfig(**TINY)
        model = transformers.BertModel(cfg) if kind == "bert" else transformers.BertForMaskedLM(cfg)
    with torch.no_grad():  # LayerNorms away from their identity init so that they are tested
        for name, p in model.named_parameters():
            if "LayerNorm" in name:
                p.add_(0.3 * torch.randn_like(p))
    model.save_pretrained(folder, safe_serialization=True)
    write_byte_tokenizer(folder, TINY["vocab_size"])
    model = model.eval()
    return model.bert if kind == "bert-mlm" else model


@pytest.fixture(scope="module")
def tiny_encoders(tmp_path_factory):
    out = {}
    for kind in ("bert", "bert-mlm", "roberta"):
        folder = tmp_path_factory.mktemp(f"tiny-{kind}")
        out[kind] = (folder, make_tiny_encoder(folder, kind))
    return out


def _padded(lengths, seed=0, pad_id=0):
    """tokens [len(lengths), max] of random ids 3.. with `pad_id` after each row's length, and the mask."""
    rng = np.random.default_rng(seed)
    t = max(lengths)
    tokens = np.full((len(lengths), t), pad_id, np.int32)
    mask = np.zeros((len(lengths), t), np.int32)
    for r, n in enumerate(lengths):
        tokens[r, :n] = rng.integers(3, TINY["vocab_size"], n)
        mask[r, :n] = 1
    return tokens, mask


@pytest.mark.parametrize("kind", ["bert", "bert-mlm", "roberta"])
def test_tiny_encoder_hidden_states_equal_transformers(tiny_encoders, kind):
    folder, hf = tiny_encoders[kind]
    loaded = load_encoder(folder)
    assert loaded.max_len == 64
    pad_id = 1 if kind == "roberta" else 0
    tokens, mask = _padded([5, 17, 1, 64], pad_id=pad_id)
    got = np.asarray(bert.forward(loaded.model, loaded.params, tokens, mask))
    with torch.no_grad():
        want = hf(torch.tensor(tokens, dtype=torch.long), attention_mask=torch.tensor(mask)).last_hidden_state.numpy()
    real = mask.astype(bool)
    np.testing.assert_allclose(got[real], want[real], atol=1e-4, rtol=1e-4)
    garbage = np.where(mask > 0, tokens, 7)  # what padding holds does not matter
    again = np.asarray(bert.forward(loaded.model, loaded.params, garbage, mask))
    np.testing.assert_allclose(again[real], got[real], atol=1e-5)


def test_folder_without_modules_json_pools_mean_and_normalises(tiny_encoders):
    folder, hf = tiny_encoders["bert"]
    emb = Embedder.load(folder)
    assert (emb.pooling, emb.normalized, emb.dim, emb.max_model_len) == ("mean", True, 64, 64)
    tokens, mask = _padded([4, 9, 2], seed=3)
    with torch.no_grad():
        h = hf(torch.tensor(tokens, dtype=torch.long), attention_mask=torch.tensor(mask)).last_hidden_state.numpy()
    mean = (h * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
    want = mean / np.linalg.norm(mean, axis=1, keepdims=True)
    got = emb.embed([list(map(int, row[m > 0])) for row, m in zip(tokens, mask, strict=True)])
    np.testing.assert_allclose(got.vectors, want, atol=1e-5)
    assert got.prompt_tokens == 15


def _sentence_folder(src: Path, dst: Path, pooling: dict, normalize: bool, extra: dict | None = None) -> Path:
    shutil.copytree(src, dst)
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]
    if normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
    (dst / "modules.json").write_text(json.dumps(modules))
    (dst / "1_Pooling").mkdir()
    (dst / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 64, **pooling}))
    (dst / "sentence_bert_config.json").write_text(
        json.dumps({"max_seq_length": 12, "do_lower_case": True, **(extra or {})})
    )
    return dst


def test_sentence_transformers_folder_sets_pooling_normalisation_and_length(tiny_encoders, tmp_path):
    src, hf = tiny_encoders["bert"]
    folder = _sentence_folder(src, tmp_path / "cls", {"pooling_mode_cls_token": True}, normalize=False)
    emb = Embedder.load(folder)
    assert (emb.pooling, emb.normalized, emb.max_model_len) == ("cls", False, 12)
    tokens, mask = _padded([6, 12], seed=5)
    with torch.no_grad():
        h = hf(torch.tensor(tokens, dtype=torch.long), attention_mask=torch.tensor(mask)).last_hidden_state.numpy()
    got = emb.embed([list(map(int, row[m > 0])) for row, m in zip(tokens, mask, strict=True)]).vectors
    np.testing.assert_allclose(got, h[:, 0], atol=1e-4)  # the first token's state, not normalised
    with pytest.raises(ContextLengthError, match="at most 12"):
        emb.embed([[5] * 13])
    assert emb.tokenizer.encode("HeLLo") == emb.tokenizer.encode("hello")  # do_lower_case

    new_style = _sentence_folder(src, tmp_path / "max", {"pooling_mode": "max"}, normalize=True)
    assert Embedder.load(new_style).pooling == "max"
    both = {"pooling_mode_cls_token": True, "pooling_mode_mean_tokens": True}
    with pytest.raises(UnsupportedModelError, match="concatenates"):
        Embedder.load(_sentence_folder(src, tmp_path / "both", both, normalize=True))


def test_is_encoder_model(tiny_encoders, tmp_path):
    llama = tmp_path / "llama"
    make_tiny_model(llama, "llama")
    assert is_encoder_model(tiny_encoders["bert"][0]) and is_encoder_model(tiny_encoders["roberta"][0])
    assert not is_encoder_model(llama)
    assert not is_encoder_model(tmp_path / "absent") and not is_encoder_model("smollm2")
    with pytest.raises(UnsupportedModelError, match="not an encoder"):
        Embedder.load(llama)


# ---- pooling against NumPy ----------------------------------------------------------------------------------
def _numpy_pool(h: np.ndarray, m: np.ndarray, mode: str) -> np.ndarray:
    out = []
    for row, mask in zip(h, m, strict=True):
        real = row[mask > 0]
        if mode == "cls":
            out.append(real[0])
        elif mode == "lasttoken":
            out.append(real[-1])
        elif mode == "mean":
            out.append(real.mean(0))
        elif mode == "mean_sqrt_len":
            out.append(real.sum(0) / np.sqrt(len(real)))
        elif mode == "max":
            out.append(real.max(0))
        elif mode == "weightedmean":
            w = np.arange(1, len(real) + 1, dtype=np.float64)[:, None]
            out.append((real * w).sum(0) / w.sum())
    return np.stack(out)


@pytest.mark.parametrize("mode", ["cls", "lasttoken", "mean", "mean_sqrt_len", "max", "weightedmean"])
def test_pooling_modes_equal_numpy(mode):
    rng = np.random.default_rng(1)
    h = rng.normal(size=(4, 7, 5)).astype(np.float32)
    m = np.array([[1] * 7, [1, 1, 1, 0, 0, 0, 0], [0, 0, 0, 1, 1, 1, 1], [1, 0, 0, 0, 0, 0, 0]], np.int32)
    np.testing.assert_allclose(np.asarray(pool(h, m, mode)), _numpy_pool(h, m, mode), rtol=1e-5, atol=1e-6)


def test_unknown_pooling_mode_is_refused():
    with pytest.raises(InvalidRequestError, match="pooling"):
        pool(np.zeros((1, 2, 3), np.float32), np.ones((1, 2), np.int32), "median")

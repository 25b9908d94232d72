"""Decoder embeddings (`LLM.embed`): the final hidden state of the pure forward, pooled and normalised; padding
and batching change nothing; a folder's `modules.json` sets the pooling. And OpenAI's response body."""

from __future__ import annotations

import base64
import json
import shutil

import jax
import numpy as np
import pytest
import torch

import jaxllm
from jaxllm import LLM
from jaxllm.embeddings import EmbeddingResult, embeddings_body
from jaxllm.errors import ContextLengthError, InvalidRequestError
from tests.conftest import make_tiny_model

PROMPT = [1, 17, 42, 99, 5, 250, 8, 64, 77, 3, 120, 45, 6]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(folder, transformers model, LLM) of a tiny random Llama."""
    folder = tmp_path_factory.mktemp("tiny-llama-embed")
    hf = make_tiny_model(folder, "llama", seed=3)
    with torch.no_grad():  # a final norm scale away from ones, so that a missing final norm shows
        hf.model.norm.weight.normal_(1, 0.5)
    hf.save_pretrained(folder, safe_serialization=True)
    return folder, hf, LLM(str(folder), max_model_len=64, max_num_seqs=4, progress=False)


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _hf_final_states(hf, ids: list[int]) -> np.ndarray:
    """transformers' last hidden states [seq, hidden] (after the final norm) of one unpadded sequence."""
    with torch.no_grad():
        return hf(torch.tensor([ids]), output_hidden_states=True).hidden_states[-1][0].numpy()


def test_last_token_embedding_is_the_final_hidden_state(tiny):
    folder, hf, llm = tiny
    got = llm.embed([PROMPT])
    assert isinstance(got, EmbeddingResult) and got.vectors.shape == (1, 64) and got.prompt_tokens == len(PROMPT)
    loaded = jaxllm.load(str(folder), progress=False)
    _, hidden = jax.jit(loaded.forward, static_argnames="hidden_layers")(
        loaded.params, np.asarray([PROMPT]), hidden_layers=(-1,)
    )
    last = np.asarray(hidden[0, 0, -1], np.float64)
    scale = np.asarray(loaded.params["params"]["final_norm"]["scale"], np.float64)
    state = scale * last / np.sqrt(np.mean(last**2) + loaded.config.rms_norm_eps)  # the final RMSNorm
    np.testing.assert_allclose(got.vectors[0], _unit(state), atol=1e-5)
    np.testing.assert_allclose(got.vectors[0], _unit(_hf_final_states(hf, PROMPT)[-1]), atol=1e-4)


def test_mean_pooling_is_the_mean_over_real_tokens(tiny):
    _, hf, llm = tiny
    prompts = [PROMPT, PROMPT[:4], [9] * 30]
    got = llm.embed(prompts, pooling="mean").vectors
    want = np.stack([_unit(_hf_final_states(hf, p).mean(0)) for p in prompts])
    np.testing.assert_allclose(got, want, atol=1e-4)
    last = llm.embed(prompts).vectors
    assert np.abs(got - last).max() > 1e-2  # a different pooling, not the default again


def test_a_batch_of_different_lengths_equals_one_at_a_time(tiny):
    _, _, llm = tiny
    rng = np.random.default_rng(0)
    prompts = [[1, *map(int, rng.integers(3, 300, n - 1))] for n in (1, 7, 16, 17, 40, 64, 3)]
    batch = llm.embed(prompts).vectors
    alone = np.concatenate([llm.embed([p]).vectors for p in prompts])
    np.testing.assert_allclose(batch, alone, atol=2e-6)
    text = "the cat sat on the mat"
    np.testing.assert_allclose(llm.embed([text]).vectors, llm.embed([llm.tokenizer.encode(text)]).vectors, atol=1e-6)
    assert llm.embed(text).vectors.shape == (1, 64)  # a lone string is one input


def test_dimensions_and_length_limits(tiny):
    _, _, llm = tiny
    full = llm.embed([PROMPT]).vectors
    cut = llm.embed([PROMPT], dimensions=16).vectors
    np.testing.assert_allclose(cut, _unit(full[:, :16]), atol=1e-6)
    for bad in (0, 65):
        with pytest.raises(InvalidRequestError, match="dimensions"):
            llm.embed([PROMPT], dimensions=bad)
    with pytest.raises(ContextLengthError, match="input 1 is 65 tokens"):
        llm.embed([PROMPT, [5] * 65])
    with pytest.raises(InvalidRequestError, match="pooling"):
        llm.embed([PROMPT], pooling="median")


def test_a_group_of_processes_refuses_embeddings_clearly(tiny, monkeypatch):
    _, _, llm = tiny
    monkeypatch.setattr(llm, "cluster", object())  # as on the leader of a group: its followers replay steps only
    with pytest.raises(InvalidRequestError, match="group of processes"):
        llm.embed([PROMPT])


def test_modules_json_sets_the_decoder_pooling(tiny, tmp_path):
    folder, hf, _ = tiny
    dst = tmp_path / "st-llama"
    shutil.copytree(folder, dst)
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]
    (dst / "modules.json").write_text(json.dumps(modules))
    (dst / "1_Pooling").mkdir()
    (dst / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode": "mean"}))
    llm = LLM(str(dst), max_model_len=64, max_num_seqs=4, progress=False)
    got = llm.embed([PROMPT]).vectors[0]
    np.testing.assert_allclose(got, _hf_final_states(hf, PROMPT).mean(0), atol=1e-4)  # mean, no Normalize module


def test_embeddings_body_float_and_base64():
    vectors = np.array([[0.5, -1.25, 3.0], [1e-3, 0.0, -7.5]], np.float32)
    result = EmbeddingResult(vectors, prompt_tokens=11)
    body = embeddings_body(result, "m", "float")
    assert body["object"] == "list" and body["model"] == "m"
    assert body["usage"] == {"prompt_tokens": 11, "total_tokens": 11}
    assert [d["index"] for d in body["data"]] == [0, 1] and {d["object"] for d in body["data"]} == {"embedding"}
    np.testing.assert_array_equal(np.array([d["embedding"] for d in body["data"]], np.float32), vectors)
    json.dumps(body)
    b64 = embeddings_body(result, "m", "base64")
    decoded = [np.frombuffer(base64.b64decode(d["embedding"]), "<f4") for d in b64["data"]]
    np.testing.assert_array_equal(np.stack(decoded), vectors)
    with pytest.raises(InvalidRequestError, match="encoding_format"):
        embeddings_body(result, "m", "int8")


@pytest.mark.slow
def test_smollm2_last_token_embedding_equals_transformers(smollm2, hf_smollm2):
    model, _ = hf_smollm2
    ids = smollm2.tokenizer.encode("The capital of France is")
    got = smollm2.embed([ids, ids[:3]]).vectors[0]
    with torch.no_grad():
        want = model(torch.tensor([ids]), output_hidden_states=True).hidden_states[-1][0, -1].numpy()
    cos = float(got @ want / np.linalg.norm(want))
    assert cos >= 1 - 1e-4, cos

"""/v1/embeddings through running servers with the openai client: all-MiniLM-L6-v2 served as an embedding model
(generation routes refused), SmolLM2's pooled hidden states from the main server, and `jaxllm serve` of an
encoder folder."""

from __future__ import annotations

import base64

import httpx
import numpy as np
import openai
import pytest

from jaxllm import LLM
from jaxllm.embeddings import Embedder
from jaxllm.serving import create_app
from tests.conftest import make_tiny_model, minilm_folder
from tests.serving.conftest import RunningServer

TEXTS = ["The cat sat on the mat.", "JAX runs on XLA.", "A"]


@pytest.fixture(scope="module")
def minilm():
    return Embedder.load(minilm_folder())


@pytest.fixture(scope="module")
def encoder_server(minilm):
    with RunningServer(create_app(minilm, served_model_name="minilm")) as s:
        yield s


def _vectors(reply) -> np.ndarray:
    return np.array([d.embedding for d in sorted(reply.data, key=lambda d: d.index)], np.float32)


def test_an_encoder_served_gives_its_vectors_to_the_openai_client(encoder_server, minilm):
    client = openai.OpenAI(base_url=encoder_server.url + "/v1", api_key="none", max_retries=0)
    reply = client.embeddings.create(model="minilm", input=TEXTS)
    expected = minilm.embed(TEXTS).vectors
    np.testing.assert_allclose(_vectors(reply), expected, atol=1e-6)
    assert reply.usage.prompt_tokens == sum(len(minilm.tokenizer.encode(t)) for t in TEXTS) > len(TEXTS)
    one = client.embeddings.create(model="minilm", input=TEXTS[1])
    np.testing.assert_allclose(_vectors(one)[0], expected[1], atol=1e-6)
    ids = client.embeddings.create(model="minilm", input=[minilm.tokenizer.encode(t) for t in TEXTS])
    np.testing.assert_allclose(_vectors(ids), expected, atol=1e-6)
    short = client.embeddings.create(model="minilm", input=TEXTS, dimensions=128)
    v = _vectors(short)
    assert v.shape == (3, 128) and np.allclose(np.linalg.norm(v, axis=1), 1, atol=1e-5)


def test_base64_vectors_decode_to_the_float_ones(encoder_server, minilm):
    body = {"model": "minilm", "input": TEXTS, "encoding_format": "base64"}
    data = httpx.post(encoder_server.url + "/v1/embeddings", json=body).json()["data"]
    got = np.stack([np.frombuffer(base64.b64decode(d["embedding"]), "<f4") for d in data])
    np.testing.assert_allclose(got, minilm.embed(TEXTS).vectors, atol=1e-6)


@pytest.mark.parametrize(
    "body,param",
    [
        ({"input": []}, "input"),
        ({"input": ""}, "input"),
        ({"input": "x", "dimensions": 4096}, "dimensions"),
        ({"input": "x", "encoding_format": "hex"}, "encoding_format"),
        ({"input": "word " * 400}, None),
    ],
)
def test_bad_embedding_requests_are_400s(encoder_server, body, param):
    r = httpx.post(encoder_server.url + "/v1/embeddings", json={"model": "minilm", **body})
    assert r.status_code == 400 and r.json()["error"]["message"]
    assert param is None or r.json()["error"]["param"] == param


def test_an_embedding_model_refuses_generation_clearly(encoder_server):
    chat = {"model": "minilm", "messages": [{"role": "user", "content": "Hi"}]}
    for path, body in [("/v1/chat/completions", chat), ("/v1/completions", {"model": "minilm", "prompt": "Hi"})]:
        r = httpx.post(encoder_server.url + path, json=body)
        assert r.status_code == 400 and "embedding model" in r.json()["error"]["message"]
    assert [m["id"] for m in httpx.get(encoder_server.url + "/v1/models").json()["data"]] == ["minilm"]
    assert httpx.post(encoder_server.url + "/tokenize", json={"prompt": "Hi"}).json()["tokens"]


@pytest.mark.slow
def test_a_decoder_serves_its_pooled_hidden_states(server):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
    reply = client.embeddings.create(model="smollm2", input=TEXTS)
    expected = server.state.llm.embed(TEXTS).vectors
    np.testing.assert_allclose(_vectors(reply), expected, atol=1e-5)
    assert np.allclose(np.linalg.norm(expected, axis=1), 1, atol=1e-5)


@pytest.mark.slow
def test_jaxllm_serve_of_an_encoder_folder_serves_embeddings():
    from jaxllm.serving.launch import spawn_server

    proc, url = spawn_server(["--model", str(minilm_folder()), "--served-model-name", "minilm"], timeout=300)
    try:
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
        reply = client.embeddings.create(model="minilm", input=TEXTS)
        assert len(reply.data) == 3 and len(reply.data[0].embedding) == 384
        with pytest.raises(openai.BadRequestError, match="embedding model"):
            client.chat.completions.create(model="minilm", messages=[{"role": "user", "content": "Hi"}])
    finally:
        proc.terminate()
        proc.wait(60)


def test_a_decoder_served_with_mean_pooling_pools_the_mean(tmp_path):
    folder = tmp_path / "tiny"
    make_tiny_model(folder, "llama")
    llm = LLM(str(folder), max_num_seqs=2, max_model_len=128, progress=False)
    with RunningServer(create_app(llm, served_model_name="tiny", warmup=False, pooling="mean")) as s:
        got = httpx.post(s.url + "/v1/embeddings", json={"model": "tiny", "input": TEXTS}).json()["data"]
    vectors = np.array([d["embedding"] for d in got], np.float32)
    np.testing.assert_allclose(vectors, llm.embed(TEXTS, pooling="mean").vectors, atol=1e-5)
    assert not np.allclose(vectors, llm.embed(TEXTS).vectors, atol=1e-3)  # not the last token's

"""End-to-end: the official `openai` client against a real server with the SmolLM2 default model."""

from __future__ import annotations

import concurrent.futures
import json
import time

import httpx
import openai
import pytest

from jaxllm import LLM, SamplingParams

pytestmark = pytest.mark.slow
FRANCE = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def test_models_health_openapi(server, client):
    assert [m.id for m in client.models.list().data] == ["smollm2"]
    assert httpx.get(server.url + "/health").status_code == 200
    spec = httpx.get(server.url + "/openapi.json").json()
    assert "/v1/chat/completions" in spec["paths"] and "ChatCompletionRequest" in spec["components"]["schemas"]


def test_chat_completion(client):
    r = client.chat.completions.create(model="smollm2", messages=FRANCE, max_tokens=24, temperature=0)
    assert "Paris" in r.choices[0].message.content
    assert r.choices[0].finish_reason == "stop" and r.choices[0].message.role == "assistant"
    assert r.usage.prompt_tokens > 10 and r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_chat_stream_equals_non_stream_with_usage(client):
    kw = dict(model="smollm2", messages=FRANCE, max_tokens=20, temperature=0.8, seed=11)
    full = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == full.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens


def test_n_logprobs_and_stop(client):
    r = client.chat.completions.create(
        model="smollm2", messages=FRANCE, max_tokens=8, n=2, temperature=1.0, seed=3, logprobs=True, top_logprobs=2
    )
    assert [c.index for c in r.choices] == [0, 1]
    for c in r.choices:
        assert c.logprobs.content and all(len(t.top_logprobs) == 2 and t.logprob <= 0 for t in c.logprobs.content)
    r = client.chat.completions.create(model="smollm2", messages=FRANCE, max_tokens=24, temperature=0, stop=["Paris"])
    assert r.choices[0].finish_reason == "stop" and "Paris" not in r.choices[0].message.content


def test_completions_stream_and_not(client):
    kw = dict(model="smollm2", prompt="The capital of France is", max_tokens=8, temperature=0, logprobs=1)
    full = client.completions.create(**kw)
    assert full.choices[0].text and len(full.choices[0].logprobs.tokens) == full.usage.completion_tokens
    text = "".join(c.choices[0].text for c in client.completions.create(stream=True, **kw) if c.choices)
    assert text == full.choices[0].text
    two = client.completions.create(model="smollm2", prompt=["One, two,", "A, B,"], max_tokens=4, temperature=0)
    assert [c.index for c in two.choices] == [0, 1] and two.usage.completion_tokens <= 8


def test_16_concurrent_streams_equal_offline(server, client, smollm2):
    prompts = [f"Write one sentence about the number {i}." for i in range(16)]

    def stream(i):
        chunks = client.chat.completions.create(
            model="smollm2",
            messages=[{"role": "user", "content": prompts[i]}],
            max_tokens=24,
            temperature=0.8,
            seed=100 + i,
            stream=True,
        )
        return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        online = list(pool.map(stream, range(16)))
    offline_llm = LLM(loaded=smollm2.loaded, max_num_seqs=16, max_model_len=1024)
    chats = [offline_llm.apply_chat_template([{"role": "user", "content": p}]) for p in prompts]
    params = [SamplingParams(max_tokens=24, temperature=0.8, seed=100 + i) for i in range(16)]
    offline = [o.outputs[0].text for o in offline_llm.generate(chats, params, use_tqdm=False)]
    assert online == offline


def _post(server, path, body, headers=None):
    data = body if isinstance(body, bytes | str) else json.dumps(body)
    return httpx.post(
        server.url + path, content=data, headers={"content-type": "application/json", **(headers or {})}, timeout=60
    )


MSG = [{"role": "user", "content": "Hi"}]


@pytest.mark.parametrize(
    "body,status,param,code",
    [
        (b"{not json", 400, None, None),
        ({"model": "smollm2"}, 400, "messages", None),
        ({"model": "smollm2", "messages": [{"role": "wizard", "content": "x"}]}, 400, "messages.0.role", None),
        ({"model": "smollm2", "messages": MSG, "temperature": -0.5}, 400, "temperature", None),
        ({"model": "smollm2", "messages": MSG, "top_p": 0}, 400, "top_p", None),
        ({"model": "smollm2", "messages": MSG, "top_p": 1.5}, 400, "top_p", None),
        ({"model": "smollm2", "messages": MSG, "n": 0}, 400, "n", None),
        ({"model": "smollm2", "messages": MSG, "max_tokens": -3}, 400, "max_tokens", None),
        ({"model": "smollm2", "messages": MSG, "max_tokens": 5000}, 400, "max_tokens", "context_length_exceeded"),
        ({"model": "gpt-17", "messages": MSG}, 404, "model", "model_not_found"),
        ({"model": "smollm2", "messages": MSG, "logit_bias": {"abc": 1}}, 400, "logit_bias", None),
        ({"model": "smollm2", "messages": MSG, "logit_bias": {"5": 500}}, 400, "logit_bias.5", None),
        ({"model": "smollm2", "messages": MSG, "logit_bias": {"999999": 1}}, 400, "logit_bias", None),
    ],
)
def test_errors_are_openai_objects_and_the_server_keeps_serving(server, body, status, param, code):
    r = _post(server, "/v1/chat/completions", body)
    assert r.status_code == status
    err = r.json()["error"]
    assert err["message"] and err["type"] and err["param"] == param and err["code"] == code
    ok = _post(server, "/v1/chat/completions", {"model": "smollm2", "messages": MSG, "max_tokens": 2})
    assert ok.status_code == 200


def test_one_model_by_its_id(server, client):
    assert client.models.retrieve("smollm2").id == "smollm2"
    r = httpx.get(server.url + "/v1/models/gpt-17")
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


def test_cors_preflight_is_answered_for_allowed_origins_only(server, small_server):
    ask = {"access-control-request-method": "POST", "access-control-request-headers": "authorization,content-type"}
    url = small_server.url + "/v1/chat/completions"
    ok = httpx.options(url, headers={"origin": "http://localhost:3000", **ask})  # no API key: preflights carry none
    assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == "http://localhost:3000"
    assert "POST" in ok.headers["access-control-allow-methods"]
    assert "authorization" in ok.headers["access-control-allow-headers"].lower()
    assert httpx.options(url, headers={"origin": "http://evil.example", **ask}).status_code == 400
    body = {"model": "smollm2", "messages": MSG, "max_tokens": 2}
    headers = {"authorization": "Bearer sekrit", "origin": "http://localhost:3000"}
    assert _post(small_server, "/v1/chat/completions", body, headers).headers["access-control-allow-origin"]
    default = httpx.options(server.url + "/v1/chat/completions", headers={"origin": "http://localhost:3000", **ask})
    assert default.status_code == 405 and "access-control-allow-origin" not in default.headers  # none by default


def test_oversized_body_is_413(server):
    r = _post(server, "/v1/completions", {"model": "smollm2", "prompt": "x" * 100_000})
    assert r.status_code == 413 and r.json()["error"]["type"] == "invalid_request_error"


def test_unknown_route_is_an_openai_404(server):
    r = httpx.get(server.url + "/v1/nothing")
    assert r.status_code == 404 and "error" in r.json()


def test_api_key(small_server):
    body = {"model": "smollm2", "messages": MSG, "max_tokens": 2}
    assert _post(small_server, "/v1/chat/completions", body).status_code == 401
    bad = _post(small_server, "/v1/chat/completions", body, {"authorization": "Bearer wrong"})
    assert bad.status_code == 401 and bad.json()["error"]["code"] == "invalid_api_key"
    good = _post(small_server, "/v1/chat/completions", body, {"authorization": "Bearer sekrit"})
    assert good.status_code == 200
    assert httpx.get(small_server.url + "/health").status_code == 200  # health needs no key


def _stream_lines(server, body, n_lines):
    """Open a stream, read n_lines of it, then hang up."""
    auth = {"authorization": "Bearer sekrit"}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, headers=auth, timeout=60) as r:
        assert r.status_code == 200
        got = 0
        for line in r.iter_lines():
            got += bool(line)
            if got >= n_lines:
                break


def _running(server) -> float:
    text = httpx.get(server.url + "/metrics").text
    return float(next(ln.split()[-1] for ln in text.splitlines() if ln.startswith("jaxllm_running_sequences")))


def test_disconnect_frees_the_slot(small_server):
    long = {"model": "smollm2", "messages": MSG, "max_tokens": 900, "min_tokens": 900, "stream": True, "temperature": 0}
    _stream_lines(small_server, long, 3)
    assert small_server.state.metrics.generated_tokens._value.get() < 890  # hung up long before the end
    deadline = time.monotonic() + 10
    while _running(small_server) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _running(small_server) == 0
    t = time.monotonic()
    r = _post(
        small_server,
        "/v1/chat/completions",
        {"model": "smollm2", "messages": MSG, "max_tokens": 2},
        {"authorization": "Bearer sekrit"},
    )
    assert r.status_code == 200 and time.monotonic() - t < 20


def test_queue_full_is_429_then_recovers(small_server):
    auth = {"authorization": "Bearer sekrit"}
    long = {"model": "smollm2", "messages": MSG, "max_tokens": 200, "min_tokens": 200, "stream": True, "temperature": 0}
    with (
        httpx.Client(timeout=60) as c,
        c.stream("POST", small_server.url + "/v1/chat/completions", json=long, headers=auth) as first,
    ):
        lines = first.iter_lines()  # kept referenced: dropping the iterator would close the connection
        next(lines)  # the first request holds the only slot
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            waiting = pool.submit(
                _post,
                small_server,
                "/v1/chat/completions",
                {"model": "smollm2", "messages": MSG, "max_tokens": 2},
                auth,
            )
            deadline = time.monotonic() + 10
            while small_server.state.engine.stats.waiting < 1 and time.monotonic() < deadline:
                time.sleep(0.05)
            third = _post(
                small_server, "/v1/chat/completions", {"model": "smollm2", "messages": MSG, "max_tokens": 2}, auth
            )
            assert third.status_code == 429 and third.json()["error"]["type"] == "rate_limit_error"
    assert waiting.result().status_code == 200


def test_shutting_down_is_503(small_server):
    engine = small_server.state.engine
    engine.accepting = False
    try:
        assert httpx.get(small_server.url + "/health").status_code == 503
        r = _post(
            small_server,
            "/v1/chat/completions",
            {"model": "smollm2", "messages": MSG},
            {"authorization": "Bearer sekrit"},
        )
        assert r.status_code == 503 and r.json()["error"]["type"] == "service_unavailable"
    finally:
        engine.accepting = True


def test_metrics_count_requests_tokens_and_latencies(server, client):
    client.chat.completions.create(model="smollm2", messages=MSG, max_tokens=4, temperature=0)
    _post(server, "/v1/chat/completions", {"model": "nope", "messages": MSG})
    text = httpx.get(server.url + "/metrics").text

    def value(name):
        return float(next(ln.split()[-1] for ln in text.splitlines() if ln.startswith(name)))

    assert value('jaxllm_requests_total{status="200"}') >= 1 and value('jaxllm_requests_total{status="404"}') >= 1
    assert value("jaxllm_prompt_tokens_total") > 0 and value("jaxllm_generation_tokens_total") >= 4
    assert value("jaxllm_time_to_first_token_seconds_count") >= 1
    assert value("jaxllm_inter_token_latency_seconds_count") >= 3
    for gauge in ("jaxllm_queue_depth", "jaxllm_running_sequences", "jaxllm_kv_cache_usage_ratio"):
        assert value(gauge) >= 0
    # Idle after the requests: no page held, the pool all free, the prompt pages kept for reuse.
    assert value("jaxllm_kv_cache_pages_used") == 0 and value("jaxllm_kv_cache_pages_free") > 0
    assert value("jaxllm_kv_cache_pages_cached") > 0 and value("jaxllm_kv_cache_page_size_tokens") == 16
    assert value("jaxllm_prefix_cache_queries") > 0 and value("jaxllm_preemptions") == 0


def test_usage_reports_prompt_tokens_found_in_the_prefix_cache(client):
    system = {"role": "system", "content": "You answer in one short sentence about geography. " * 8}
    first = [system, {"role": "user", "content": "Where is Lima?"}]
    second = [system, {"role": "user", "content": "Where is Oslo?"}]
    cold = client.chat.completions.create(model="smollm2", messages=first, max_tokens=4, temperature=0)
    warm = client.chat.completions.create(model="smollm2", messages=second, max_tokens=4, temperature=0)
    assert cold.usage.prompt_tokens_details.cached_tokens == 0
    cached = warm.usage.prompt_tokens_details.cached_tokens
    assert 64 <= cached < warm.usage.prompt_tokens and cached % 16 == 0
    chunks = list(
        client.completions.create(
            model="smollm2", prompt="Where is Lima?", max_tokens=2, stream=True, stream_options={"include_usage": True}
        )
    )
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == 0  # 5 tokens: less than one page

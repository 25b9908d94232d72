"""`jaxllm batch` (and `generate --input`) run for real in a subprocess on a tiny random-weight Llama folder."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from openai.types import Completion
from openai.types.chat import ChatCompletion

from tests.conftest import minilm_folder
from tests.test_cli import ROOT, assert_error, jaxllm, write_jsonl

FLAGS = ["--temperature", "0", "--max-tokens", "8"]
CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Say hi."}]}


def api(custom_id, url="/v1/chat/completions", body=None) -> dict:
    return {"custom_id": custom_id, "method": "POST", "url": url, "body": body or CHAT}


def records(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def mixed_file(tmp_path):
    return write_jsonl(
        tmp_path / "in.jsonl",
        {"id": "ours", "prompt": "hello"},
        api("chat-1"),
        api("cmpl-1", "/v1/completions", {"model": "m", "prompt": ["ab", "cd"], "n": 2, "logprobs": 1}),
        '{"custom_id": "broken", ',
        api("bad-url", "/v1/chat/complete"),
        {"id": "bad-field", "prompt": "x", "temprature": 1},
        {"id": "ours", "prompt": "the same id again"},
        api("chat-2", body={**CHAT, "logprobs": True, "top_logprobs": 2, "max_tokens": 3}),
    )


def check_results(rows):
    by_id = {r.get("custom_id", r["id"]): r for r in rows}
    assert set(by_id) == {"ours", "chat-1", "cmpl-1", "chat-2"}
    assert by_id["ours"]["finish_reason"] in ("stop", "length") and by_id["ours"]["usage"]["prompt_tokens"] > 0
    for key in ("chat-1", "chat-2", "cmpl-1"):
        r = by_id[key]
        assert r["id"].startswith("batch_req_") and r["error"] is None and r["response"]["status_code"] == 200
    chat = ChatCompletion.model_validate(by_id["chat-1"]["response"]["body"])
    assert chat.model == "gpt-4o-mini" and chat.usage.completion_tokens <= 8
    chat2 = ChatCompletion.model_validate(by_id["chat-2"]["response"]["body"])
    assert len(chat2.choices[0].logprobs.content) == chat2.usage.completion_tokens <= 3
    assert all(len(t.top_logprobs) == 2 for t in chat2.choices[0].logprobs.content)
    cmpl = Completion.model_validate(by_id["cmpl-1"]["response"]["body"])
    assert [c.index for c in sorted(cmpl.choices, key=lambda c: c.index)] == [0, 1, 2, 3]
    assert all(c.logprobs is not None for c in cmpl.choices)


def check_errors(rows):
    assert sorted(r["error"]["line"] for r in rows) == [4, 5, 6, 7]
    by_line = {r["error"]["line"]: r for r in rows}
    assert by_line[4]["custom_id"] == 4 and by_line[4]["error"]["code"] == "invalid_json_line"
    assert by_line[5]["custom_id"] == "bad-url" and by_line[5]["error"]["code"] == "invalid_url"
    assert "unknown field 'temprature'" in by_line[6]["error"]["message"]
    assert by_line[7]["custom_id"] == "ours" and by_line[7]["error"]["code"] == "duplicate_custom_id"
    assert all(r["error"]["message"].startswith(f"line {n}: ") for n, r in by_line.items())


def test_bad_lines_become_error_records_and_the_rest_runs(tiny_llama, tmp_path):
    reqs = mixed_file(tmp_path)
    out, err = tmp_path / "out.jsonl", tmp_path / "err.jsonl"
    proc = jaxllm("batch", "--model", tiny_llama, "--input", reqs, "--output", out, "--errors", err, *FLAGS)
    assert proc.returncode == 0, proc.stderr
    assert "4 done, 4 failed, 0 skipped" in proc.stderr
    check_results(records(out))
    check_errors(records(err))

    together = tmp_path / "together.jsonl"
    proc = jaxllm("batch", "--model", tiny_llama, "--input", reqs, "--output", together, *FLAGS)
    assert proc.returncode == 0, proc.stderr
    rows = records(together)
    check_results([r for r in rows if r.get("error") is None])
    check_errors([r for r in rows if r.get("error") is not None])


def test_mistakes_fail_before_the_model_loads(tmp_path):
    reqs = mixed_file(tmp_path)
    out = tmp_path / "out.jsonl"
    missing_model = ["--model", tmp_path / "no-such-model"]
    assert_error(jaxllm("batch", *missing_model, "--input", reqs, "--output", out, "--strict"), "in.jsonl line 4")
    assert not out.exists()
    assert_error(jaxllm("batch", *missing_model, "--input", tmp_path / "nope.jsonl", "--output", out), "nope.jsonl")
    write_jsonl(tmp_path / "empty.jsonl", "", "  ")
    assert_error(jaxllm("batch", *missing_model, "--input", tmp_path / "empty.jsonl", "--output", out), "no requests")
    out.write_text('{"id": "earlier"}\n')
    assert_error(jaxllm("batch", *missing_model, "--input", reqs, "--output", out), "--resume")
    assert_error(jaxllm("batch", *missing_model, "--input", reqs, "--output", tmp_path / "x" / "o.jsonl"), "folder")


def test_generate_input_runs_through_the_same_runner_in_input_order(tiny_llama, tmp_path):
    reqs = write_jsonl(
        tmp_path / "in.jsonl",
        {"id": "long", "prompt": "first and longest", "max_tokens": 40, "ignore_eos": True},
        {"id": "short", "prompt": "second", "max_tokens": 2},
        api("theirs", body={**CHAT, "max_tokens": 2}),
    )
    proc = jaxllm("generate", "--model", tiny_llama, "--input", reqs, "--temperature", "0")
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r.get("custom_id", r["id"]) for r in rows] == ["long", "short", "theirs"]
    assert len(rows[0]["token_ids"]) == 40 and rows[2]["response"]["status_code"] == 200


def answers(rows) -> dict:
    """id -> greedy text, for our records and OpenAI chat records alike."""
    out = {}
    for r in rows:
        if "custom_id" in r:
            out[r["custom_id"]] = r["response"]["body"]["choices"][0]["message"]["content"]
        else:
            out[r["id"]] = r["text"]
    return out


def test_a_killed_job_resumes_to_the_same_outputs(tiny_llama, tmp_path):
    lines = [{"id": f"r{i}", "prompt": f"request number {i} says", "max_tokens": 24 + i % 8} for i in range(40)]
    lines += [api(f"chat-{i}", body={**CHAT, "messages": [{"role": "user", "content": f"hi {i}"}]}) for i in range(8)]
    reqs = write_jsonl(tmp_path / "in.jsonl", *lines)
    args = ["batch", "--model", tiny_llama, "--input", reqs, "--temperature", "0", "--max-tokens", "16"]
    args += ["--max-num-seqs", "2"]
    whole = tmp_path / "whole.jsonl"
    proc = jaxllm(*args, "--output", whole)
    assert proc.returncode == 0, proc.stderr
    expected = answers(records(whole))
    assert len(expected) == 48

    out = tmp_path / "out.jsonl"
    job = subprocess.Popen(
        [sys.executable, "-m", "jaxllm", *map(str, args), "--output", str(out)],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 300
        while not (out.exists() and out.read_bytes().count(b"\n") >= 3):
            assert job.poll() is None, "the job ended before it was killed: nothing was written as it went"
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert job.poll() is None  # records are on disk while the job still runs
        os.kill(job.pid, signal.SIGKILL)
        job.wait()
    finally:
        if job.poll() is None:
            job.kill()
    done = answers(json.loads(line) for line in out.read_bytes().splitlines(keepends=True) if line.endswith(b"\n"))
    assert 3 <= len(done) < 48
    pending = next(k for k in expected if k not in done)
    with open(out, "ab") as f:  # as a kill in the middle of a write would leave it
        f.write(json.dumps({"id": pending, "text": "cut sh"}).encode()[:20])

    proc = jaxllm(*args, "--output", out, "--resume")
    assert proc.returncode == 0, proc.stderr
    assert f"{48 - len(done)} done, 0 failed, {len(done)} skipped" in proc.stderr
    rows = records(out)
    ids = [r.get("custom_id", r["id"]) for r in rows]
    assert len(ids) == len(set(ids)) == 48  # each id exactly once
    assert answers(rows) == expected


@pytest.mark.slow
def test_an_encoder_folder_runs_the_embedding_lines(tmp_path):
    """`jaxllm batch --model` of a sentence-transformers folder: its embedding lines run (as the server's bodies),
    a generation line is an error record naming the embedding model."""
    from openai.types import CreateEmbeddingResponse

    from jaxllm.embeddings import Embedder

    folder = minilm_folder()
    texts = ["The cat sat on the mat.", "JAX runs on XLA."]
    src = write_jsonl(
        tmp_path / "in.jsonl",
        api("emb", "/v1/embeddings", {"model": "minilm", "input": texts}),
        api("chat"),
    )
    out = tmp_path / "out.jsonl"
    proc = jaxllm("batch", "--model", folder, "--input", src, "--output", out)
    assert proc.returncode == 0, proc.stderr
    by_id = {r["custom_id"]: r for r in records(out)}
    body = CreateEmbeddingResponse.model_validate(by_id["emb"]["response"]["body"])
    got = np.array([d.embedding for d in body.data], np.float32)
    np.testing.assert_allclose(got, Embedder.load(folder).embed(texts).vectors, atol=1e-6)
    assert by_id["chat"]["response"]["status_code"] == 400 and "embedding model" in by_id["chat"]["error"]["message"]

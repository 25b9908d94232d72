"""SIGTERM: stop admitting, let the running request finish, then exit cleanly."""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import httpx
import jax.numpy as jnp
import pytest

from jaxllm.config import config_from_gguf_metadata
from jaxllm.engine.kv_cache import bytes_per_token
from jaxllm.loading.gguf_file import GGUFFile
from jaxllm.serving.launch import spawn_server

pytestmark = pytest.mark.slow


def test_sigterm_finishes_running_requests_then_exits(tmp_path, smollm2_path):
    log = open(tmp_path / "server.log", "w")
    try:
        proc, url = spawn_server(
            [
                "--max-seqs",
                "2",
                "--max-model-len",
                "512",
                "--no-warmup",
                "--shutdown-timeout",
                "60",
                "--page-size",
                "32",
                "--kv-cache-memory",
                "0.05",
                "--no-prefix-caching",
                "--decode-steps",
                "1",
                "--layers",
                "unrolled",
            ],
            timeout=180,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    except RuntimeError as e:
        log.close()
        raise AssertionError((tmp_path / "server.log").read_text()) from e
    try:
        metrics = httpx.get(url + "/metrics").text
        assert "jaxllm_kv_cache_page_size_tokens 32.0" in metrics
        # The pool takes what 2 sequences of 512 tokens need, fewer pages than the 0.05 GiB budget holds.
        page_bytes = bytes_per_token(config_from_gguf_metadata(GGUFFile(smollm2_path).metadata), jnp.float32) * 32
        need, budget = 2 * 512 // 32, int(0.05 * 2**30 // page_bytes)
        assert need < budget and f"jaxllm_kv_cache_pages_free {float(need)}" in metrics
        body = {
            "model": "smollm2",
            "messages": [{"role": "user", "content": "Hi"}],
            "max_tokens": 64,
            "min_tokens": 64,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        events = []
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=120) as r:
            lines = r.iter_lines()
            events.append(next(lines))
            proc.send_signal(signal.SIGTERM)
            events += [ln for ln in lines if ln]
        assert events[-1] == "data: [DONE]"
        usage = json.loads(events[-2][len("data: ") :])["usage"]
        assert usage["completion_tokens"] == 64
        with pytest.raises(httpx.TransportError):
            httpx.get(url + "/health", timeout=5)
        # uvicorn re-raises the signal once shut down, so a clean exit reads as 0 or as -SIGTERM.
        assert proc.wait(timeout=60) in (0, -signal.SIGTERM)
        assert "Traceback" not in (tmp_path / "server.log").read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()


@pytest.mark.slow
def test_a_kv_budget_below_one_sequence_is_refused_in_one_line():
    proc = subprocess.run(
        [sys.executable, "-m", "jaxllm", "serve", "--max-model-len", "2048", "--kv-cache-memory", "0.01"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "raise kv_cache_memory or lower max_model_len" in proc.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize(
    ("flag", "value", "says"), [("--layers", "diagonal", "invalid choice"), ("--decode-steps", "0", "positive")]
)
def test_bad_serve_options_are_refused_in_one_line(flag, value, says):
    proc = subprocess.run(
        [sys.executable, "-m", "jaxllm", "serve", flag, value], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert says in proc.stderr.strip().splitlines()[-1]

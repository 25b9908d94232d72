"""Real uvicorn servers on 127.0.0.1 (free ports), sharing the SmolLM2 weights loaded once."""

from __future__ import annotations

import threading

import pytest
import uvicorn

from jaxllm import LLM
from jaxllm.serving import create_app
from jaxllm.serving.launch import free_port, wait_until_healthy


class RunningServer:
    """A uvicorn server in a thread; `url` is its base address."""

    def __init__(self, app):
        self.app = app
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        wait_until_healthy(self.url, alive=self.thread.is_alive)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(60)

    @property
    def state(self):
        return self.app.state.server


@pytest.fixture(scope="session")
def server(smollm2):
    """The main server: 16 slots. Not warmed up: compiling all its step shapes would take CI minutes, and
    tests/serving/test_warmup.py covers warm-up on a small configuration."""
    llm = LLM(loaded=smollm2.loaded, max_num_seqs=16, max_model_len=1024, token_budget=512)
    app = create_app(llm, served_model_name="smollm2", max_body_bytes=64 * 1024, warmup=False)
    with RunningServer(app) as s:
        yield s


@pytest.fixture(scope="session")
def small_server(smollm2):
    """One slot, a waiting queue of one, an API key, one allowed browser origin: for limits, auth, CORS,
    disconnects and shutdown states."""
    llm = LLM(loaded=smollm2.loaded, max_num_seqs=1, max_model_len=1024, max_waiting=1)
    app = create_app(
        llm, served_model_name="smollm2", api_key="sekrit", warmup=False, allowed_origins=["http://localhost:3000"]
    )
    with RunningServer(app) as s:
        yield s

"""Starting a server subprocess and waiting for its health check (jaxllm.serving.launch)."""

from __future__ import annotations

import subprocess
import time

import pytest

from jaxllm.serving.launch import free_port, spawn_server, wait_until_healthy


def test_waiting_on_a_dead_server_fails_at_once():
    start = time.monotonic()
    with pytest.raises(RuntimeError, match="exited before it became healthy"):
        wait_until_healthy(f"http://127.0.0.1:{free_port()}", timeout=60, alive=lambda: False)
    assert time.monotonic() - start < 5


def test_waiting_on_a_silent_port_times_out():
    with pytest.raises(RuntimeError, match="did not become healthy within 1 s"):
        wait_until_healthy(f"http://127.0.0.1:{free_port()}", timeout=1)


def test_a_server_that_cannot_start_is_reported_not_awaited():
    start = time.monotonic()
    with pytest.raises(RuntimeError, match="exited before it became healthy"):
        spawn_server(["--layers", "diagonal"], timeout=120, stderr=subprocess.DEVNULL)
    assert time.monotonic() - start < 60

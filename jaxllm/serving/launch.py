"""Start `jaxllm serve` in a subprocess on a free local port and wait until it is ready.

For scripts, benchmarks and tests that need a real server beside them; nothing here imports JAX.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Callable

import httpx


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on `host` that nothing listens on right now."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_until_healthy(url: str, timeout: float = 300.0, alive: Callable[[], bool] | None = None) -> None:
    """Poll `url`/health until it answers 200; raise RuntimeError after `timeout` seconds, or at once
    when `alive()` turns false (the server process died)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if alive is not None and not alive():
            raise RuntimeError(f"the server at {url} exited before it became healthy")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"the server at {url} did not become healthy within {timeout:.0f} s")


def spawn_server(args: list[str], timeout: float = 300.0, **popen) -> tuple[subprocess.Popen, str]:
    """Run `python -m jaxllm serve --port P *args` on a free port and wait for its health check.

    Returns (process, base url); the caller stops the process. `popen` goes to subprocess.Popen
    (stdout, stderr, ...). The process is killed if it does not become healthy.
    """
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "jaxllm", "serve", "--port", str(port), *args], **popen)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(url, timeout, alive=lambda: proc.poll() is None)
    except RuntimeError:
        proc.kill()
        proc.wait()
        raise
    return proc, url

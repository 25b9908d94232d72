"""The `jaxllm` command's persistent compilation cache: where it goes, and that a configured one is kept."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

SCRIPT = textwrap.dedent("""
    import jax, jax.numpy as jnp
    from jaxllm import compile_cache
    used = compile_cache.enable()
    print("DIR", used, jax.config.jax_compilation_cache_dir)
    jax.jit(lambda x: jnp.sin(x) @ x.T)(jnp.ones((64, 64))).block_until_ready()
""")


def _run(env_overrides: dict) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_")}
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT), **env_overrides)
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def test_enable_uses_the_xdg_cache_and_writes_compiled_steps(tmp_path):
    out = _run({"XDG_CACHE_HOME": str(tmp_path), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"})
    want = tmp_path / "jaxllm" / "xla"
    assert f"DIR {want} {want}" in out
    assert any(want.iterdir())  # the compiled function was stored


def test_a_configured_cache_directory_is_kept(tmp_path):
    mine = tmp_path / "mine"
    out = _run({"XDG_CACHE_HOME": str(tmp_path / "xdg"), "JAX_COMPILATION_CACHE_DIR": str(mine)})
    assert f"DIR {mine} {mine}" in out
    assert not (tmp_path / "xdg").exists()


def test_a_relative_xdg_cache_home_is_ignored(tmp_path):
    out = _run({"XDG_CACHE_HOME": "relative/cache", "HOME": str(tmp_path)})
    want = tmp_path / ".cache" / "jaxllm" / "xla"
    assert f"DIR {want} {want}" in out

"""JAX's persistent compilation cache for the `jaxllm` command: compiled steps survive restarts.

XLA:CPU takes a few seconds per compiled step of an unrolled model; with the cache, a restarted server
or a second `jaxllm generate` loads them from disk instead.
"""

from __future__ import annotations

import os
from pathlib import Path

import jax

MIN_COMPILE_SECONDS = 0.5  # cheaper executables are not worth a disk entry


def default_dir() -> Path:
    """`$XDG_CACHE_HOME/jaxllm/xla` (default `~/.cache/jaxllm/xla`)."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "jaxllm" / "xla"


def enable(path: str | Path | None = None) -> Path | None:
    """Turn the persistent cache on at `path` (default: `default_dir()`), unless a directory is already
    configured (`JAX_COMPILATION_CACHE_DIR` or `jax.config`), which is kept. Returns the directory in
    use, or None when it cannot be created (the cache then stays off: compiling still works)."""
    configured = jax.config.jax_compilation_cache_dir
    if configured:
        return Path(configured)
    target = Path(path) if path is not None else default_dir()
    try:
        target.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None
    jax.config.update("jax_compilation_cache_dir", str(target))
    if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECONDS)
    return target

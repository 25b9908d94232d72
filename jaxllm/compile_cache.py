"""JAX's persistent compilation cache for the `jaxllm` command: compiled steps survive restarts.

XLA:CPU takes a few seconds per compiled step of an unrolled model; with the cache, a restarted server
or a second `jaxllm generate` loads them from disk instead.
"""

from __future__ import annotations

import os
from pathlib import Path

MIN_COMPILE_SECONDS = 0.5  # cheaper executables are not worth a disk entry
MAX_BYTES = 2 * 2**30  # least recently used entries are evicted beyond this


def cache_root() -> Path | None:
    """`$XDG_CACHE_HOME/jaxllm` (default `~/.cache/jaxllm`): compiled steps and built kernels; None
    without a home directory."""
    base = os.environ.get("XDG_CACHE_HOME", "")
    if not os.path.isabs(base):  # the XDG spec says to ignore a relative path
        try:
            base = Path.home() / ".cache"
        except (RuntimeError, KeyError):  # no HOME and no passwd entry (e.g. `docker run -u UID`)
            return None
    return Path(base) / "jaxllm"


def default_dir() -> Path | None:
    """`cache_root()/xla` (default `~/.cache/jaxllm/xla`); None without a home directory."""
    root = cache_root()
    return root / "xla" if root is not None else None


def enable(path: str | Path | None = None) -> Path | None:
    """Turn the persistent cache on at `path` (default: `default_dir()`), unless a directory is already
    configured (`JAX_COMPILATION_CACHE_DIR` or `jax.config`), which is kept. Returns the directory in
    use, or None when it cannot be created (the cache then stays off: compiling still works).
    Call it before the first compilation: jax reads the setting once."""
    import jax

    configured = jax.config.jax_compilation_cache_dir
    if configured:
        return Path(configured)
    target = Path(path) if path is not None else default_dir()
    if target is None:
        return None
    try:
        target.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None
    jax.config.update("jax_compilation_cache_dir", str(target))
    if "JAX_COMPILATION_CACHE_MAX_SIZE" not in os.environ:
        jax.config.update("jax_compilation_cache_max_size", MAX_BYTES)
    if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECONDS)
    return target

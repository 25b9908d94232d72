"""Building native CPU kernels: a C++ source compiled on first use into a cache keyed by what shapes the binary.

A kernel's `.so` is compiled once per machine (C++ compiler: `$CXX`, else `g++`, else `c++`) into
`~/.cache/jaxllm/kernels`, keyed by its source and the local headers it includes, jaxlib's version (the
FFI headers), the flags and the CPU's instruction sets (kernels are built with -march=native). Without a
compiler, or when the build fails, `build` raises `NativeKernelUnavailable` with a one-line reason, and
callers use their reference.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import re
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

# -march=native: built where it runs. Reassociation lets the compiler vectorise sums; no finite-math
# assumption, so infinities and NaN behave as in the references.
FLAGS = ("-O3", "-march=native", "-fno-math-errno", "-fno-trapping-math", "-fassociative-math", "-fno-signed-zeros")
FLAGS += ("-shared", "-fPIC", "-std=c++17", "-w")


_LOCAL_INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"', re.MULTILINE)


class NativeKernelUnavailable(RuntimeError):
    """The native kernel could not be built or loaded here (no compiler, or the build failed)."""


def find_compiler() -> str | None:
    """`$CXX`, else `g++`, else `c++`, if found on the PATH."""
    for name in (os.environ.get("CXX"), "g++", "c++"):
        if name and shutil.which(name):
            return name
    return None


def cpu_fingerprint() -> str:
    try:  # the instruction sets decide what -march=native emits
        flags = next(ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("flags"))
    except (OSError, StopIteration):
        flags = platform.processor()
    return f"{platform.machine()} {flags}"


def cpu_has(flag: str) -> bool:
    """Whether /proc/cpuinfo lists `flag` (e.g. 'avx512_bf16') for this CPU; False where it cannot tell."""
    return flag in cpu_fingerprint().split()


def local_sources(source: Path) -> list[Path]:
    """`source` and the files it includes as `#include "..."` found beside the includer, recursively.

    Those are the build's own files (the rest comes from the FFI headers, keyed by jaxlib's version), so a
    change to any of them changes the build key. Raises OSError when one cannot be read.
    """
    found, todo = [], [Path(source)]
    while todo:
        path = todo.pop()
        if path in found:
            continue
        found.append(path)
        for name in _LOCAL_INCLUDE.findall(path.read_text()):
            if (path.parent / name).is_file():
                todo.append(path.parent / name)
    return found


def build_dir() -> Path:
    from jaxllm.compile_cache import cache_root

    root = cache_root()
    path = root / "kernels" if root is not None else Path(tempfile.gettempdir()) / "jaxllm-kernels"
    path.mkdir(parents=True, exist_ok=True)
    return path


def build(source: Path, stem: str, flags: Sequence[str] = FLAGS, compiler: str | None = None) -> Path:
    """Compile `source` into `<build dir>/<stem>-<key>.so` unless it exists; return the library path.

    The key covers the source and its local headers (`local_sources`), jaxlib's version, `flags` and the
    CPU. `compiler` None: `find_compiler()`.
    """
    import jax
    import jaxlib

    compiler = compiler or find_compiler()
    if compiler is None:
        raise NativeKernelUnavailable("no C++ compiler found (set $CXX, or install g++)")
    source = Path(source)
    key = hashlib.blake2b(digest_size=10)
    for part in (jaxlib.__version__, " ".join(flags), cpu_fingerprint()):
        key.update(part.encode())
    try:
        for path in local_sources(source):
            key.update(path.name.encode() + b"\0" + path.read_bytes())
    except OSError as e:
        raise NativeKernelUnavailable(f"cannot read {source.name}: {e}") from None
    out = build_dir() / f"{stem}-{key.hexdigest()}.so"
    if out.exists():
        return out
    tmp = out.with_suffix(f".{os.getpid()}.tmp")
    cmd = [compiler, *flags, f"-I{jax.ffi.include_dir()}", str(source), "-o", str(tmp)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise NativeKernelUnavailable(f"{compiler} failed to run: {e}") from None
    if proc.returncode != 0:
        first = next((ln for ln in proc.stderr.splitlines() if "error" in ln), proc.stderr.strip()[:300])
        raise NativeKernelUnavailable(f"{compiler} could not build {source.name}: {first}")
    os.replace(tmp, out)  # atomic: a concurrent build of the same key writes the same bytes
    return out


def load_and_register(library: Path, symbol: str, target: str) -> ctypes.CDLL:
    """Load a built kernel library and register its FFI handler `symbol` as the CPU custom call `target`.

    The caller keeps the returned library (e.g. in a cached function): it must stay loaded while the
    target is registered."""
    import jax

    lib = ctypes.cdll.LoadLibrary(str(library))
    jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
    return lib


def usable(register, what: str) -> bool:
    """Whether `register()` (build, load, register) succeeds here, on the CPU backend; logs why not.

    what: the kernel, as the warning names it ("qmatmul: the native CPU kernel")."""
    import jax

    if jax.default_backend() != "cpu":
        return False
    try:
        register()
    except (NativeKernelUnavailable, OSError) as e:
        logging.getLogger(__name__).warning("%s is unavailable (%s); using the reference", what, e)
        return False
    return True

"""Hand freed host memory back to the operating system between the large steps of loading.

glibc serves blocks below its mmap threshold from its heap, and that threshold rises to the size of the
largest block freed (up to 32 MiB): the float layers read and dropped while loading stay in the heap,
counted in the process's resident memory, unless it is trimmed. Elsewhere than glibc this does nothing.
And `jax.device_put` of a NumPy array leaves the array in a reference cycle, alive until the cyclic
garbage collector runs: collect first, or a stack of layers outlives its copy on the device.
"""

from __future__ import annotations

import ctypes
import functools
import gc


@functools.cache
def _malloc_trim():
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def release_freed_memory() -> None:
    """Collect garbage cycles, then return the heap's free pages to the OS (glibc's `malloc_trim(0)`)."""
    gc.collect(1)
    trim = _malloc_trim()
    if trim is not None:
        trim(0)

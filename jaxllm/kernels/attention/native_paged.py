"""Paged attention on the CPU as a native XLA FFI kernel (`native_paged.cc`), built on first use.

The kernel takes ragged new tokens: a flat run of tokens, each belonging to a sequence with its own cached
context (block table and length) and its own new tokens before it; a decode batch is the case of one token
per sequence (`native_decode_attention`), a mixed prefill/decode step the general one
(`native_paged_attention`).

XLA:CPU runs the reference's decode attention as a gather of every cached row fused with a transposing
copy, then batched [group, head_dim] x [head_dim, ctx] dots of a few rows each: at batch 32 and 512
cached tokens, ~6 ms a layer. The kernel walks each row's pages through the block table and does the
group's dot products, softmax and weighted sum in one pass (~0.6 ms a layer), on XLA's thread pool.

It reads the stacked cache [layers, num_pages, page_size, kv_heads, head_dim] at a layer index, so the
layer scan hands it the whole cache by reference: an operand sliced per layer would be copied for the call.

The C++ source is compiled once per machine by `jaxllm.kernels.native_build` (keyed by the source,
jaxlib's version and the CPU). Without a compiler, `available()` is False and the dispatcher uses the reference.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.kernels import native_build
from jaxllm.kernels.native_build import NativeKernelUnavailable

__all__ = ["NativeKernelUnavailable", "available", "build", "native_decode_attention", "native_paged_attention"]

TARGET = "jaxllm_ragged_paged_f32"
SOURCE = Path(__file__).with_name("native_paged.cc")
FLAGS = list(native_build.FLAGS)
_compiler = native_build.find_compiler  # a module attribute, so tests can take the compiler away


def build(compiler: str | None = None) -> Path:
    """Compile the kernel unless a build for this source, jaxlib and CPU exists; return the library path."""
    compiler = compiler or _compiler()
    if compiler is None:
        raise NativeKernelUnavailable("no C++ compiler found (set $CXX, or install g++)")
    return native_build.build(SOURCE, "native_paged", FLAGS, compiler)


@functools.cache
def _register() -> ctypes.CDLL:
    return native_build.load_and_register(build(), "JaxllmRaggedPagedF32", TARGET)  # cached: stays loaded


@functools.cache
def available() -> bool:
    """Whether the kernel is built and registered here (on the CPU backend); logs once why not."""
    return native_build.usable(_register, "attention: the native CPU paged-attention kernel")


def native_decode_attention(q, k_new, v_new, k_cache, v_cache, block_tables, ctx_lens, sliding_window=None, layer=None):
    """Attention output [batch, 1, q_heads, head_dim] for one new token per row, float32 only.

    q: [batch, 1, q_heads, head_dim]; k_new, v_new: [batch, 1, kv_heads, head_dim]; k_cache, v_cache:
    [layers, num_pages, page_size, kv_heads, head_dim] read at `layer` ([] int32), or one layer's
    [num_pages, page_size, kv_heads, head_dim] with layer None; block_tables: [batch, n_pages] int32;
    ctx_lens: [batch] int32. Raises ValueError for what it does not take (other dtypes, seq > 1), and
    NativeKernelUnavailable when the kernel cannot be built here.
    """
    if q.shape[1] != 1:
        raise ValueError(f"the native kernel decodes one token per row, got {q.shape[1]}")
    rows = jnp.arange(q.shape[0], dtype=jnp.int32)  # row b: sequence b, its one token at b
    out = native_paged_attention(
        q[:, 0], k_new[:, 0], v_new[:, 0], k_cache, v_cache, block_tables, ctx_lens, rows, rows, sliding_window, layer
    )
    return out[:, None]


def native_paged_attention(
    q, k_new, v_new, k_cache, v_cache, block_tables, ctx_lens, q_starts, seq_ids, sliding_window=None, layer=None
):
    """Attention output [tokens, q_heads, head_dim] for ragged new tokens, float32 only.

    q: [tokens, q_heads, head_dim]; k_new, v_new: [tokens, kv_heads, head_dim]; k_cache, v_cache as in
    `native_decode_attention`; block_tables: [seqs, n_pages] int32; ctx_lens: [seqs] int32 cached positions;
    q_starts: [seqs] int32 index of each sequence's first new token; seq_ids: [tokens] int32 each token's
    sequence (out of range: padding, output zero). Token t of sequence s sits at position
    ctx_lens[s] + t - q_starts[s] and attends to the cached context and its sequence's new tokens up to itself.
    """
    arrays = (q, k_new, v_new, k_cache, v_cache)
    if any(a.dtype != jnp.float32 for a in arrays):
        raise ValueError("the native kernel takes float32 queries, keys, values and cache")
    if layer is None:
        k_cache, v_cache, layer = k_cache[None], v_cache[None], 0
    _register()
    call = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct(q.shape, jnp.float32))
    i32 = lambda a: jnp.asarray(a, jnp.int32)
    return call(
        q,
        k_new,
        v_new,
        k_cache,
        v_cache,
        i32(layer),
        i32(block_tables),
        i32(ctx_lens),
        i32(q_starts),
        i32(seq_ids),
        window=np.int64(sliding_window or 0),
    )

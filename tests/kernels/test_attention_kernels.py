"""The Pallas attention kernels against the `jax.numpy` reference: interpret mode here, compiled on a GPU.

Every case builds a shuffled page pool whose block tables end in padding ids (out of range, negative too)
and whose rows have ragged context lengths: empty, exactly filling their last page, crossing into a new
page, and a few pages long.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.kernels import attention  # importing jaxllm loads no engine dependencies: runs on a bare GPU machine
from jaxllm.kernels.attention import reference, tuning

F32_TOL = dict(atol=2e-5, rtol=2e-5)
BF16_TOL = dict(atol=3e-2, rtol=3e-2)


def make_case(seed, ctx_lens, seq, q_heads, kv_heads, head_dim, page_size, dtype=jnp.float32, pool=True):
    """(q, k_new, v_new, k_pages, v_pages, block_tables, ctx_lens) with pages of all rows shuffled in one pool.

    Each row's table has at least one padding entry past its pages, alternately far out of range and -1.
    """
    rng = np.random.default_rng(seed)
    batch = len(ctx_lens)
    pages = [-(-n // page_size) for n in ctx_lens]
    n_pages = max(pages) + 1
    num_pages = sum(pages) + 3
    order = rng.permutation(num_pages)
    tables = np.empty((batch, n_pages), np.int32)
    used = 0
    for row, n in enumerate(pages):
        tables[row, :n] = order[used : used + n]
        tables[row, n:] = [num_pages + 7 if (row + i) % 2 else -1 for i in range(n_pages - n)]
        used += n

    def rand(*shape):
        return jnp.asarray(rng.standard_normal(shape), dtype)

    q = rand(batch, seq, q_heads, head_dim)
    k_new, v_new = rand(batch, seq, kv_heads, head_dim), rand(batch, seq, kv_heads, head_dim)
    k_pages = rand(num_pages, page_size, kv_heads, head_dim) if pool else None
    v_pages = rand(num_pages, page_size, kv_heads, head_dim) if pool else None
    return q, k_new, v_new, k_pages, v_pages, jnp.asarray(tables), jnp.asarray(ctx_lens, jnp.int32)


def poison_stale_slots(pages, block_tables, ctx_lens):
    """`pages` with NaN in every slot that no row may read: past each row's length and in unused pages."""
    page_size = pages.shape[1]
    keep = np.zeros(pages.shape[:2], bool)
    for row, n in enumerate(np.asarray(ctx_lens)):
        for pos in range(int(n)):
            keep[int(block_tables[row, pos // page_size]), pos % page_size] = True
    return jnp.where(jnp.asarray(keep)[:, :, None, None], pages, jnp.nan)


def ragged(page_size):
    """Context lengths of one batch: empty, exactly two pages, just past two pages, past three pages."""
    return [0, 2 * page_size, 2 * page_size + 1, 3 * page_size + 3]


reference_attention = jax.jit(reference.paged_attention, static_argnames="sliding_window")


def assert_matches(out, case, sliding_window, tol):
    expected = reference_attention(*case, sliding_window)
    assert out.shape == expected.shape and out.dtype == expected.dtype
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(expected, np.float32), **tol)


GQA = pytest.mark.parametrize("q_heads,kv_heads", [(2, 2), (6, 2), (8, 1)], ids=["mha", "gqa3", "gqa8"])
PAGE = pytest.mark.parametrize("page_size", [4, 8])
WINDOW = pytest.mark.parametrize("sliding_window", [None, 5], ids=["full", "window5"])

DECODE_BLOCKS = tuning.DecodeBlockSizes(pages_per_block=2)
PREFILL_BLOCKS = tuning.PrefillBlockSizes(block_q=4, block_k=8)


@GQA
@PAGE
@WINDOW
def test_decode_matches_reference(q_heads, kv_heads, page_size, sliding_window):
    case = make_case(0, ragged(page_size), 1, q_heads, kv_heads, 16, page_size)
    out = attention.paged_decode_attention(*case, sliding_window, block_sizes=DECODE_BLOCKS, interpret=True)
    assert_matches(out, case, sliding_window, F32_TOL)


@pytest.mark.parametrize("num_splits", [1, 3])
def test_decode_splits_merge_exactly(num_splits):
    case = make_case(1, [5, 0, 17, 30], 1, 6, 2, 16, 4)
    blocks = tuning.DecodeBlockSizes(pages_per_block=2, num_splits=num_splits)
    out = attention.paged_decode_attention(*case, 9, block_sizes=blocks, interpret=True)
    assert_matches(out, case, 9, F32_TOL)


def test_decode_without_cache_returns_new_values():
    case = make_case(2, [0, 0], 1, 6, 2, 16, 4, pool=False)
    out = attention.paged_decode_attention(*case, interpret=True)
    assert_matches(out, case, None, F32_TOL)


def test_decode_bfloat16():
    case = make_case(3, ragged(8), 1, 9, 3, 64, 8, dtype=jnp.bfloat16)
    out = attention.paged_decode_attention(*case, 4, block_sizes=DECODE_BLOCKS, interpret=True)
    assert_matches(out, case, 4, BF16_TOL)


def test_decode_never_reads_stale_slots():
    q, k_new, v_new, k_pages, v_pages, tables, lens = case = make_case(4, ragged(4), 1, 6, 2, 16, 4)
    poisoned = (poison_stale_slots(k_pages, tables, lens), poison_stale_slots(v_pages, tables, lens))
    out = attention.paged_decode_attention(q, k_new, v_new, *poisoned, tables, lens, None, interpret=True)
    assert_matches(out, case, None, F32_TOL)


@GQA
@PAGE
@WINDOW
def test_prefill_with_context_matches_reference(q_heads, kv_heads, page_size, sliding_window):
    case = make_case(5, ragged(page_size), 11, q_heads, kv_heads, 16, page_size)
    out = attention.flash_prefill_attention(*case, sliding_window, block_sizes=PREFILL_BLOCKS, interpret=True)
    assert_matches(out, case, sliding_window, F32_TOL)


@pytest.mark.parametrize("seq", [1, 7, 16])
@WINDOW
def test_prefill_without_context_is_causal(seq, sliding_window):
    case = make_case(6, [0, 0], seq, 6, 2, 16, 4, pool=False)
    out = attention.flash_prefill_attention(*case, sliding_window, block_sizes=PREFILL_BLOCKS, interpret=True)
    assert_matches(out, case, sliding_window, F32_TOL)


@pytest.mark.parametrize("block_q,block_k", [(8, 4), (16, 16)])
def test_prefill_block_shapes(block_q, block_k):
    case = make_case(7, [3, 21], 13, 8, 1, 16, 4)
    blocks = tuning.PrefillBlockSizes(block_q=block_q, block_k=block_k)
    out = attention.flash_prefill_attention(*case, 6, block_sizes=blocks, interpret=True)
    assert_matches(out, case, 6, F32_TOL)


def test_prefill_bfloat16():
    case = make_case(8, ragged(8), 10, 9, 3, 64, 8, dtype=jnp.bfloat16)
    out = attention.flash_prefill_attention(*case, None, block_sizes=PREFILL_BLOCKS, interpret=True)
    assert_matches(out, case, None, BF16_TOL)


def test_prefill_never_reads_stale_slots():
    q, k_new, v_new, k_pages, v_pages, tables, lens = case = make_case(9, ragged(4), 6, 6, 2, 16, 4)
    poisoned = (poison_stale_slots(k_pages, tables, lens), poison_stale_slots(v_pages, tables, lens))
    out = attention.flash_prefill_attention(
        q, k_new, v_new, *poisoned, tables, lens, 7, block_sizes=PREFILL_BLOCKS, interpret=True
    )
    assert_matches(out, case, 7, F32_TOL)


@pytest.mark.parametrize("seq", [1, 5])
def test_dispatcher_picks_the_kernel_by_seq(seq):
    case = make_case(10, [6, 9], seq, 6, 2, 16, 4)
    out = attention.paged_attention(*case, 3, impl="pallas", interpret=True)
    assert_matches(out, case, 3, F32_TOL)


def test_gpu_shape_checks_refuse_what_triton_cannot_lower():
    case = make_case(11, [4], 1, 2, 2, 16, 4)
    with pytest.raises(ValueError, match="power of two"):
        attention.paged_decode_attention(*case, block_sizes=tuning.DecodeBlockSizes(pages_per_block=2))


def _shapes(batch, seq, heads, page_size, num_pages, n_pages, dtype=jnp.bfloat16, pool=True):
    q_heads, kv_heads, head_dim = heads
    s = jax.ShapeDtypeStruct
    new = [s((batch, seq, h, head_dim), dtype) for h in (q_heads, kv_heads, kv_heads)]
    if not pool:
        return (*new, None, None, None, s((batch,), jnp.int32))
    page = s((num_pages, page_size, kv_heads, head_dim), dtype)
    return (*new, page, page, s((batch, n_pages), jnp.int32), s((batch,), jnp.int32))


@pytest.mark.parametrize(
    "kernel,shapes,sliding_window",
    [
        ("decode", _shapes(8, 1, (32, 8, 128), 16, 4096, 256), None),
        ("decode", _shapes(8, 1, (9, 3, 64), 16, 4096, 256), 1024),
        ("decode", _shapes(3, 1, (4, 4, 64), 32, 64, 7, jnp.float32), None),
        ("prefill", _shapes(2, 517, (32, 8, 128), 16, 4096, 256), None),
        ("prefill", _shapes(2, 517, (9, 3, 64), 16, 4096, 256, pool=False), 64),
        ("prefill", _shapes(2, 5, (8, 1, 64), 32, 100, 9, jnp.float32), 3),
    ],
)
def test_kernels_lower_to_triton(kernel, shapes, sliding_window):
    """The Triton lowering (Pallas to Triton IR) runs on any host: shape or op mistakes surface here, not
    only on a GPU. Compiling that IR to PTX and running it still needs the GPU tests below."""
    fn = attention.paged_decode_attention if kernel == "decode" else attention.flash_prefill_attention
    lowered = jax.jit(lambda *args: fn(*args, sliding_window)).trace(*shapes).lower(lowering_platforms=("cuda",))
    assert "xla.gpu.triton" in lowered.as_text()


# --- compiled on a GPU: realistic shapes, bf16 (and f32 at full matmul precision) -------------------------

gpu = pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU backend")

LLAMA3 = (32, 8, 128)
SMOLLM2 = (9, 3, 64)


def gpu_case(seed, batch, seq, heads, dtype, ctx=(1000, 4000), page_size=16):
    q_heads, kv_heads, head_dim = heads
    rng = np.random.default_rng(seed)
    ctx_lens = [int(n) for n in rng.integers(ctx[0], ctx[1] + 1, batch)] if ctx else [0] * batch
    if ctx:
        ctx_lens[0] = ctx[0] // page_size * page_size  # one row exactly filling its last page
    return make_case(seed, ctx_lens, seq, q_heads, kv_heads, head_dim, page_size, dtype, pool=bool(ctx))


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("heads", [LLAMA3, SMOLLM2], ids=["llama3", "smollm2"])
@pytest.mark.parametrize("sliding_window", [None, 1024], ids=["full", "window1024"])
def test_gpu_decode(heads, sliding_window):
    case = gpu_case(20, 8, 1, heads, jnp.bfloat16)
    out = attention.paged_decode_attention(*case, sliding_window)
    assert_matches(out, case, sliding_window, BF16_TOL)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("heads", [LLAMA3, SMOLLM2], ids=["llama3", "smollm2"])
@pytest.mark.parametrize("ctx", [None, (1000, 4000)], ids=["no_ctx", "chunked"])
@pytest.mark.parametrize("sliding_window", [None, 1024], ids=["full", "window1024"])
def test_gpu_prefill(heads, ctx, sliding_window):
    case = gpu_case(21, 2, 517, heads, jnp.bfloat16, ctx=ctx)
    out = attention.flash_prefill_attention(*case, sliding_window)
    assert_matches(out, case, sliding_window, BF16_TOL)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("seq", [1, 300])
def test_gpu_float32(seq):
    case = gpu_case(22, 4, seq, LLAMA3, jnp.float32)
    out = attention.paged_attention(*case, None, impl="pallas")
    with jax.default_matmul_precision("highest"):
        assert_matches(out, case, None, dict(atol=1e-4, rtol=1e-4))


def test_shapes_the_gpu_kernels_cannot_take_fall_back_to_the_reference(monkeypatch):
    monkeypatch.delenv("JAXLLM_ATTENTION", raising=False)
    monkeypatch.setattr(attention.jax, "default_backend", lambda: "gpu")
    assert attention.default_impl() == "pallas"
    case = make_case(12, [3, 9], 1, 4, 2, 80, 4)  # head_dim 80: not a power of two
    out = attention.paged_attention(*case, None)
    assert_matches(out, case, None, F32_TOL)
    with pytest.raises(ValueError, match="power of two"):
        attention.paged_attention(*case, None, impl="pallas")

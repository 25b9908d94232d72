"""The native CPU decode kernel (C++ through XLA FFI) against the `jax.numpy` reference.

Built here with the machine's C++ compiler, as on first use. Cases reuse the Pallas tests' shuffled pools:
ragged context lengths, padding ids in the block tables, stale slots poisoned with NaN.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.kernels import attention
from jaxllm.kernels.attention import native_paged
from tests.kernels.test_attention_kernels import (
    F32_TOL,
    GQA,
    PAGE,
    WINDOW,
    assert_matches,
    make_case,
    poison_stale_slots,
    ragged,
)

pytestmark = pytest.mark.skipif(jax.default_backend() != "cpu", reason="a CPU kernel")


def test_it_builds_and_registers_here():
    assert native_paged.available()
    assert native_paged.build().exists()  # a second build finds the first one's library


@GQA
@PAGE
@WINDOW
def test_decode_matches_reference(q_heads, kv_heads, page_size, sliding_window):
    case = make_case(0, ragged(page_size), 1, q_heads, kv_heads, 16, page_size)
    out = jax.jit(native_paged.native_decode_attention, static_argnums=7)(*case, sliding_window)
    assert_matches(out, case, sliding_window, F32_TOL)


def test_smollm2_heads_over_a_long_context():
    case = make_case(1, [0, 1, 300, 511, 512, 77], 1, 9, 3, 64, 16)
    out = native_paged.native_decode_attention(*case, 128)
    assert_matches(out, case, 128, F32_TOL)


def test_reads_the_given_layer_of_the_stacked_cache():
    q, k_new, v_new, k_pages, v_pages, tables, lens = case = make_case(2, ragged(4), 1, 6, 2, 16, 4)
    stack = lambda pages: jnp.stack([pages * 0 + jnp.nan, pages * 0 + jnp.nan, pages])  # other layers: NaN
    step = jax.jit(native_paged.native_decode_attention)
    out = step(q, k_new, v_new, stack(k_pages), stack(v_pages), tables, lens, None, jnp.int32(2))
    assert_matches(out, case, None, F32_TOL)


def test_never_reads_stale_slots():
    q, k_new, v_new, k_pages, v_pages, tables, lens = case = make_case(3, ragged(4), 1, 6, 2, 16, 4)
    poisoned = (poison_stale_slots(k_pages, tables, lens), poison_stale_slots(v_pages, tables, lens))
    out = native_paged.native_decode_attention(q, k_new, v_new, *poisoned, tables, lens, 5)
    assert_matches(out, case, 5, F32_TOL)


def test_many_independent_calls_in_one_step_do_not_deadlock_the_thread_pool():
    """XLA may run independent kernels at once on its pool; each must finish without waiting for a helper."""
    case = make_case(4, [40] * 16, 1, 9, 3, 64, 16)

    def many(*args):
        return sum(native_paged.native_decode_attention(*args[:3], *args[3:5], *args[5:], None) * i for i in range(12))

    out = jax.jit(many)(*case)
    assert_matches(out / sum(range(12)), case, None, F32_TOL)


def test_the_dispatcher_uses_it_for_decode_on_the_cpu(monkeypatch):
    monkeypatch.delenv("JAXLLM_ATTENTION", raising=False)
    assert attention.default_impl() == "native"
    case = make_case(5, [7, 30], 1, 6, 2, 16, 4)
    text = jax.jit(lambda *a: attention.paged_attention(*a, None)).lower(*case).as_text()
    assert native_paged.TARGET in text
    prefill = make_case(6, [7, 30], 5, 6, 2, 16, 4)  # more than one token: the reference
    assert native_paged.TARGET not in jax.jit(lambda *a: attention.paged_attention(*a, None)).lower(*prefill).as_text()
    assert_matches(attention.paged_attention(*case, None), case, None, F32_TOL)


def test_other_dtypes_fall_back_to_the_reference_unless_asked_for_by_name():
    case = make_case(7, [7, 30], 1, 6, 2, 16, 4, dtype=jnp.bfloat16)
    out = attention.paged_attention(*case, None, impl=None)
    expected = attention.reference.paged_attention(*case, None)
    np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(expected, np.float32))
    with pytest.raises(ValueError, match="float32"):
        attention.paged_attention(*case, None, impl="native")


def test_a_failed_build_says_why_in_one_line(tmp_path, monkeypatch):
    with pytest.raises(native_paged.NativeKernelUnavailable, match="no C\\+\\+ compiler"):
        monkeypatch.setattr(native_paged, "_compiler", lambda: None)
        native_paged.build()
    monkeypatch.setattr(native_paged, "SOURCE", tmp_path / "broken.cc")
    (tmp_path / "broken.cc").write_text("this is not C++\n")
    with pytest.raises(native_paged.NativeKernelUnavailable, match="could not build broken.cc") as err:
        native_paged.build("g++")
    assert "\n" not in str(err.value)

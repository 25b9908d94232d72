"""Attention over new tokens plus a paged KV context: one interface, implementation chosen by backend.

New tokens come either as rows of equal length ([batch, seq], each row one sequence), or ragged: one flat
run of tokens ([1, tokens]) from sequences of any query length, described by a `Ragged`.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from jaxllm.kernels.attention import native_paged, reference
from jaxllm.kernels.attention.flash_prefill import flash_prefill_attention
from jaxllm.kernels.attention.paged_decode import paged_decode_attention
from jaxllm.kernels.attention.ragged_paged import pallas_ragged_paged_attention

log = logging.getLogger(__name__)
IMPLS = ("reference", "pallas", "pallas-interpret", "native")


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Ragged:
    """Which flat tokens belong to which sequence: q_starts, q_lens [seqs] (each sequence's first token and
    how many it has; padding sequences have none), seq_ids [tokens] (each token's sequence; out of range for
    padding tokens); max_q_len (static) bounds q_lens. The sequences' block tables and cached lengths are
    the usual `block_tables` [seqs, n_pages] and `ctx_lens` [seqs]."""

    q_starts: jax.Array
    q_lens: jax.Array
    seq_ids: jax.Array
    max_q_len: int = dataclasses.field(metadata=dict(static=True))


def default_impl() -> str:
    """$JAXLLM_ATTENTION when set (one of IMPLS), else 'pallas' on GPU and 'native' on the CPU (the C++
    decode kernel, with the reference for prefill). Pallas runs on the CPU only in interpret mode:
    'pallas-interpret', for tests."""
    impl = os.environ.get("JAXLLM_ATTENTION") or ("pallas" if jax.default_backend() == "gpu" else "native")
    if impl not in IMPLS:
        raise ValueError(f"JAXLLM_ATTENTION={impl!r} is not one of {', '.join(IMPLS)}")
    return impl


def reads_to_length(ragged: bool, impl: str | None = None) -> bool:
    """Whether the attention chosen for decode (ragged=False) or for ragged batches reads each sequence's
    pages only up to its length, so that a wider block table costs nothing: the native CPU kernel and the
    Pallas kernels do (the ragged one once it has passed `pallas_ragged_works` here); the reference reads
    every page of the table."""
    impl = impl or default_impl()
    if impl == "native":
        return native_paged.available()
    return impl == "pallas" and (not ragged or pallas_ragged_works())


@functools.cache
def pallas_ragged_works(interpret: bool = False) -> bool:
    """Whether the Pallas ragged kernel compiles on this backend and equals the reference, on a small mix (a
    decode and a prefill chunk crossing pages after a cached prefix), checked once per process before a
    step is traced. When it does not, the reason is logged, ragged batches take the reference (unless
    'pallas' was asked for by name), and engines keep separate prefill and decode calls by default."""
    try:
        ok, why = _check_pallas_ragged(interpret)
    except Exception as e:  # a lowering or compile failure: any exception type of the backend's compiler
        ok, why = False, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    if not ok:
        _RAGGED_BROKEN.add(interpret)
        log.warning("attention: the Pallas ragged kernel failed its check (%s); mixed steps use the reference", why)
    return ok


_RAGGED_BROKEN: set[bool] = set()  # interpret modes whose Pallas ragged kernel failed `pallas_ragged_works`


def _check_pallas_ragged(interpret: bool) -> tuple[bool, str]:
    """(kernel equals the reference within 1e-3, how far it was) on a decode and a 21-token chunk after 9 cached
    positions, pages of 16, 4 query heads over 2 KV heads of 64 dims."""
    import numpy as np

    page, pages, kv_heads, heads, dim = 16, 8, 2, 4, 64
    rng = np.random.default_rng(0)
    normal = lambda *shape: jnp.asarray(rng.normal(size=shape).astype(np.float32))
    q, k_new, v_new = normal(24, heads, dim), normal(24, kv_heads, dim), normal(24, kv_heads, dim)
    k_pages, v_pages = normal(pages, page, kv_heads, dim), normal(pages, page, kv_heads, dim)
    tables = jnp.asarray([[3, 5, 0], [1, 6, 7], [pages] * 3], jnp.int32)  # the last sequence: padding
    ctx, starts, lens = (jnp.asarray(x, jnp.int32) for x in ([30, 9, 0], [0, 1, 22], [1, 21, 0]))
    seq_ids = jnp.asarray([0] + [1] * 21 + [3, 3], jnp.int32)  # two padding tokens
    args = (q, k_new, v_new, k_pages, v_pages, tables, ctx, starts, lens, seq_ids)
    got = jax.jit(functools.partial(pallas_ragged_paged_attention, interpret=interpret))(*args)
    want = reference.ragged_paged_attention(*args, max_q_len=21)
    err = float(jnp.max(jnp.abs(got - want)))
    return err <= 1e-3, f"largest difference from the reference {err:.3g}"


def paged_attention(
    q,
    k_new,
    v_new,
    k_pages,
    v_pages,
    block_tables,
    ctx_lens,
    sliding_window: int | None = None,
    impl: str | None = None,
    *,
    interpret: bool = False,
    layer=None,
    ragged: Ragged | None = None,
):
    """Attention output [batch, seq, q_heads, head_dim]; arguments as in `reference.paged_attention`.

    q: [batch, seq, q_heads, head_dim]; k_new, v_new: [batch, seq, kv_heads, head_dim];
    k_pages, v_pages: [num_pages, page_size, kv_heads, head_dim], or the stacked cache [layers, num_pages,
    page_size, kv_heads, head_dim] read at `layer` ([] int32), or None; block_tables: [batch, n_pages]
    int32; ctx_lens: [batch] int32. impl: one of IMPLS (None: `default_impl()`); 'pallas' runs the paged
    decode kernel when seq == 1 and the flash prefill kernel otherwise; 'native' runs the C++ kernel when
    seq == 1 on float32 and the reference otherwise. interpret: run the Pallas kernels in the interpreter
    (the only way on the CPU; 'pallas-interpret' implies it). Under a placement (`sharding.active()`) the
    kernel runs per device under `shard_map`, on its own heads (attention never mixes heads, and XLA cannot
    split a custom call itself) and, with data-parallel replicas, on its replica's rows and pages: then the
    rows come grouped by replica and their block tables hold page ids of their replica's pool.
    ragged: the new tokens are one flat run (batch 1: q [1, tokens, q_heads, head_dim]) from the sequences
    that `block_tables` and `ctx_lens` [seqs] describe (see `Ragged`); the native kernel takes them as they
    are, the others attend each sequence as a padded row of `max_q_len` (the reference's way).
    """
    if ragged is not None:
        return _ragged_attention(
            q, k_new, v_new, k_pages, v_pages, block_tables, ctx_lens, ragged, sliding_window, impl, layer
        )
    from jaxllm import sharding

    placement = sharding.active()
    if placement is not None and placement.mesh.size > 1:
        stacked = layer is not None

        def local(q, kn, vn, kp, vp, bt, cl, lay):  # this device's heads of its replica's rows and pages
            lay = lay if stacked else None
            return _paged_attention(q, kn, vn, kp, vp, bt, cl, sliding_window, impl, interpret=interpret, layer=lay)

        rows = sharding.rows_axis(placement, q.shape[0], paged=k_pages is not None)
        heads = P(rows, None, placement.rules.q_heads, None)
        kv = P(rows, None, placement.rules.kv_heads, None)
        pages = None if k_pages is None else sharding.pool_spec(placement, k_pages.ndim)
        layer_arg = jnp.asarray(layer if stacked else 0, jnp.int32)
        sharded = jax.shard_map(
            local,
            mesh=placement.mesh,
            in_specs=(heads, kv, kv, pages, pages, P(rows), P(rows), P()),
            out_specs=heads,
            check_vma=False,
        )
        return sharded(q, k_new, v_new, k_pages, v_pages, block_tables, ctx_lens, layer_arg)
    return _paged_attention(
        q,
        k_new,
        v_new,
        k_pages,
        v_pages,
        block_tables,
        ctx_lens,
        sliding_window,
        impl,
        interpret=interpret,
        layer=layer,
    )


def _paged_attention(
    q, k_new, v_new, k_pages, v_pages, block_tables, ctx_lens, sliding_window, impl, *, interpret, layer
):
    impl, chosen = _resolve(impl)
    if impl == "native" and k_pages is not None and q.shape[1] == 1 and (chosen or native_paged.available()):
        out = _kernel_or_none(
            "native",
            chosen,
            lambda: native_paged.native_decode_attention(
                q, k_new, v_new, k_pages, v_pages, block_tables, ctx_lens, sliding_window, layer
            ),
        )
        if out is not None:
            return out
    if layer is not None and k_pages is not None:  # the others read one layer's pool
        k_pages, v_pages = k_pages[layer], v_pages[layer]
    args = (q, k_new, v_new, k_pages, v_pages, block_tables, ctx_lens)
    if impl in ("pallas", "pallas-interpret"):
        interpret = interpret or impl == "pallas-interpret"
        kernel = paged_decode_attention if q.shape[1] == 1 else flash_prefill_attention
        out = _kernel_or_none("Pallas", chosen, lambda: kernel(*args, sliding_window or None, interpret=interpret))
        if out is not None:
            return out
    return reference.paged_attention(*args, sliding_window)


def _ragged_attention(q, k_new, v_new, k_pages, v_pages, block_tables, ctx_lens, ragged, sliding_window, impl, layer):
    """`paged_attention` for a flat run of ragged tokens: q [1, tokens, q_heads, head_dim] -> the same shape.
    Under a placement each device attends its heads. With data-parallel replicas the run comes grouped by
    replica (replica r's tokens at [r * tokens / replicas, ...), its sequences at [r * seqs / replicas, ...),
    with page ids of its pool; `ragged` indexes tokens and sequences of the whole run), and each replica
    attends its own part; otherwise tokens and sequences are whole on every device."""
    from jaxllm import sharding

    def local(q, kn, vn, kp, vp, bt, cl, rg, lay):
        return _ragged_local(q[0], kn[0], vn[0], kp, vp, bt, cl, rg, sliding_window, impl, lay)[None]

    layer_arg = jnp.asarray(0 if layer is None else layer, jnp.int32)
    placement = sharding.active()
    if placement is None or placement.mesh.size == 1:
        return local(
            q, k_new, v_new, k_pages, v_pages, block_tables, ctx_lens, ragged, layer if layer is None else layer_arg
        )
    stacked, rows = layer is not None, None
    if placement.data_parallel > 1:
        rows = sharding.rows_axis(placement, q.shape[1], paged=True)
        sharding.rows_axis(placement, block_tables.shape[0], paged=True)

    def replica_local(q, kn, vn, kp, vp, bt, cl, rg, lay):  # this replica's tokens and sequences, indexed from 0
        if rows is not None:
            r = jax.lax.axis_index(rows)
            tokens, seqs = q.shape[1], bt.shape[0]
            rg = Ragged(rg.q_starts - r * tokens, rg.q_lens, rg.seq_ids - r * seqs, min(rg.max_q_len, tokens))
        return local(q, kn, vn, kp, vp, bt, cl, rg, lay if stacked else None)

    heads = P(None, rows, placement.rules.q_heads, None)
    kv = P(None, rows, placement.rules.kv_heads, None)
    pages = sharding.pool_spec(placement, k_pages.ndim)
    run = jax.shard_map(
        replica_local,
        mesh=placement.mesh,
        in_specs=(heads, kv, kv, pages, pages, P(rows), P(rows), P(rows), P()),
        out_specs=heads,
        check_vma=False,
    )
    return run(q, k_new, v_new, k_pages, v_pages, block_tables, ctx_lens, ragged, layer_arg)


def _ragged_local(q, k_new, v_new, k_pages, v_pages, block_tables, ctx_lens, ragged, sliding_window, impl, layer):
    """One device's ragged attention: q [tokens, q_heads, head_dim] -> the same shape."""
    impl, chosen = _resolve(impl)
    if impl == "native" and (chosen or native_paged.available()):
        out = _kernel_or_none(
            "native",
            chosen,
            lambda: native_paged.native_paged_attention(
                q,
                k_new,
                v_new,
                k_pages,
                v_pages,
                block_tables,
                ctx_lens,
                ragged.q_starts,
                ragged.seq_ids,
                sliding_window,
                layer,
            ),
        )
        if out is not None:
            return out
    if layer is not None:
        k_pages, v_pages = k_pages[layer], v_pages[layer]
    args = (q, k_new, v_new, k_pages, v_pages, block_tables, ctx_lens, ragged.q_starts, ragged.q_lens, ragged.seq_ids)
    interpret = impl == "pallas-interpret"
    failed_check = not chosen and interpret in _RAGGED_BROKEN
    if impl in ("pallas", "pallas-interpret") and not failed_check:
        out = _kernel_or_none(
            "Pallas", chosen, lambda: pallas_ragged_paged_attention(*args, sliding_window or None, interpret=interpret)
        )
        if out is not None:
            return out
    return reference.ragged_paged_attention(*args, ragged.max_q_len, sliding_window)


def _resolve(impl: str | None) -> tuple[str, str | None]:
    """(the implementation to run, the one asked for by name or None): one asked for by name never falls back."""
    chosen = impl or os.environ.get("JAXLLM_ATTENTION")
    impl = impl or default_impl()
    if impl not in IMPLS:
        raise ValueError(f"unknown attention implementation {impl!r}: use one of {', '.join(IMPLS)}")
    return impl, chosen


def _kernel_or_none(kernel: str, chosen: str | None, call):
    """call() (the native or a Pallas kernel), or None after a logged warning when it refuses the inputs
    (dtypes or shapes it cannot take, raised while tracing, before any work) and was not asked for by name."""
    try:
        return call()
    except ValueError as e:
        if chosen:
            raise
        _warn_fallback(kernel, str(e))
        return None


@functools.cache
def _warn_fallback(kernel: str, reason: str) -> None:
    log.warning("attention: the %s kernel cannot take these inputs (%s); using the reference", kernel, reason)

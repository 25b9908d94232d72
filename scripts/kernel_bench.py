"""Time the Pallas attention kernels against the `jax.numpy` reference, next to each shape's roofline floor.

    python scripts/kernel_bench.py                        # on a GPU: decode and prefill, one markdown table
    python scripts/kernel_bench.py --sweep                # also a few block sizes on two representative shapes
    python scripts/kernel_bench.py --interpret --quick    # anywhere: one tiny shape through the interpreter

Each timing runs the op `--reps` times inside one jitted `fori_loop` (each iteration's query depends on
the previous output, so nothing is hoisted and Python dispatch is out of the measurement), after a warm-up,
and reports the median of `--trials` such loops per op. The floor is max(bytes moved / HBM bandwidth,
flops / bf16 dense peak) for the card found (H100: 3.0e12 B/s, 8.0e14 flop/s; H200: 4.3e12 B/s).
Needs only jax and numpy.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
from jax import lax

ROOT = Path(__file__).resolve().parents[1]


sys.path.insert(0, str(ROOT))
from jaxllm.kernels import attention  # noqa: E402  (importing jaxllm loads no engine dependencies)
from jaxllm.kernels.attention import tuning  # noqa: E402

LLAMA3_8B = ("llama3-8b", 32, 8, 128)
SMOLLM2 = ("smollm2", 9, 3, 64)
FLOORS = {"H200": (4.3e12, 8.0e14), "H100": (3.0e12, 8.0e14)}  # device kind substring -> (B/s, flop/s)


@dataclasses.dataclass(frozen=True)
class Case:
    """One benchmark shape: `seq` new tokens per row on `ctx` cached positions (0: no cache)."""

    batch: int
    seq: int
    ctx: int
    heads: tuple  # (name, q_heads, kv_heads, head_dim)
    page_size: int = 16
    dtype: str = "bfloat16"

    @property
    def kernel(self) -> str:
        return "decode" if self.seq == 1 else "prefill"

    @property
    def label(self) -> str:
        return f"{self.heads[0]} b{self.batch} seq{self.seq} ctx{self.ctx}"

    def cost(self) -> tuple[float, float]:
        """(bytes moved, flops) of one call: q, new k/v and output once, the cached context once."""
        _, h, kvh, d = self.heads
        item = jnp.dtype(self.dtype).itemsize
        b, t, c = self.batch, self.seq, self.ctx
        nbytes = item * b * d * (2 * t * h + 2 * t * kvh + 2 * c * kvh)
        flops = 4.0 * b * h * d * (t * c + t * (t + 1) / 2)
        return nbytes, flops


def make_inputs(case: Case, seed: int = 0):
    """Arguments of `paged_attention` for `case`, drawn on the device; pages shuffled across the pool."""
    _, h, kvh, d = case.heads
    dtype = jnp.dtype(case.dtype)
    keys = jax.random.split(jax.random.key(seed), 6)
    b, t = case.batch, case.seq
    q = jax.random.normal(keys[0], (b, t, h, d), dtype)
    k_new = jax.random.normal(keys[1], (b, t, kvh, d), dtype)
    v_new = jax.random.normal(keys[2], (b, t, kvh, d), dtype)
    if not case.ctx:
        return q, k_new, v_new, None, None, None, jnp.zeros((b,), jnp.int32)
    n_pages = -(-case.ctx // case.page_size)
    num_pages = b * n_pages
    k_pages = jax.random.normal(keys[3], (num_pages, case.page_size, kvh, d), dtype)
    v_pages = jax.random.normal(keys[4], (num_pages, case.page_size, kvh, d), dtype)
    tables = jax.random.permutation(keys[5], num_pages).astype(jnp.int32).reshape(b, n_pages)
    return q, k_new, v_new, k_pages, v_pages, tables, jnp.full((b,), case.ctx, jnp.int32)


def looped(fn, reps: int):
    """A jitted loop calling `fn(*args)` `reps` times, each query nudged by the last output's sum."""

    @jax.jit
    def run(q, *rest):
        def body(_, carry):
            out = fn(q + carry.astype(q.dtype), *rest)
            return out.astype(jnp.float32).sum() * 1e-30

        return lax.fori_loop(0, reps, body, jnp.float32(0))

    return run


def time_ms(fn, args, reps: int, trials: int) -> float:
    """Median milliseconds per call of `fn(*args)` over `trials` loops of `reps` calls, after a warm-up."""
    run = looped(fn, reps)
    jax.block_until_ready(run(*args))
    times = []
    for _ in range(trials):
        start = time.perf_counter()
        jax.block_until_ready(run(*args))
        times.append((time.perf_counter() - start) / reps * 1e3)
    return statistics.median(times)


def pallas_fn(case: Case, interpret: bool, blocks=None):
    if case.kernel == "decode":
        return functools.partial(attention.paged_decode_attention, interpret=interpret, block_sizes=blocks)
    return functools.partial(attention.flash_prefill_attention, interpret=interpret, block_sizes=blocks)


def bench_case(case: Case, interpret: bool, reps: int, trials: int, floor_rates) -> dict:
    args = make_inputs(case)
    ours = pallas_fn(case, interpret)
    ref = jax.jit(attention.reference.paged_attention)
    err = jnp.abs(ours(*args).astype(jnp.float32) - ref(*args).astype(jnp.float32)).max()
    ref_ms = time_ms(ref, args, reps, trials)
    pallas_ms = time_ms(ours, args, reps, trials)
    nbytes, flops = case.cost()
    floor_ms = max(nbytes / floor_rates[0], flops / floor_rates[1]) * 1e3
    del args
    return dict(case=case, ref=ref_ms, pallas=pallas_ms, floor=floor_ms, err=float(err))


def markdown(rows: list[dict]) -> str:
    lines = [
        "| kernel | shape | ref ms | pallas ms | speedup | floor ms | % of floor | max abs err |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        c = r["case"]
        if "failed" in r:
            lines.append(f"| {c.kernel} | {c.label} | | failed: {r['failed']} | | | | |")
            continue
        lines.append(
            f"| {c.kernel} | {c.label} | {r['ref']:.4f} | {r['pallas']:.4f} | {r['ref'] / r['pallas']:.2f}x "
            f"| {r['floor']:.4f} | {100 * r['floor'] / r['pallas']:.0f}% | {r['err']:.1e} |"
        )
    return "\n".join(lines)


def full_cases() -> list[Case]:
    cases = [
        Case(batch, 1, ctx, heads)
        for heads in (LLAMA3_8B, SMOLLM2)
        for batch in (1, 8, 32, 64)
        for ctx in (512, 2048, 8192)
    ]
    cases += [Case(1, seq, ctx, heads) for heads in (LLAMA3_8B, SMOLLM2) for seq in (512, 2048) for ctx in (0, 4096)]
    return cases


def quick_cases() -> list[Case]:
    tiny = ("tiny", 4, 2, 16)
    return [Case(2, 1, 37, tiny, page_size=4, dtype="float32"), Case(2, 9, 21, tiny, page_size=4, dtype="float32")]


SWEEP = {
    Case(8, 1, 2048, LLAMA3_8B): [
        tuning.DecodeBlockSizes(pages_per_block=p, num_splits=s, num_warps=w)
        for p in (4, 8, 16)
        for s in (None, 1)
        for w in (4, 8)
    ],
    Case(1, 2048, 0, LLAMA3_8B): [
        tuning.PrefillBlockSizes(block_q=q, block_k=k, num_warps=w, num_stages=st)
        for q, k, w, st in ((64, 64, 4, 2), (64, 32, 4, 3), (128, 64, 8, 2), (128, 64, 4, 3), (128, 128, 8, 2))
    ],
}


def sweep(reps: int, trials: int) -> str:
    lines = ["| shape | block sizes | pallas ms |", "|---|---|---:|"]
    for case, options in SWEEP.items():
        args = make_inputs(case)
        for blocks in options:
            try:
                ms = f"{time_ms(pallas_fn(case, False, blocks), args, reps, trials):.4f}"
            except Exception as e:  # a tile that does not lower or fit is a result, not a crash
                ms = f"failed: {type(e).__name__}"
            lines.append(f"| {case.label} | {blocks} | {ms} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--interpret", action="store_true", help="run the kernels in the Pallas interpreter")
    parser.add_argument("--quick", action="store_true", help="one tiny shape per kernel (with --interpret)")
    parser.add_argument("--sweep", action="store_true", help="also time a few block sizes (GPU)")
    parser.add_argument("--reps", type=int, default=20, help="calls per timed loop")
    parser.add_argument("--trials", type=int, default=5, help="timed loops per op (median)")
    args = parser.parse_args(argv)

    backend = jax.default_backend()
    device = jax.devices()[0].device_kind
    if backend != "gpu" and not args.interpret:
        print(
            f"The Pallas kernels compile only for a GPU (backend here: {backend}); nothing timed. "
            "Use --interpret --quick for a smoke test of the interpreter path.",
            file=sys.stderr,
        )
        return 0
    if args.interpret and not args.quick:
        print("Interpret mode is for correctness, not speed: add --quick (one tiny shape).", file=sys.stderr)
        return 0
    reps, trials = (1, 1) if args.quick else (args.reps, args.trials)
    floor_rates = next((rates for name, rates in FLOORS.items() if name in device), FLOORS["H100"])
    mode = ", interpret" if args.interpret else ""
    print(f"# Attention kernels on {device} ({backend}, jax {jax.__version__}{mode})")
    print(f"floor = max(bytes / {floor_rates[0]:.1e} B/s, flops / {floor_rates[1]:.1e} flop/s)\n")
    rows = []
    for case in quick_cases() if args.quick else full_cases():
        try:
            rows.append(bench_case(case, args.interpret, reps, trials, floor_rates))
        except Exception as e:  # one shape that fails to lower, compile or fit must not hide the others
            rows.append(dict(case=case, failed=f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:120]}"))
        print(f"  {case.kernel} {case.label}: {rows[-1]}", file=sys.stderr, flush=True)
    print(markdown(rows))
    if args.sweep and not args.interpret:
        print("\n## Block-size sweep\n")
        print(sweep(reps, trials))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Time the Pallas kernels against their `jax.numpy` references, next to each shape's roofline floor.

    python scripts/kernel_bench.py                        # on a GPU: attention and qmatmul, one markdown table
    python scripts/kernel_bench.py --only qmatmul         # just the quantized matmul (or: --only attention)
    python scripts/kernel_bench.py --sweep                # also a few block sizes on representative shapes
    python scripts/kernel_bench.py --interpret --quick    # anywhere: tiny shapes through the interpreter

Attention: paged decode and flash prefill on Llama-3-8B and SmolLM2 heads. Quantized matmul: int8 and
uint4 (groups 32 and 128) at M = 1, 16, 256 on Llama-3-8B projections (K=4096 to N=14336 and N=4096),
against the reference that dequantizes the whole weight to float32 and then multiplies.

Each timing runs the op `--reps` times inside one jitted `fori_loop` (each iteration's query depends on
the previous output, so nothing is hoisted and Python dispatch is out of the measurement), after a warm-up,
and reports the median of `--trials` such loops per op. The floor is max(bytes moved / HBM bandwidth,
flops / bf16 dense peak) for the card found (H100: 3.0e12 B/s, 8.0e14 flop/s; H200: 4.3e12 B/s); for the
quantized matmul the bytes are the stored weights (values, scales, offsets) plus x and the output.
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
from jaxllm.kernels.qmatmul import reference as qreference  # noqa: E402
from jaxllm.kernels.qmatmul import tuning as qtuning  # noqa: E402
from jaxllm.kernels.qmatmul.pallas import pallas_qmatmul  # noqa: E402
from jaxllm.quant.format import QuantizedWeight  # noqa: E402

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

    def inputs(self):
        return make_inputs(self)

    def ours(self, interpret: bool, blocks=None):
        fn = attention.paged_decode_attention if self.kernel == "decode" else attention.flash_prefill_attention
        return functools.partial(fn, interpret=interpret, block_sizes=blocks)

    def reference(self):
        return jax.jit(attention.reference.paged_attention)


@dataclasses.dataclass(frozen=True)
class QCase:
    """One quantized matmul: x [m, k] (`dtype`) times a `kind` weight [n, k] with groups of `group`."""

    m: int
    n: int
    k: int
    kind: str
    group: int
    offset: bool = False
    dtype: str = "bfloat16"
    kernel = "qmatmul"

    @property
    def label(self) -> str:
        return f"{self.kind} g{self.group}{'+off' if self.offset else ''} m{self.m} n{self.n} k{self.k}"

    def cost(self) -> tuple[float, float]:
        """(bytes moved, flops): the stored weight once, x once, the float32 output once."""
        values = self.n * self.k // (2 if self.kind == "uint4" else 1)
        groups = 4 * self.n * (self.k // self.group) * (2 if self.offset else 1)
        nbytes = values + groups + self.m * self.k * jnp.dtype(self.dtype).itemsize + 4 * self.m * self.n
        return float(nbytes), 2.0 * self.m * self.n * self.k

    def inputs(self, seed: int = 0):
        """(x, w) drawn on the device, scales keeping w around 1."""
        keys = jax.random.split(jax.random.key(seed), 4)
        n, k = self.n, self.k
        if self.kind == "uint4":
            q = jax.random.randint(keys[0], (n, k // 2), 0, 256, jnp.int32).astype(jnp.uint8)
        elif self.kind == "int8":
            q = jax.random.randint(keys[0], (n, k), -128, 128, jnp.int32).astype(jnp.int8)
        else:
            q = jax.random.normal(keys[0], (n, k)).astype(jnp.float8_e4m3fn)
        shape = (n, k // self.group)
        scale = jax.random.uniform(keys[1], shape, jnp.float32, 0.5, 1.5) / (16.0 if self.kind == "uint4" else 128.0)
        offset = jax.random.uniform(keys[2], shape, jnp.float32, -1.0, 0.0) if self.offset else None
        w = QuantizedWeight(q, scale, offset, self.kind, self.group, (k,), (n,))
        return jax.random.normal(keys[3], (self.m, k), jnp.dtype(self.dtype)), w

    def ours(self, interpret: bool, blocks=None):
        return functools.partial(pallas_qmatmul, interpret=interpret, block_sizes=blocks)

    def reference(self):
        return jax.jit(qreference.qmatmul)


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


def bench_case(case, interpret: bool, reps: int, trials: int, floor_rates) -> dict:
    args = case.inputs()
    ours = case.ours(interpret)
    ref = case.reference()
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


def attention_cases() -> list[Case]:
    cases = [
        Case(batch, 1, ctx, heads)
        for heads in (LLAMA3_8B, SMOLLM2)
        for batch in (1, 8, 32, 64)
        for ctx in (512, 2048, 8192)
    ]
    cases += [Case(1, seq, ctx, heads) for heads in (LLAMA3_8B, SMOLLM2) for seq in (512, 2048) for ctx in (0, 4096)]
    return cases


LLAMA3_8B_PROJ = ((14336, 4096), (4096, 4096))  # (N, K): gate/up, and q/o projections
QUANTS = (("int8", 32, False), ("int8", 128, False), ("uint4", 32, True), ("uint4", 128, True))


def qmatmul_cases() -> list[QCase]:
    return [
        QCase(m, n, k, kind, group, offset)
        for kind, group, offset in QUANTS
        for n, k in LLAMA3_8B_PROJ
        for m in (1, 16, 256)
    ]


def full_cases(only: str | None = None) -> list:
    return (attention_cases() if only != "qmatmul" else []) + (qmatmul_cases() if only != "attention" else [])


def quick_cases(only: str | None = None) -> list:
    tiny = ("tiny", 4, 2, 16)
    attn = [Case(2, 1, 37, tiny, page_size=4, dtype="float32"), Case(2, 9, 21, tiny, page_size=4, dtype="float32")]
    qmm = [QCase(1, 32, 128, "int8", 32, dtype="float32"), QCase(5, 48, 256, "uint4", 128, True, dtype="float32")]
    return (attn if only != "qmatmul" else []) + (qmm if only != "attention" else [])


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
    QCase(1, 14336, 4096, "uint4", 32, True): [
        qtuning.QMatmulBlockSizes(16, n, k, s, w, st)
        for n, k, s, w, st in ((64, 256, None, 4, 3), (32, 256, None, 4, 3), (64, 512, 1, 4, 3), (128, 128, None, 4, 4))
    ],
    QCase(256, 14336, 4096, "uint4", 32, True): [
        qtuning.QMatmulBlockSizes(m, n, k, 1, w, st)
        for m, n, k, w, st in ((64, 128, 64, 4, 3), (128, 128, 64, 8, 3), (64, 64, 128, 4, 4), (128, 256, 64, 8, 3))
    ],
}


def sweep(reps: int, trials: int, only: str | None = None) -> str:
    lines = ["| shape | block sizes | pallas ms |", "|---|---|---:|"]
    for case, options in SWEEP.items():
        if only and (case.kernel == "qmatmul") != (only == "qmatmul"):
            continue
        args = case.inputs()
        for blocks in options:
            try:
                ms = f"{time_ms(case.ours(False, blocks), args, reps, trials):.4f}"
            except Exception as e:  # a tile that does not lower or fit is a result, not a crash
                ms = f"failed: {type(e).__name__}"
            lines.append(f"| {case.label} | {blocks} | {ms} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--interpret", action="store_true", help="run the kernels in the Pallas interpreter")
    parser.add_argument("--quick", action="store_true", help="one tiny shape per kernel (with --interpret)")
    parser.add_argument("--sweep", action="store_true", help="also time a few block sizes (GPU)")
    parser.add_argument("--only", choices=("attention", "qmatmul"), help="one family of kernels")
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
    print(f"# Pallas kernels on {device} ({backend}, jax {jax.__version__}{mode})")
    print(f"floor = max(bytes / {floor_rates[0]:.1e} B/s, flops / {floor_rates[1]:.1e} flop/s)\n")
    rows = []
    for case in quick_cases(args.only) if args.quick else full_cases(args.only):
        try:
            rows.append(bench_case(case, args.interpret, reps, trials, floor_rates))
        except Exception as e:  # one shape that fails to lower, compile or fit must not hide the others
            rows.append(dict(case=case, failed=f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:120]}"))
        print(f"  {case.kernel} {case.label}: {rows[-1]}", file=sys.stderr, flush=True)
    print(markdown(rows))
    if args.sweep and not args.interpret:
        print("\n## Block-size sweep\n")
        print(sweep(reps, trials, args.only))
    return 0


if __name__ == "__main__":
    sys.exit(main())

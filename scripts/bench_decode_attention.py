"""Decode steps on the CPU by context length: the native attention kernel against the `jax.numpy` reference.

Loads SmolLM2 once and builds one engine per attention implementation (JAXLLM_ATTENTION is read when a
step is traced), then times single compiled decode steps of `--batch` rows whose contexts hold each of
`--contexts` cached tokens, alternating the two implementations: the machine is shared and noisy, so each
figure is the best of `--rounds` medians. Results are printed and written into docs/benchmarks.md between
the `bench:decode-attention` markers.

    python scripts/bench_decode_attention.py [--batch 32] [--contexts 100,500,2000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import write_report  # noqa: E402

BEGIN, END = "<!-- bench:decode-attention -->", "<!-- /bench:decode-attention -->"
IMPLS = ("reference", "native")


def make_step(llm, impl: str, batch: int, context: int):
    """A function that runs one decode step of `batch` rows at `context` cached tokens (compiled first)."""
    from jaxllm import SamplingParams
    from jaxllm.engine import buckets
    from jaxllm.engine.runner import DecodeBatch, flags_for, row_params

    runner, page = llm.runner, llm.engine.page_size
    attn = buckets.attn_bucket(context + 1, llm.max_model_len)
    pages = -(-attn // page)
    tables = np.arange(batch * pages, dtype=np.int32).reshape(batch, pages) % runner.num_pages
    params = [SamplingParams(temperature=0)] * batch
    inputs = DecodeBatch(
        row_params(params, [0] * batch, batch), np.ones(batch, bool), tables, batch, attn, 1, flags_for(params)
    )

    def step():
        # Every step decodes at the same position, so the attended context stays `context` tokens.
        runner.state = dataclasses.replace(runner.state, positions=jnp.full_like(runner.state.positions, context))
        toks, _ = runner.decode(inputs)
        toks.block_until_ready()

    os.environ["JAXLLM_ATTENTION"] = impl
    step()
    return step


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--contexts", type=lambda s: [int(x) for x in s.split(",")], default=[100, 500, 2000])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=10, help="steps timed per round (their median counts)")
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)

    from jaxllm import LLM
    from jaxllm.kernels.attention import native_paged

    if not native_paged.available():
        raise SystemExit("error: the native kernel is unavailable here (see the warning above)")
    max_len = max(args.contexts) + 64
    base = LLM("smollm2", max_num_seqs=args.batch, max_model_len=max_len, progress=False)
    engines = {impl: LLM(loaded=base.loaded, max_num_seqs=args.batch, max_model_len=max_len) for impl in IMPLS}
    del base
    best = {}
    for context in args.contexts:
        for llm in engines.values():
            llm.engine.reserve(args.batch, max_len)
        steps = {impl: make_step(engines[impl], impl, args.batch, context) for impl in IMPLS}
        for _ in range(args.rounds):
            for impl, step in steps.items():
                times = []
                for _ in range(args.steps):
                    t = time.perf_counter()
                    step()
                    times.append(time.perf_counter() - t)
                key = (context, impl)
                best[key] = min(best.get(key, float("inf")), statistics.median(times))
    lines = [
        f"| cached tokens | reference step | native step | reference / native | native tok/s (batch {args.batch}) |",
        "|---|---|---|---|---|",
    ]
    for context in args.contexts:
        ref, nat = best[(context, "reference")], best[(context, "native")]
        lines.append(
            f"| {context} | {ref * 1e3:.1f} ms | {nat * 1e3:.1f} ms | {ref / nat:.2f}× | {args.batch / nat:.0f} |"
        )
    table = "\n".join(lines)
    print(table)
    if not args.no_write:
        write_report(
            BEGIN,
            END,
            "Decode attention on the CPU: native kernel vs reference (SmolLM2-135M, float32)",
            f" on {os.cpu_count()} CPU cores; one compiled decode step of {args.batch} rows (layer scan, greedy), "
            f"every row at the given context; best of {args.rounds} alternating medians of {args.steps} steps.",
            f"python scripts/bench_decode_attention.py --batch {args.batch} "
            f"--contexts {','.join(map(str, args.contexts))} --rounds {args.rounds}",
            table,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

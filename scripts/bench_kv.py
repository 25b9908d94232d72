"""KV cache benchmark: paged vs contiguous decode, prefix caching TTFT, and capacity under a fixed budget.

On this machine, with SmolLM2 (float32), in one process:
- decode at batch 32: the paged cache (16-token pages) against the contiguous layout (one page of
  max_model_len tokens per sequence), alternating, best of --repeats; decode excludes the prefill;
- time to first token of 32 requests that share a 512-token system prompt and arrive together, with
  prefix caching on and off (each measured on a fresh prompt, after a warm-up that compiles);
- how many concurrent 2k-token sequences a fixed KV budget holds, paged vs contiguous (a model's
  full context reserved per slot), counted by running the scheduler itself on that workload.
Results are printed and written into docs/benchmarks.md between the `bench:kv` markers.

    python scripts/bench_kv.py [--tokens 64] [--repeats 3] [--budget-gib 4]
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
from bench import write_report  # noqa: E402

BEGIN, END = "<!-- bench:kv -->", "<!-- /bench:kv -->"
MAX_LEN = 1024


def _ids(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(100, 30000) for _ in range(n)]


def decode_speed(loaded, tokens: int, repeats: int) -> dict:
    """Aggregate decode tokens/s at batch 32 for the paged and the contiguous layout."""
    from jaxllm import LLM, SamplingParams

    params = {n: SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in (1, tokens)}
    llms = {
        "paged": LLM(loaded=loaded, max_model_len=MAX_LEN, page_size=16, prefix_caching=False),
        "contiguous": LLM(loaded=loaded, max_model_len=MAX_LEN, page_size=MAX_LEN, prefix_caching=False),
    }
    prompts = [_ids(i, 32) for i in range(32)]

    def run(llm, n):
        t = time.perf_counter()
        llm.generate(prompts, params[n], use_tqdm=False)
        return time.perf_counter() - t

    for llm in llms.values():  # compile every bucket first
        run(llm, tokens)
    best = {name: {1: float("inf"), tokens: float("inf")} for name in llms}
    for _ in range(repeats):
        for name, llm in llms.items():
            for n in (1, tokens):
                best[name][n] = min(best[name][n], run(llm, n))
    return {name: 32 * (tokens - 1) / (b[tokens] - b[1]) for name, b in best.items()}


def prefix_ttft(loaded, system_len: int = 512, requests: int = 32) -> dict:
    """TTFT (s) of `requests` prompts sharing a system prompt, all added at once; caching on and off."""
    from jaxllm import LLM, SamplingParams

    out = {}
    for caching in (True, False):
        llm = LLM(loaded=loaded, max_model_len=MAX_LEN, prefix_caching=caching)
        for round_ in range(2):  # round 0 compiles; round 1, on a new system prompt, is measured
            system = _ids(1000 + round_, system_len)
            prompts = [system + _ids(2000 + i, 16 + i % 8) for i in range(requests)]
            engine = llm.engine
            llm.engine.reserve(requests, MAX_LEN)
            params = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)
            before = engine.prefilled_tokens
            t0 = time.perf_counter()
            seqs = [engine.add_request(p, params)[0] for p in prompts]
            first: dict[int, float] = {}
            while engine.has_unfinished():
                for u in engine.step():
                    if u.token_ids and id(u.seq) not in first:
                        first[id(u.seq)] = time.perf_counter() - t0
            ttft = sorted(first[id(s)] for s in seqs)
        out[caching] = {
            "p50": statistics.median(ttft),
            "mean": statistics.fmean(ttft),
            "max": ttft[-1],
            "prefilled": engine.prefilled_tokens - before,
        }
    return out


def capacity(cfg, budget_gib: float, seq_len: int = 2048) -> dict:
    """Concurrent `seq_len`-token sequences within the budget: paged vs one max-context row per slot."""
    from jaxllm.engine.kv_pages import PagePool
    from jaxllm.engine.scheduler import Scheduler
    from jaxllm.engine.sequence import Sequence
    from jaxllm.sampling_params import SamplingParams

    per_token = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * 4
    budget = int(budget_gib * 2**30)

    class Tok:
        def decode(self, ids, skip_special_tokens=True):
            return ""

    def simulate(num_pages: int, page_size: int) -> tuple[int, int]:
        sched = Scheduler(512, 1 << 20, pool=PagePool(num_pages, page_size, prefix_caching=False))
        params = SamplingParams(temperature=0, max_tokens=64, ignore_eos=True)
        for i in range(128):
            sched.add([Sequence(f"r{i}", 0, _ids(i, seq_len - 64), params, 0, Tok(), (), 1 << 20)])
        peak = 0
        while sched.has_work():
            plan = sched.schedule()
            for c in plan.prefills:
                if c.last:
                    c.seq.inflight -= 1
                    c.seq.append(5, None)
            for s in plan.decodes:
                s.inflight -= plan.decode_steps
                for _ in range(plan.decode_steps):
                    s.append(5, None)
            full = sum(1 for s in sched.running.values() if s.num_tokens >= seq_len - 1)
            peak = max(peak, full)
            for s in list(sched.running.values()):
                if s.finished:
                    sched.release(s)
        return peak, sched.preemptions

    page_size = 16
    ctx = cfg.max_position_embeddings
    paged_pages = budget // (per_token * page_size)
    slots = budget // (per_token * ctx)
    paged_peak, paged_preempt = simulate(paged_pages, page_size)
    contig_peak, _ = simulate(slots, ctx)
    return {
        "per_token": per_token,
        "context": ctx,
        "paged": paged_peak,
        "paged_preemptions": paged_preempt,
        "contiguous": contig_peak,
        "paged_bound": paged_pages // -(-seq_len // page_size),
        "contiguous_bound": slots,
    }


def table(res: dict, args) -> str:
    d, p, c = res["decode"], res["prefix"], res["capacity"]
    on, off = p[True], p[False]
    lines = [
        "| measurement | paged / caching on | contiguous / caching off | ratio |",
        "|---|---|---|---|",
        f"| decode, batch 32, aggregate | {d['paged']:.1f} tok/s | {d['contiguous']:.1f} tok/s | "
        f"{d['paged'] / d['contiguous']:.2f}× |",
        f"| TTFT p50, 32 requests sharing a 512-token system prompt | {on['p50']:.2f} s | {off['p50']:.2f} s | "
        f"{off['p50'] / on['p50']:.1f}× faster |",
        f"| TTFT mean, same workload | {on['mean']:.2f} s | {off['mean']:.2f} s | {off['mean'] / on['mean']:.1f}× |",
        f"| prompt tokens prefilled, same workload | {on['prefilled']} | {off['prefilled']} | "
        f"{off['prefilled'] / on['prefilled']:.1f}× fewer |",
        f"| 2k-token sequences at full length at once, {args.budget_gib:g} GiB budget | {c['paged']} "
        f"(bound {c['paged_bound']}) | {c['contiguous']} (bound {c['contiguous_bound']}) | "
        f"{c['paged'] / max(c['contiguous'], 1):.1f}× |",
    ]
    notes = [
        "",
        f"- Paged decode at batch 32 / contiguous decode: **{d['paged'] / d['contiguous']:.2f}** (target ≥ 0.90)",
        f"- TTFT p50 with prefix caching off / on: **{off['p50'] / on['p50']:.1f}×** (target ≥ 3×)",
        f"- Capacity: a KV token of SmolLM2 takes {c['per_token'] / 1024:.0f} KiB (float32); the contiguous "
        f"layout reserves the model's full {c['context']}-token context per slot, the paged one only the "
        f"pages a sequence fills ({c['paged_preemptions']} preemptions in the paged simulation of 128 requests).",
    ]
    return "\n".join(lines + notes)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--budget-gib", type=float, default=4.0)
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)
    from jaxllm.loading.load import load_model

    loaded = load_model(args.model, progress=False)
    res = {"capacity": capacity(loaded.config, args.budget_gib)}
    print("capacity", res["capacity"], flush=True)
    res["decode"] = decode_speed(loaded, args.tokens, args.repeats)
    print("decode", res["decode"], flush=True)
    res["prefix"] = prefix_ttft(loaded)
    print("prefix", res["prefix"], flush=True)
    text = table(res, args)
    print(text)
    if not args.no_write:
        write_report(
            BEGIN,
            END,
            "KV cache: paged vs contiguous, prefix caching (CPU, float32, SmolLM2-135M)",
            f"; {args.tokens} generated tokens per request for decode, best of {args.repeats}.",
            f"python scripts/bench_kv.py --tokens {args.tokens} --repeats {args.repeats} "
            f"--budget-gib {args.budget_gib:g}",
            text,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

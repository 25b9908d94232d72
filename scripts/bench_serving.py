"""Serving benchmark: concurrent streaming clients against a running jaxllm server, on this machine.

Starts `jaxllm serve` in a subprocess (or uses --url), then measures, with streaming completions of
fixed lengths (token-id prompts, `ignore_eos`):
- closed loop with 1, 8 and 32 concurrent clients: output tokens/s, time to first token (TTFT) and
  inter-token latency (per request: (last token time - first token time) / (tokens - 1)), p50/p99;
- Poisson arrivals at --rate requests/s;
- TTFT at 8 concurrent streams with 256-token prompts;
- `--pairs` back-to-back pairs of a 1-client and a 32-client closed loop, for the 32/1 ratio;
- offline `LLM.generate` of the same 32-request batch in this process, for the served/offline ratio.
Results are printed and written into docs/benchmarks.md between the `bench:serving` markers.

    python scripts/bench_serving.py [--tokens 64] [--rounds 2] [--rate 2] [--url http://127.0.0.1:8000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from jaxllm.serving.launch import spawn_server

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
from bench import write_report  # noqa: E402

BEGIN, END = "<!-- bench:serving -->", "<!-- /bench:serving -->"
BURST = "8 clients, 256-token prompts, 1 burst"
LOCKSTEP = "8 clients, 256-token prompts, closed loop x3, in lockstep"
STAGGERED = "8 clients, 256-token prompts, closed loop x3, staggered starts"


def _prompt(i: int, length: int) -> list[int]:
    rng = random.Random(i)
    return [rng.randrange(100, 30000) for _ in range(length)]


async def one_request(client, url, prompt, tokens) -> dict:
    body = {
        "model": "smollm2",
        "prompt": prompt,
        "max_tokens": tokens,
        "min_tokens": tokens,
        "ignore_eos": True,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    start = time.perf_counter()
    first = last = None
    usage = None
    async with client.stream("POST", url + "/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            msg = json.loads(line[6:])
            now = time.perf_counter()
            if msg.get("usage"):
                usage = msg["usage"]
            if msg["choices"] and msg["choices"][0]["text"]:
                first = first or now
                last = now
    n = usage["completion_tokens"]
    return {"ttft": first - start, "itl": (last - first) / max(n - 1, 1), "tokens": n, "end": last}


async def closed_loop(
    url, clients: int, rounds: int, prompt_len: int, tokens: int, base: int = 0, stagger: float = 0.0
) -> dict:
    """`clients` workers, each sending `rounds` requests one after the other; prompts seeded from `base`
    (give each workload its own base: a prompt seen before would be served from the prefix cache).
    stagger: worker w starts w * stagger seconds late (0: all at once, and with equal lengths they stay
    in lockstep, so every round is a burst)."""
    async with httpx.AsyncClient(timeout=600) as client:
        start = time.perf_counter()

        async def worker(w):
            await asyncio.sleep(w * stagger)
            return [
                await one_request(client, url, _prompt(base + w * 1000 + r, prompt_len), tokens) for r in range(rounds)
            ]

        results = [x for xs in await asyncio.gather(*(worker(w) for w in range(clients))) for x in xs]
        wall = time.perf_counter() - start
    return summarize(results, wall)


async def poisson(url, rate: float, count: int, prompt_len: int, tokens: int, base: int = 0) -> dict:
    rng = random.Random(0)
    async with httpx.AsyncClient(timeout=600) as client:
        start = time.perf_counter()
        tasks = []
        for i in range(count):
            tasks.append(asyncio.create_task(one_request(client, url, _prompt(base + i, prompt_len), tokens)))
            await asyncio.sleep(rng.expovariate(rate))
        results = await asyncio.gather(*tasks)
        wall = time.perf_counter() - start
    return summarize(results, wall)


async def ratio_pairs(url, pairs: int, prompt_len: int, tokens: int) -> list[float]:
    """32-client / 1-client throughput, each pair measured back to back: a ratio taken from one table's two
    rows, minutes apart, carries this shared machine's drift."""
    ratios = []
    for i in range(pairs):
        one = await closed_loop(url, 1, 4, prompt_len, tokens, base=(6 + i) * 10**8)
        many = await closed_loop(url, 32, 2, prompt_len, tokens, base=(6 + i) * 10**8 + 10**7)
        ratios.append(many["tok_s"] / one["tok_s"])
    return ratios


def summarize(results: list[dict], wall: float) -> dict:
    def pct(key, q):
        xs = sorted(r[key] for r in results)
        return xs[min(len(xs) - 1, int(q * len(xs)))]

    return {
        "tok_s": sum(r["tokens"] for r in results) / wall,
        "requests": len(results),
        "ttft_p50": statistics.median(r["ttft"] for r in results),
        "ttft_p99": pct("ttft", 0.99),
        "itl_p50": statistics.median(r["itl"] for r in results),
        "itl_p99": pct("itl", 0.99),
    }


def offline_throughput(batch: int, prompt_len: int, tokens: int, max_len: int, scan_layers: bool) -> float:
    """`LLM.generate` of the batch with its own defaults (4 decode steps per dispatch), the server's layers."""
    from jaxllm import LLM, SamplingParams

    llm = LLM("smollm2", max_num_seqs=batch, max_model_len=max_len, progress=False, scan_layers=scan_layers)
    prompts = [_prompt(i, prompt_len) for i in range(batch)]
    params = SamplingParams(temperature=0, max_tokens=tokens, min_tokens=tokens, ignore_eos=True)
    llm.generate(prompts, params, use_tqdm=False)
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    return sum(len(o.outputs[0].token_ids) for o in outs) / (time.perf_counter() - start)


def start_server(args) -> tuple[subprocess.Popen, str, float]:
    """The server, its url, and the seconds from launch to a healthy /health (every step compiled; with
    --cold-start, into an empty compilation cache)."""
    serve_args = ["--max-seqs", "32", "--max-model-len", str(args.max_model_len), "--log-level", "warning"]
    serve_args += ["--layers", args.layers, "--decode-steps", str(args.decode_steps)]
    serve_args += ["--max-num-batched-tokens", str(args.token_budget)]
    serve_args += [] if args.mixed_step is None else ["--mixed-step" if args.mixed_step else "--no-mixed-step"]
    env = dict(os.environ)
    if args.cold_start:
        env["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="jaxllm-bench-xla-")
    start = time.perf_counter()
    try:
        proc, url = spawn_server(serve_args, timeout=900, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    except RuntimeError as e:
        raise SystemExit(f"error: {e}") from None
    return proc, url, time.perf_counter() - start


async def warm(url, prompt_len, tokens):
    """Touch every batch-size bucket once so that compilation stays out of the measurements."""
    async with httpx.AsyncClient(timeout=600) as client:
        for n in (1, 2, 4, 8, 16, 32):
            await asyncio.gather(
                *(one_request(client, url, _prompt(9000 + 100 * n + i, prompt_len), tokens) for i in range(n))
            )
        for n in (1, 2, 4, 8):  # 256-token prompts, alone and together, with their longer decode context
            await asyncio.gather(*(one_request(client, url, _prompt(9100 + 10 * n + i, 256), 8) for i in range(n)))


def table(res: dict, args) -> str:
    lines = ["| workload | output tok/s | TTFT p50 | TTFT p99 | ITL p50 | ITL p99 |", "|---|---|---|---|---|---|"]
    for name, r in res["runs"].items():
        lines.append(
            f"| {name} | {r['tok_s']:.1f} | {r['ttft_p50']:.3f} s | {r['ttft_p99']:.3f} s | "
            f"{r['itl_p50'] * 1e3:.1f} ms | {r['itl_p99'] * 1e3:.1f} ms |"
        )
    runs = res["runs"]
    if len(runs) < 8 or not res["offline"]:
        return "\n".join(lines)
    c1, c32 = runs["closed loop, 1 client"]["tok_s"], runs["closed loop, 32 clients"]["tok_s"]
    pairs = ", ".join(f"{r:.2f}×" for r in res["pairs"])
    lines += [
        "",
        f"- 32 concurrent streams / 1 stream: **{c32 / c1:.1f}×** (target ≥ 8×)"
        + (f"; in back-to-back pairs {pairs}, median **{statistics.median(res['pairs']):.2f}×**" if pairs else ""),
        f"- served 32-stream throughput / offline `LLM.generate` of the same batch ({res['offline']:.1f} tok/s): "
        f"**{100 * runs['one batch of 32, all at once']['tok_s'] / res['offline']:.0f}%** (target ≥ 90%)",
        "- TTFT p50 at 8 concurrent streams with 256-token prompts (target < 1 s): "
        f"**{runs[STAGGERED]['ttft_p50']:.3f} s** with staggered clients, "
        f"**{runs[LOCKSTEP]['ttft_p50']:.3f} s** with clients in lockstep, "
        f"**{runs[BURST]['ttft_p50']:.3f} s** for one burst of 8",
    ]
    return "\n".join(lines)


def write_doc(text: str, args) -> None:
    write_report(
        BEGIN,
        END,
        "Serving: concurrent streaming clients (CPU, float32, SmolLM2-135M)",
        f" on {os.cpu_count()} CPU cores; {args.tokens} output tokens per request, prompts of {args.prompt_len} "
        "tokens unless stated; streaming `/v1/completions` over loopback.",
        f"python scripts/bench_serving.py --tokens {args.tokens} --rounds {args.rounds} --rate {args.rate} "
        f"--stagger {args.stagger} --decode-steps {args.decode_steps} --layers {args.layers} --pairs {args.pairs} "
        f"--token-budget {args.token_budget}"
        + ("" if args.mixed_step is None else " --mixed-step" if args.mixed_step else " --no-mixed-step")
        + (" --cold-start" if args.cold_start else ""),
        text,
    )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default=None, help="a running server (default: start one)")
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--rounds", type=int, default=2, help="requests per client in the closed loops")
    p.add_argument("--rate", type=float, default=2.0, help="Poisson arrival rate, requests/s")
    p.add_argument("--max-model-len", type=int, default=512)
    p.add_argument("--layers", default="scan", choices=["scan", "unrolled"], help="the server's --layers")
    p.add_argument("--decode-steps", type=int, default=2, help="the server's --decode-steps")
    p.add_argument(
        "--mixed-step",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="the server runs prefill and decode as one mixed step, or not (default: the server's default)",
    )
    p.add_argument("--token-budget", type=int, default=256, help="the server's --max-num-batched-tokens")
    p.add_argument("--cold-start", action="store_true", help="start the server with an empty compilation cache")
    p.add_argument("--stagger", type=float, default=1.0, help="seconds between client starts, staggered loop")
    p.add_argument("--only", default="", help="run only the workloads whose name contains this (no doc update)")
    p.add_argument("--pairs", type=int, default=3, help="back-to-back 1-client/32-client pairs for the ratio")
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)
    proc, url, healthy = (None, args.url, 0.0) if args.url else start_server(args)
    if proc is not None:
        print(f"start to healthy: {healthy:.1f} s ({'empty' if args.cold_start else 'persistent'} compilation cache)")
    try:
        asyncio.run(warm(url, args.prompt_len, args.tokens))
        workloads = {}
        for clients in (1, 8, 32):
            rounds = args.rounds * (2 if clients == 1 else 1)
            workloads[f"closed loop, {clients} client{'s' if clients > 1 else ''}"] = lambda c=clients, r=rounds: (
                closed_loop(url, c, r, args.prompt_len, args.tokens, base=c * 10**6)
            )
        workloads["one batch of 32, all at once"] = lambda: closed_loop(
            url, 32, 1, args.prompt_len, args.tokens, base=10**8
        )
        workloads[f"Poisson arrivals, {args.rate}/s"] = lambda: poisson(
            url, args.rate, 32, args.prompt_len, args.tokens, base=2 * 10**8
        )
        workloads[BURST] = lambda: closed_loop(url, 8, 1, 256, args.tokens, base=3 * 10**8)
        workloads[LOCKSTEP] = lambda: closed_loop(url, 8, 3, 256, args.tokens, base=4 * 10**8)
        workloads[STAGGERED] = lambda: closed_loop(url, 8, 3, 256, args.tokens, base=5 * 10**8, stagger=args.stagger)
        runs = {name: asyncio.run(make()) for name, make in workloads.items() if args.only in name}
        pairs = [] if args.only else asyncio.run(ratio_pairs(url, args.pairs, args.prompt_len, args.tokens))
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(60)
    offline = (
        0.0
        if args.only
        else offline_throughput(32, args.prompt_len, args.tokens, args.max_model_len, args.layers == "scan")
    )
    text = table({"runs": runs, "offline": offline, "pairs": pairs}, args)
    if proc is not None:
        cache = "an empty" if args.cold_start else "the persistent"
        text += f"\n- start to healthy (every step shape compiled, {cache} compilation cache): **{healthy:.1f} s**"
    print(text)
    if not (args.no_write or args.only):
        write_doc(text, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())

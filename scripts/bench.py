"""Offline benchmark: jaxllm against transformers on the same weights, in one run, on this machine.

Each engine runs in its own subprocess (so that peak memory is its own), one after the other.
Decode speed is measured as (tokens - 1) / (time for `tokens` - time for 1 token), which takes the
prefill out; every time is the best of --repeats runs, for both engines alike: the machine is shared,
and the fastest run is the one least disturbed by neighbours. Results are printed and written into
docs/benchmarks.md between the `bench:core` markers.

    python scripts/bench.py [--model smollm2] [--tokens 64] [--repeats 3] [--no-transformers]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "benchmarks.md"
BEGIN, END = "<!-- bench:core -->", "<!-- /bench:core -->"
QUESTIONS = [
    "Tell me a story about a dragon.",
    "Explain how rain forms.",
    "Write a poem about autumn.",
    "Describe the city of Paris.",
    "What makes a good friend?",
    "How do airplanes fly?",
    "Summarize the history of Rome.",
    "Give advice to a new programmer.",
]


def _best_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def _peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def worker_jaxllm(args) -> dict:
    from jaxllm import LLM, SamplingParams

    t = time.perf_counter()
    # The same prompts run again and again here: with prefix caching they would skip their prefill.
    llm = LLM(args.model, progress=False, prefix_caching=False)
    load_s = time.perf_counter() - t
    prompts = [
        llm.tokenizer.encode(llm.apply_chat_template([{"role": "user", "content": q}]), add_special_tokens=False)
        for q in QUESTIONS
    ]
    fixed = lambda n: SamplingParams(temperature=0, max_tokens=n, min_tokens=n)
    t = time.perf_counter()
    llm.generate(prompts[0], fixed(8), use_tqdm=False)
    first_s = time.perf_counter() - t
    out = {"load_s": load_s, "first_call_s": first_s}
    for b in args.batches:
        batch = [prompts[i % len(prompts)] for i in range(b)]

        def run(n, batch=batch):
            return llm.generate(batch, fixed(n), use_tqdm=False)

        run(args.tokens), run(1)  # compile every bucket this size touches
        t_n = _best_time(lambda run=run: run(args.tokens), args.repeats)
        t_1 = _best_time(lambda run=run: run(1), args.repeats)
        out[f"decode_b{b}_tps"] = b * (args.tokens - 1) / (t_n - t_1)
    long = [(7 * i) % 30000 + 100 for i in range(512)]
    llm.generate(long, fixed(1), use_tqdm=False)
    out["prefill512_s"] = _best_time(lambda: llm.generate(long, fixed(1), use_tqdm=False), args.repeats)
    out["peak_rss_gib"] = _peak_rss_gib()
    return out


def worker_transformers(args) -> dict:
    import torch
    import transformers

    from jaxllm.loading.resolve import resolve_model

    files = resolve_model(args.model)
    t = time.perf_counter()
    kw = dict(gguf_file=files.path.name) if files.kind == "gguf" else {}
    folder = files.path.parent if files.kind == "gguf" else files.path
    tok = transformers.AutoTokenizer.from_pretrained(folder, **kw)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **kw).eval()
    load_s = time.perf_counter() - t
    prompts = [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True) for q in QUESTIONS]
    prompts = [p if isinstance(p, list) else p["input_ids"] for p in prompts]

    def gen(batch, n):
        tok.padding_side = "left"
        width = max(len(p) for p in batch)
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in batch])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
        with torch.no_grad():
            model.generate(
                ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=pad
            )

    t = time.perf_counter()
    gen(prompts[:1], 8)
    out = {"load_s": load_s, "first_call_s": time.perf_counter() - t}
    for b in args.hf_batches:
        batch = [prompts[i % len(prompts)] for i in range(b)]
        t_n = _best_time(lambda batch=batch: gen(batch, args.tokens), args.repeats)
        t_1 = _best_time(lambda batch=batch: gen(batch, 1), args.repeats)
        out[f"decode_b{b}_tps"] = b * (args.tokens - 1) / (t_n - t_1)
    long = torch.tensor([[(7 * i) % 30000 + 100 for i in range(512)]])
    with torch.no_grad():
        model(long)
        out["prefill512_s"] = _best_time(lambda: model(long), args.repeats)
    out["peak_rss_gib"] = _peak_rss_gib()
    return out


def _run_worker(name: str, argv: list[str]) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", name, *argv]
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"error: the {name} benchmark failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _table(res: dict, args) -> str:
    j, h = res["jaxllm"], res.get("transformers")
    rows = [("first call (load excluded; compile for jaxllm)", "first_call_s", "s"), ("model load", "load_s", "s")]
    rows += [(f"decode, batch {b} (aggregate)", f"decode_b{b}_tps", "tok/s") for b in args.batches]
    rows += [("prefill, 512-token prompt", "prefill512_s", "s"), ("peak memory (RSS)", "peak_rss_gib", "GiB")]
    lines = ["| metric | jaxllm | transformers | jaxllm / transformers |", "|---|---|---|---|"]
    for label, key, unit in rows:
        jv = j.get(key)
        hv = h.get(key) if h else None
        ratio = f"{jv / hv:.2f}×" if hv and jv is not None else "—"
        fmt = lambda v, unit=unit: f"{v:.2f} {unit}" if v is not None else "—"
        lines.append(f"| {label} | {fmt(jv)} | {fmt(hv)} | {ratio} |")
    if h and "decode_b1_tps" in h:
        lines.append("")
        for b in args.batches:
            if b > 1:
                lines.append(
                    f"- jaxllm batch-{b} aggregate / transformers batch-1: "
                    f"**{j[f'decode_b{b}_tps'] / h['decode_b1_tps']:.1f}×**"
                )
        lines.append(
            f"- jaxllm batch-1 decode / transformers batch-1: **{j['decode_b1_tps'] / h['decode_b1_tps']:.2f}×**"
        )
        lines.append(
            f"- prefill-512, transformers time / jaxllm time: **{h['prefill512_s'] / j['prefill512_s']:.2f}×**"
        )
    return "\n".join(lines)


def write_section(begin: str, end: str, block: str) -> None:
    """Put `block` (which starts with `begin` and ends with `end`) into docs/benchmarks.md, replacing the old one."""
    text = DOC.read_text() if DOC.exists() else "# Benchmarks\n\nFigures measured on this project's machines.\n"
    if begin in text and end in text:
        text = text[: text.index(begin)] + block + text[text.index(end) + len(end) :]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    DOC.parent.mkdir(exist_ok=True)
    DOC.write_text(text)


def write_report(begin: str, end: str, title: str, conditions: str, command: str, table: str) -> None:
    """Write one benchmark's section: its title, when it ran and under which conditions (text that follows
    "Run <time>"), the command that reproduces it, and its table."""
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    write_section(begin, end, f"{begin}\n## {title}\n\nRun {stamp}{conditions}\nCommand: `{command}`\n\n{table}\n{end}")


def write_doc(table: str, args) -> None:
    write_report(
        BEGIN,
        END,
        "Core engine: jaxllm vs transformers (CPU, float32)",
        f" on {os.cpu_count()} CPU cores, Python {platform.python_version()}; model `{args.model}`, "
        f"{args.tokens} generated tokens, best of {args.repeats}; decode excludes the prefill.",
        f"python scripts/bench.py --tokens {args.tokens} --repeats {args.repeats}",
        table,
    )


def parse(argv):
    p = argparse.ArgumentParser(prog="jaxllm bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--tokens", type=int, default=64, help="tokens generated per request")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--batches", type=lambda s: [int(x) for x in s.split(",")], default=[1, 8, 32])
    p.add_argument("--hf-batches", type=lambda s: [int(x) for x in s.split(",")], default=[1])
    p.add_argument("--no-transformers", action="store_true", help="measure jaxllm only")
    p.add_argument("--no-write", action="store_true", help="print, do not update docs/benchmarks.md")
    p.add_argument("--worker", choices=["jaxllm", "transformers"], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.tokens < 2 or args.repeats < 1:
        p.error("--tokens must be >= 2 and --repeats >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse(argv)
    if args.worker:
        fn = worker_jaxllm if args.worker == "jaxllm" else worker_transformers
        print(json.dumps(fn(args)))
        return 0
    passthrough = [
        "--model",
        args.model,
        "--tokens",
        str(args.tokens),
        "--repeats",
        str(args.repeats),
        "--batches",
        ",".join(map(str, args.batches)),
        "--hf-batches",
        ",".join(map(str, args.hf_batches)),
    ]
    res = {"jaxllm": _run_worker("jaxllm", passthrough)}
    if not args.no_transformers:
        res["transformers"] = _run_worker("transformers", passthrough)
    table = _table(res, args)
    print(table)
    if not args.no_write:
        write_doc(table, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())

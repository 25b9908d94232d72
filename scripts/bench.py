"""Offline benchmark: jaxllm's weight modes against transformers and llama.cpp on the same weights, in one run.

jaxllm runs once per weight mode (--modes): `f32` (the GGUF dequantized to float32), `gguf` (its blocks
kept quantized), and in-situ quantization `int8`, `int4` (group 32), `fp8` of the float weights. The peers
are transformers (float32) and llama.cpp (llama-cpp-python on the same GGUF; `make bench` builds it for
this CPU). Each engine and mode runs in its own subprocess (so that peak memory is its own), one after the other.
Decode speed is measured as (tokens - 1) / (time for `tokens` - time for 1 token), which takes the
prefill out; every time is the best of --repeats runs, for both engines alike: the machine is shared,
and the fastest run is the one least disturbed by neighbours. Results are printed and written into
docs/benchmarks.md between the `bench:core` markers.

    python scripts/bench.py [--model smollm2] [--tokens 64] [--repeats 3] [--modes f32,gguf] [--peers llama.cpp]
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


def best_time(fn, repeats: int) -> float:
    """The fastest of `repeats` timed calls of fn(), in seconds (the other benchmark scripts use it too)."""
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def best_of_rounds(calls, repeats: int) -> dict:
    """The fastest of `repeats` timed calls of each (key, fn) in `calls`, in seconds by key, timed in rounds over
    all of them so that the machine's drift hits them alike (each is called once before, untimed, by the caller:
    its compile)."""
    best = {key: float("inf") for key, _ in calls}
    for _ in range(repeats):
        for key, fn in calls:
            best[key] = min(best[key], best_time(fn, 1))
    return best


def tokens_parser(doc: str, tokens: int) -> argparse.ArgumentParser:
    """The arguments the small benchmarks share: --tokens per prompt, --repeats (rounds), --no-write."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=tokens)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-write", action="store_true")
    return p


def _peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


MODES = {  # --modes name -> LLM keyword arguments
    "f32": dict(dequantize=True),
    "gguf": dict(dequantize=False),
    "int8": dict(quant="int8"),
    "int4": dict(quant="int4"),
    "fp8": dict(quant="fp8"),
    "gguf-bf16dot": dict(dequantize=False),
}
MODE_ENV = {"gguf-bf16dot": {"JAXLLM_QMATMUL_BF16": "1"}}  # the kernel's opt-in bf16 dot products (>= 16 rows)
PEERS = ("transformers", "llama.cpp")


def _mode_kwargs(mode: str) -> dict:
    """LLM keyword arguments of a mode: one of MODES, or any other ISQ scheme name ('int4-g64', ...)."""
    return MODES.get(mode) or dict(quant=mode)


def worker_jaxllm(args) -> dict:
    from jaxllm import LLM, SamplingParams

    t = time.perf_counter()
    # The same prompts run again and again here: with prefix caching they would skip their prefill.
    llm = LLM(
        args.model,
        progress=False,
        prefix_caching=False,
        tensor_parallel=args.tensor_parallel,
        data_parallel=args.data_parallel,
        **_mode_kwargs(args.mode),
    )
    load_s = time.perf_counter() - t
    prompts = [
        llm.tokenizer.encode(llm.apply_chat_template([{"role": "user", "content": q}]), add_special_tokens=False)
        for q in QUESTIONS
    ]
    fixed = lambda n: SamplingParams(temperature=0, max_tokens=n, min_tokens=n)
    t = time.perf_counter()
    llm.generate(prompts[0], fixed(8), use_tqdm=False)
    first_s = time.perf_counter() - t
    out = {"load_s": load_s, "first_call_s": first_s, "weight_mib": llm.weight_bytes / 2**20}
    for b in args.batches:
        batch = [prompts[i % len(prompts)] for i in range(b)]

        def run(n, batch=batch):
            return llm.generate(batch, fixed(n), use_tqdm=False)

        run(args.tokens), run(1)  # compile every bucket this size touches
        t_n = best_time(lambda run=run: run(args.tokens), args.repeats)
        t_1 = best_time(lambda run=run: run(1), args.repeats)
        out[f"decode_b{b}_tps"] = b * (args.tokens - 1) / (t_n - t_1)
    long = [(7 * i) % 30000 + 100 for i in range(512)]
    llm.generate(long, fixed(1), use_tqdm=False)
    out["prefill512_s"] = best_time(lambda: llm.generate(long, fixed(1), use_tqdm=False), args.repeats)
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
        t_n = best_time(lambda batch=batch: gen(batch, args.tokens), args.repeats)
        t_1 = best_time(lambda batch=batch: gen(batch, 1), args.repeats)
        out[f"decode_b{b}_tps"] = b * (args.tokens - 1) / (t_n - t_1)
    long = torch.tensor([[(7 * i) % 30000 + 100 for i in range(512)]])
    with torch.no_grad():
        model(long)
        out["prefill512_s"] = best_time(lambda: model(long), args.repeats)
    out["peak_rss_gib"] = _peak_rss_gib()
    return out


def worker_llama_cpp(args) -> dict:
    """llama.cpp through llama-cpp-python on the same GGUF file, greedy, one sequence, all cores."""
    from llama_cpp import Llama

    from jaxllm.loading.resolve import resolve_model

    files = resolve_model(args.model)
    if files.kind != "gguf":
        raise SystemExit("llama.cpp runs GGUF files only")
    t = time.perf_counter()
    llm = Llama(model_path=str(files.path), n_ctx=1024, n_batch=512, n_threads=os.cpu_count(), verbose=False)
    load_s = time.perf_counter() - t
    prompt = llm.tokenize(QUESTIONS[0].encode())

    def decode(n):
        llm.reset()
        llm.eval(prompt)
        for _ in range(n):
            llm.eval([llm.sample(temp=0.0)])

    t = time.perf_counter()
    decode(8)
    out = {"load_s": load_s, "first_call_s": time.perf_counter() - t, "weight_mib": files.path.stat().st_size / 2**20}
    t_n = best_time(lambda: decode(args.tokens), args.repeats)
    t_1 = best_time(lambda: decode(1), args.repeats)
    out["decode_b1_tps"] = (args.tokens - 1) / (t_n - t_1)
    long = [(7 * i) % 30000 + 100 for i in range(512)]

    def prefill():
        llm.reset()
        llm.eval(long)

    prefill()
    out["prefill512_s"] = best_time(prefill, args.repeats)
    out["peak_rss_gib"] = _peak_rss_gib()
    return out


def _run_worker(name: str, argv: list[str], extra_env: dict | None = None) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", name, *argv]
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), **(extra_env or {})}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"error: the {name} benchmark failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _table(res: dict, args) -> str:
    """One column per jaxllm mode and peer, then the ratios the targets are stated in."""
    cols = [(f"jaxllm {m}", res[f"jaxllm-{m}"]) for m in args.modes] + [(p, res[p]) for p in args.peers]
    rows = [("first call (load excluded; compile for jaxllm)", "first_call_s", "s"), ("model load", "load_s", "s")]
    rows += [("weights (device; llama.cpp: file)", "weight_mib", "MiB")]
    rows += [(f"decode, batch {b} (aggregate)", f"decode_b{b}_tps", "tok/s") for b in args.batches]
    rows += [("prefill, 512-token prompt", "prefill512_s", "s"), ("peak memory (RSS)", "peak_rss_gib", "GiB")]
    lines = ["| metric | " + " | ".join(n for n, _ in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for label, key, unit in rows:
        cells = [f"{r[key]:.2f} {unit}" if r.get(key) is not None else "—" for _, r in cols]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines.append("")
    ratio = lambda a, b, key, inv=False: (
        (a[key] / b[key] if not inv else b[key] / a[key]) if a.get(key) and b.get(key) else None
    )
    f32, gguf = res.get("jaxllm-f32"), res.get("jaxllm-gguf")
    notes = []
    if gguf and "llama.cpp" in res:
        notes.append(("jaxllm gguf batch-1 decode / llama.cpp batch-1", ratio(gguf, res["llama.cpp"], "decode_b1_tps")))
    if gguf and f32:
        big = max(args.batches)
        notes.append((f"jaxllm gguf / f32, batch-{big} aggregate", ratio(gguf, f32, f"decode_b{big}_tps")))
        notes.append(("prefill-512, f32 time / gguf time", ratio(gguf, f32, "prefill512_s", inv=True)))
        notes.append(("peak RSS, gguf / f32", ratio(gguf, f32, "peak_rss_gib")))
    if f32 and "jaxllm-gguf-bf16dot" in res:
        big = max(args.batches)
        label = f"jaxllm gguf with bf16 dot products / f32, batch-{big} aggregate"
        notes.append((label, ratio(res["jaxllm-gguf-bf16dot"], f32, f"decode_b{big}_tps")))
    if f32 and "transformers" in res:
        notes.append(("jaxllm f32 batch-1 decode / transformers", ratio(f32, res["transformers"], "decode_b1_tps")))
    lines += [f"- {label}: **{v:.2f}×**" for label, v in notes if v is not None]
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
        "Core engine: jaxllm weight modes vs transformers and llama.cpp (CPU)",
        f" on {os.cpu_count()} CPU cores, Python {platform.python_version()}; model `{args.model}`, "
        f"{args.tokens} generated tokens, best of {args.repeats}; decode excludes the prefill.",
        f"python scripts/bench.py --tokens {args.tokens} --repeats {args.repeats} --modes {','.join(args.modes)} "
        f"--peers {','.join(args.peers) or 'none'}",
        table,
    )


def parse(argv):
    p = argparse.ArgumentParser(prog="jaxllm bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--tokens", type=int, default=64, help="tokens generated per request")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--batches", type=lambda s: [int(x) for x in s.split(",")], default=[1, 8, 32])
    p.add_argument("--hf-batches", type=lambda s: [int(x) for x in s.split(",")], default=[1])
    names = lambda s: [x for x in s.split(",") if x and x != "none"]
    p.add_argument(
        "--modes", type=names, default=list(MODES), help=f"jaxllm weight modes: {','.join(MODES)} or an ISQ scheme"
    )
    p.add_argument("--quant", default=None, metavar="Q", help="measure only this ISQ scheme (same as --modes Q)")
    p.add_argument("--peers", type=names, default=list(PEERS), help="transformers,llama.cpp (or none)")
    p.add_argument("--no-write", action="store_true", help="print, do not update docs/benchmarks.md")
    from jaxllm.cli_options import add_parallel_arguments

    add_parallel_arguments(p)
    p.add_argument("--worker", choices=["jaxllm", *PEERS], help=argparse.SUPPRESS)
    p.add_argument("--mode", default="gguf", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.tokens < 2 or args.repeats < 1:
        p.error("--tokens must be >= 2 and --repeats >= 1")
    if args.quant:
        args.modes = [args.quant]
    from jaxllm.errors import QuantizationError
    from jaxllm.quant.isq import parse_scheme

    for mode in args.modes:
        try:
            _ = mode in MODES or parse_scheme(mode)
        except QuantizationError as e:
            p.error(f"mode {mode!r}: {e}")
    unknown = [x for x in args.peers if x not in PEERS]
    if unknown:
        p.error(f"unknown peer {unknown[0]!r}: the peers are {', '.join(PEERS)}")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse(argv)
    if args.worker:
        fn = {"jaxllm": worker_jaxllm, "transformers": worker_transformers, "llama.cpp": worker_llama_cpp}
        print(json.dumps(fn[args.worker](args)))
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
        "--data-parallel",
        str(args.data_parallel),
        *(["--tensor-parallel", str(args.tensor_parallel)] if args.tensor_parallel else []),
    ]
    res = {f"jaxllm-{m}": _run_worker("jaxllm", [*passthrough, "--mode", m], MODE_ENV.get(m)) for m in args.modes}
    for peer in args.peers:
        res[peer] = _run_worker(peer, passthrough)
    table = _table(res, args)
    print(table)
    if not args.no_write:
        write_doc(table, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Tensor-parallel benchmark: decode throughput and per-device memory at each tensor-parallel size.

Each size runs in its own process over `--devices` devices (on the CPU: fake devices from
`XLA_FLAGS=--xla_force_host_platform_device_count`, which share this machine's cores: the figures show what
the sharded path costs in collectives and per-shard kernel calls, not a speed-up). Per size: decode tokens
per second at each batch (decode excludes the prefill, best of --repeats), and the bytes of weights and of
the KV cache held by the most loaded device, from the device buffers. Results are printed and written into
docs/benchmarks.md between the `bench:parallel` markers.

    python scripts/bench_parallel.py [--model smollm2] [--tp 1,3] [--batches 1,8] [--tokens 32] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
from bench import write_report  # noqa: E402

BEGIN, END = "<!-- bench:parallel -->", "<!-- /bench:parallel -->"
PROMPT = "Tell me a story about a dragon who learns to sing."


def worker(args) -> dict:
    from jaxllm import LLM, SamplingParams
    from jaxllm.sharding import device_bytes

    llm = LLM(args.model, progress=False, prefix_caching=False, tensor_parallel=args.worker_tp)
    ids = llm.tokenizer.encode(llm.apply_chat_template([{"role": "user", "content": PROMPT}]), add_special_tokens=False)
    fixed = lambda n: SamplingParams(temperature=0, max_tokens=n, min_tokens=n)
    out = {"weights_mib": llm.weight_bytes / 2**20}
    for b in args.batches:
        run = lambda n, b=b: llm.generate([ids] * b, fixed(n), use_tqdm=False)
        run(args.tokens), run(1)
        best = lambda n, run=run: min(_timed(lambda: run(n)) for _ in range(args.repeats))
        out[f"decode_b{b}_tps"] = b * (args.tokens - 1) / (best(args.tokens) - best(1))
    per = device_bytes(llm.loaded.params)
    out["device_weights_mib"] = max(per.values()) / 2**20
    out["devices"] = len(per)
    out["device_kv_mib"] = max(device_bytes(llm.runner.cache).values()) / 2**20
    return out


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def run_size(tp: int, args) -> dict:
    env = {
        **os.environ,
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={args.devices}",
        "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
    }
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker-tp", str(tp), *_passthrough(args)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"error: tensor parallel {tp} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _passthrough(args) -> list[str]:
    batches = ",".join(map(str, args.batches))
    return ["--model", args.model, "--batches", batches, "--tokens", str(args.tokens), "--repeats", str(args.repeats)]


def table(results: dict[int, dict], args) -> str:
    rows = [(f"decode, batch {b} (aggregate)", f"decode_b{b}_tps", "tok/s") for b in args.batches]
    rows += [
        ("weights on the busiest device", "device_weights_mib", "MiB"),
        ("KV cache on the busiest device", "device_kv_mib", "MiB"),
    ]
    lines = ["| metric | " + " | ".join(f"tensor parallel {tp}" for tp in results) + " |"]
    lines.append("|---" * (len(results) + 1) + "|")
    for label, key, unit in rows:
        lines.append(f"| {label} | " + " | ".join(f"{r[key]:.2f} {unit}" for r in results.values()) + " |")
    total = next(iter(results.values()))["weights_mib"]
    lines += ["", f"- weights in all: {total:.2f} MiB; each size's busiest device holds that share of them."]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--tp", type=lambda s: [int(x) for x in s.split(",")], default=[1, 3])
    p.add_argument("--devices", type=int, default=None, help="CPU devices to fake (default: the largest --tp)")
    p.add_argument("--batches", type=lambda s: [int(x) for x in s.split(",")], default=[1, 8])
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-write", action="store_true")
    p.add_argument("--worker-tp", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker_tp is not None:
        print(json.dumps(worker(args)))
        return 0
    args.devices = args.devices or max(args.tp)
    results = {tp: run_size(tp, args) for tp in args.tp}
    text = table(results, args)
    print(text)
    if not args.no_write:
        write_report(
            BEGIN,
            END,
            "Tensor parallelism on fake CPU devices",
            f" on {os.cpu_count()} CPU cores shared by {args.devices} fake devices; model `{args.model}`, "
            f"{args.tokens} generated tokens, best of {args.repeats}. Fake devices share the cores: this shows the "
            "cost of the sharded path (collectives, per-shard kernel calls) and the memory split, not a speed-up.",
            f"python scripts/bench_parallel.py --model {args.model} --tp {','.join(map(str, args.tp))}",
            text,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

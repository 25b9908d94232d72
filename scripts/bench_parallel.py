"""Parallel benchmark: decode throughput and per-device memory at each layout (tensor-parallel size N, or M
data-parallel replicas of N as "MxN").

Each layout runs in its own process over `--devices` devices (on the CPU: fake devices from
`XLA_FLAGS=--xla_force_host_platform_device_count`, which share this machine's cores: the figures show what
the sharded path costs in collectives and per-shard kernel calls, not a speed-up). Per size: decode tokens
per second at each batch (decode excludes the prefill, best of --repeats), and the bytes of weights and of
the KV cache held by the most loaded device, from the device buffers. Results are printed and written into
docs/benchmarks.md between the `bench:parallel` markers.

    python scripts/bench_parallel.py [--model smollm2] [--layouts 1,3,2x3] [--batches 1,8] [--tokens 32] [--repeats 3]
    python scripts/bench_parallel.py --random-heads 12/6 --layouts 1,2,3

SmolLM2's 9 query / 3 KV heads split over 1 or 3 devices only; `--random-heads Q/KV` benchmarks a random-weight
Llama of SmolLM2's size (576 wide, 30 layers, 49,152 tokens) with Q query and KV key/value heads instead (12/6
splits over 1, 2 and 3), written with transformers into a temporary folder.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
from bench import write_report  # noqa: E402

BEGIN, END = "<!-- bench:parallel -->", "<!-- /bench:parallel -->"
RANDOM_BEGIN, RANDOM_END = "<!-- bench:parallel-random -->", "<!-- /bench:parallel-random -->"
PROMPT = "Tell me a story about a dragon who learns to sing."


def worker(args) -> dict:
    from jaxllm import LLM, SamplingParams
    from jaxllm.sharding import device_bytes

    dp, tp = _layout(args.worker_layout)
    llm = LLM(args.model, progress=False, prefix_caching=False, tensor_parallel=tp, data_parallel=dp)
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


def _layout(text: str) -> tuple[int, int]:
    """ "N" -> (1, N); "MxN" -> (M, N): M data-parallel replicas of tensor parallelism N."""
    m, _, n = text.rpartition("x")
    return int(m or 1), int(n)


def _label(layout: str) -> str:
    dp, tp = _layout(layout)
    return f"tensor parallel {tp}" if dp == 1 else f"{dp} replicas x tensor parallel {tp}"


def run_size(layout: str, args) -> dict:
    env = {
        **os.environ,
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={args.devices}",
        "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
    }
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker-layout", layout, *_passthrough(args)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"error: {_label(layout)} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _passthrough(args) -> list[str]:
    batches = ",".join(map(str, args.batches))
    return ["--model", args.model, "--batches", batches, "--tokens", str(args.tokens), "--repeats", str(args.repeats)]


def table(results: dict[str, dict], args) -> str:
    rows = [(f"decode, batch {b} (aggregate)", f"decode_b{b}_tps", "tok/s") for b in args.batches]
    rows += [
        ("weights on the busiest device", "device_weights_mib", "MiB"),
        ("KV cache on the busiest device", "device_kv_mib", "MiB"),
    ]
    lines = ["| metric | " + " | ".join(_label(layout) for layout in results) + " |"]
    lines.append("|---" * (len(results) + 1) + "|")
    for label, key, unit in rows:
        lines.append(f"| {label} | " + " | ".join(f"{r[key]:.2f} {unit}" for r in results.values()) + " |")
    total = next(iter(results.values()))["weights_mib"]
    lines += ["", f"- weights in all: {total:.2f} MiB; each layout's busiest device holds that share of them."]
    return "\n".join(lines)


def random_model(heads: str, folder: Path) -> Path:
    """A random-weight Llama folder of SmolLM2's size with `heads` ("Q/KV") attention heads (float32)."""
    import torch
    import transformers

    sys.path.insert(0, str(ROOT))
    from tests.conftest import write_byte_tokenizer

    q, kv = map(int, heads.split("/"))
    config = transformers.LlamaConfig(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=q,
        num_key_value_heads=kv,
        max_position_embeddings=8192,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(folder)
    write_byte_tokenizer(folder, config.vocab_size)
    return folder


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--random-heads", default=None, help="Q/KV: a random SmolLM2-sized model with these heads")
    layouts = lambda s: s.split(",")
    p.add_argument("--layouts", type=layouts, default=["1", "3", "2x3"], help="N or MxN, comma-separated")
    p.add_argument("--devices", type=int, default=None, help="CPU devices to fake (default: the largest layout's)")
    p.add_argument("--batches", type=lambda s: [int(x) for x in s.split(",")], default=[1, 8])
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-write", action="store_true")
    p.add_argument("--worker-layout", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker_layout is not None:
        print(json.dumps(worker(args)))
        return 0
    args.devices = args.devices or max(m * n for m, n in map(_layout, args.layouts))
    with tempfile.TemporaryDirectory() as tmp:
        if args.random_heads:
            args.model = str(random_model(args.random_heads, Path(tmp)))
        results = {layout: run_size(layout, args) for layout in args.layouts}
    name = f"random, {args.random_heads} heads" if args.random_heads else args.model
    text = table(results, args)
    print(text)
    if not args.no_write:
        random = f" --random-heads {args.random_heads}" if args.random_heads else f" --model {args.model}"
        write_report(
            RANDOM_BEGIN if args.random_heads else BEGIN,
            RANDOM_END if args.random_heads else END,
            f"Tensor and data parallelism on fake CPU devices ({name})",
            f" on {os.cpu_count()} CPU cores shared by {args.devices} fake devices; model `{name}`, "
            f"{args.tokens} generated tokens, best of {args.repeats}. Fake devices share the cores: this shows the "
            "cost of the sharded path (collectives, per-shard kernel calls) and the memory split, not a speed-up.",
            f"python scripts/bench_parallel.py{random} --layouts {','.join(args.layouts)}",
            text,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

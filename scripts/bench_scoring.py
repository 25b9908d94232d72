"""Scoring benchmark: tokens per second of prompt log-likelihood, jaxllm against transformers on the same weights.

On this machine, with SmolLM2: `--pairs` (context, continuation) pairs cut from tests/data/perplexity.txt
(contexts of `--context` tokens, continuations of 32), scored by `LLM.score` (float32 weights and the
default Q4_1 ones; one untimed run first compiles its shapes) and by transformers (float32, the same
GGUF file; one forward per batch of `--hf-batch` pairs padded to the longest, log-softmax gathered at the
continuation). Throughput counts every prompt token (context and continuation) once. Results are printed
and written into docs/benchmarks.md between the `bench:scoring` markers.

    python scripts/bench_scoring.py [--pairs 32] [--context 224] [--repeats 3]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
from bench import best_time, write_report  # noqa: E402

BEGIN, END = "<!-- bench:scoring -->", "<!-- /bench:scoring -->"
CONTINUATION = 32


def pairs(tokenizer, n: int, context: int) -> list[tuple[list[int], list[int]]]:
    ids = tokenizer.encode((ROOT / "tests" / "data" / "perplexity.txt").read_text(), add_special_tokens=False)
    width = context + CONTINUATION
    starts = [(i * 97) % (len(ids) - width) for i in range(n)]
    return [(ids[s : s + context], ids[s + context : s + width]) for s in starts]


def jaxllm_rate(work, dequantize: bool, repeats: int) -> tuple[float, list[float]]:
    from jaxllm import LLM

    llm = LLM("smollm2", dequantize=dequantize, max_num_seqs=32, max_model_len=512, progress=False)
    contexts, continuations = [c for c, _ in work], [x for _, x in work]
    scores = llm.score(contexts, continuations)  # compiles the scoring shapes
    seconds = best_time(lambda: llm.score(contexts, continuations), repeats)
    return sum(len(c) + len(x) for c, x in work) / seconds, [s.logprob for s in scores]


def hf_rate(work, batch: int, repeats: int) -> tuple[float, list[float]]:
    import torch
    import transformers

    from jaxllm.loading.resolve import resolve_model

    path = resolve_model("smollm2").path
    model = transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32
    ).eval()
    sums: list[float] = []

    def run():
        sums.clear()
        for i in range(0, len(work), batch):
            part = work[i : i + batch]
            rows = [c + x for c, x in part]
            width = max(map(len, rows))
            ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
            mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
            with torch.no_grad():
                logp = torch.log_softmax(model(ids, attention_mask=mask).logits, -1)
            for j, (c, x) in enumerate(part):
                pos = torch.arange(len(c) - 1, len(c) + len(x) - 1)
                sums.append(float(logp[j, pos, torch.tensor(x)].sum()))

    seconds = best_time(run, repeats)
    return sum(len(c) + len(x) for c, x in work) / seconds, list(sums)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pairs", type=int, default=32)
    p.add_argument("--context", type=int, default=224)
    p.add_argument("--hf-batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)
    from jaxllm.loading.load import load_model

    work = pairs(load_model("smollm2", progress=False).tokenizer, args.pairs, args.context)
    f32, f32_scores = jaxllm_rate(work, True, args.repeats)
    print(f"jaxllm float32: {f32:.0f} tok/s", flush=True)
    q41, _ = jaxllm_rate(work, False, args.repeats)
    print(f"jaxllm Q4_1: {q41:.0f} tok/s", flush=True)
    hf, hf_scores = hf_rate(work, args.hf_batch, args.repeats)
    print(f"transformers float32: {hf:.0f} tok/s", flush=True)
    diff = max(abs(a - b) for a, b in zip(f32_scores, hf_scores, strict=True))
    text = "\n".join(
        [
            "| scorer | prompt tokens/s | vs transformers |",
            "|---|---|---|",
            f"| jaxllm `LLM.score`, float32 | {f32:.0f} | {f32 / hf:.2f}x |",
            f"| jaxllm `LLM.score`, Q4_1 (default) | {q41:.0f} | {q41 / hf:.2f}x |",
            f"| transformers, float32, batches of {args.hf_batch} | {hf:.0f} | 1.00x |",
            "",
            f"Largest difference of a continuation's summed log-likelihood, jaxllm float32 vs transformers: "
            f"{diff:.2g}.",
        ]
    )
    print(text)
    if not args.no_write:
        write_report(
            BEGIN,
            END,
            "Scoring: prompt log-likelihood, jaxllm vs transformers (CPU, SmolLM2-135M)",
            f"; {args.pairs} pairs of {args.context} context + {CONTINUATION} continuation tokens, best of "
            f"{args.repeats}.",
            f"python scripts/bench_scoring.py --pairs {args.pairs} --context {args.context} --repeats {args.repeats}",
            text,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

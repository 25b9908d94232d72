"""Embeddings benchmark: sentences per second of all-MiniLM-L6-v2, jaxllm's `Embedder` against
sentence-transformers on the same folder, in the same run.

`--sentences` sentences cut from tests/data/perplexity.txt (lengths cycling through 8, 24, 64 and 160 words,
so that batches pad to several length buckets), embedded by both in one call: each sorts the inputs by length,
sentence-transformers in batches of `--batch`, jaxllm in batches of at most 32 rows and 8,192 padded tokens.
Each side runs once untimed first (jaxllm compiles its shapes there), then `--repeats` rounds alternate between
the two and the best of each is kept. Also reported: the largest cosine distance between the two sides'
vectors. Results are printed and written into docs/benchmarks.md between the `bench:embeddings` markers.

    python scripts/bench_embeddings.py [--sentences 512] [--batch 32] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT))
from bench import best_of_rounds, write_report  # noqa: E402

BEGIN, END = "<!-- bench:embeddings -->", "<!-- /bench:embeddings -->"
LENGTHS = (8, 24, 64, 160)  # words


def sentences(n: int) -> list[str]:
    words = (ROOT / "tests" / "data" / "perplexity.txt").read_text().split()
    out = []
    for i in range(n):
        width = LENGTHS[i % len(LENGTHS)]
        start = (i * 131) % (len(words) - width)
        out.append(" ".join(words[start : start + width]))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sentences", type=int, default=512)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)
    from sentence_transformers import SentenceTransformer

    from jaxllm.embeddings import Embedder
    from tests.conftest import minilm_folder

    folder = minilm_folder()
    texts = sentences(args.sentences)
    ours = Embedder.load(folder)
    theirs = SentenceTransformer(str(folder), device="cpu")
    tokens = sum(len(ours.tokenizer.encode(t)) for t in texts)

    def run_ours():  # one call: like sentence-transformers' encode, it sorts the inputs by length and batches them
        return ours.embed(texts).vectors

    def run_theirs():
        return theirs.encode(texts, batch_size=args.batch, convert_to_numpy=True)

    a, b = run_ours(), run_theirs()  # untimed: compiles jaxllm's shapes, warms both
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    best = best_of_rounds([("jaxllm", run_ours), ("st", run_theirs)], args.repeats)
    rate = {k: len(texts) / s for k, s in best.items()}
    text = "\n".join(
        [
            "| embedder | sentences/s | tokens/s | vs sentence-transformers |",
            "|---|---|---|---|",
            f"| jaxllm `Embedder` (float32, XLA) | {rate['jaxllm']:.0f} | {rate['jaxllm'] * tokens / len(texts):.0f} "
            f"| {rate['jaxllm'] / rate['st']:.2f}x |",
            f"| sentence-transformers (torch {__import__('torch').__version__}, float32) | {rate['st']:.0f} | "
            f"{rate['st'] * tokens / len(texts):.0f} | 1.00x |",
            "",
            f"Largest cosine distance between the two sides' vectors: {float((1 - cos).max()):.2g}.",
        ]
    )
    print(text)
    if not args.no_write:
        write_report(
            BEGIN,
            END,
            "Embeddings: all-MiniLM-L6-v2, jaxllm vs sentence-transformers (CPU)",
            f" on {os.cpu_count()} CPU cores; {args.sentences} sentences of {'/'.join(map(str, LENGTHS))} words "
            f"({tokens} tokens), batches of {args.batch}, best of {args.repeats} alternating rounds.",
            f"python scripts/bench_embeddings.py --sentences {args.sentences} --batch {args.batch} "
            f"--repeats {args.repeats}",
            text,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

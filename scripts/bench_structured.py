"""Constrained decoding: throughput under a grammar against free decoding, with the bitmask computed while the
model runs (`overlap_masks`, the default) and with each constrained row waiting for its token, in the same run.

SmolLM2 (the default Q4_1 GGUF) on this machine, through `LLM.generate` (greedy, `--tokens` tokens per prompt):
free rows (eos ignored), rows under a JSON schema (required fields, an enum, an integer and an array of at
least 60 strings, so that no row completes it within the tokens) at 50% and 100% of the rows, and rows under a
regex that never completes (`[a-z ]{400}`); at batch 1 and 32. The two engines (overlap on, off) share the
loaded weights, are both warmed up (every shape, grammar halves included) and are timed in rounds over every
configuration (the best of each kept), so that the machine's drift hits them alike. Also the time llguidance
takes to compute one row's bitmask. Results are printed and written into docs/benchmarks.md between the
`bench:structured` markers.

    python scripts/bench_structured.py [--tokens 48] [--repeats 3]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
from bench import best_of_rounds, tokens_parser, write_report  # noqa: E402

BEGIN, END = "<!-- bench:structured -->", "<!-- /bench:structured -->"
# Long enough that no row completes it within the tokens: every row generates all of them, as free rows do.
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 30},
        "age": {"type": "integer"},
        "color": {"enum": ["red", "green", "blue"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 20}, "minItems": 60},
    },
    "required": ["name", "age", "color", "tags"],
    "additionalProperties": False,
}
BATCHES = (1, 32)


def workloads(tokens: int):
    from jaxllm import SamplingParams

    free = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
    regex = SamplingParams(max_tokens=tokens, temperature=0.0, regex="[a-z ]{400}")
    schema = SamplingParams(max_tokens=tokens, temperature=0.0, json_schema=SCHEMA)
    return {
        "free (0% constrained)": [free],
        "50% under the JSON schema": [free, schema],
        "100% under the JSON schema": [schema],
        "100% under a regex": [regex],
    }


def call(llm, batch: int, kinds):
    """A call generating for `batch` prompts, rows taking the workload's params in turn; returns the tokens."""
    prompts = [f"Write record number {i} about a person:" for i in range(batch)]
    params = [kinds[i % len(kinds)] for i in range(batch)]
    return lambda: sum(len(c.token_ids) for o in llm.generate(prompts, params, use_tqdm=False) for c in o.outputs)


def mask_microseconds(llm, params, repeats: int = 200) -> float:
    """One row's bitmask, computed at the start of the grammar (llguidance), in microseconds."""
    matcher = llm.engine.grammars.matcher(params.structured)
    row = np.zeros((matcher.words,), np.int32)
    start = time.perf_counter()
    for _ in range(repeats):
        matcher.fill(row)
    return (time.perf_counter() - start) / repeats * 1e6


def main(argv=None) -> int:
    args = tokens_parser(__doc__, 48).parse_args(argv)
    import jaxllm
    from jaxllm import LLM

    model = jaxllm.load("smollm2", progress=False)
    engines = {
        overlap: LLM(loaded=model, max_num_seqs=32, max_model_len=256, token_budget=256, overlap_masks=overlap)
        for overlap in (True, False)
    }
    for llm in engines.values():
        llm.engine.warmup()
    loads = workloads(args.tokens)
    results = {}
    for batch in BATCHES:
        calls = [
            ((label, overlap), call(llm, batch, kinds))
            for label, kinds in loads.items()
            if batch > 1 or len(kinds) == 1
            for overlap, llm in engines.items()
        ]
        made = {key: fn() for key, fn in calls}  # the first run of each (and the tokens it makes)
        for (label, overlap), seconds in best_of_rounds(calls, args.repeats).items():
            results[(batch, label, overlap)] = made[(label, overlap)] / seconds
            print(
                f"batch {batch}: {label}, overlap {overlap}: {results[(batch, label, overlap)]:.1f} tok/s", flush=True
            )
    lines = [
        "| batch | rows | overlapped masks tok/s | waiting for the token tok/s | overlapped vs waiting | "
        "overlapped vs free rows |",
        "|---|---|---|---|---|---|",
    ]
    for batch in BATCHES:
        free = results[(batch, "free (0% constrained)", True)]
        for label in loads:
            if (batch, label, True) not in results:
                continue
            on, off = results[(batch, label, True)], results[(batch, label, False)]
            lines.append(f"| {batch} | {label} | {on:.1f} | {off:.1f} | {on / off:.2f}x | {on / free:.2f}x |")
    llm = engines[True]
    masks = {
        "the JSON schema": mask_microseconds(llm, loads["100% under the JSON schema"][0]),
        "the regex": mask_microseconds(llm, loads["100% under a regex"][0]),
    }
    text = (
        "\n".join(lines)
        + "\n\nOne row's bitmask (llguidance, at the grammar's start): "
        + ", ".join(f"{label} {us:.0f} µs" for label, us in masks.items())
    )
    print(text)
    if not args.no_write:
        write_report(
            BEGIN,
            END,
            "Constrained decoding (CPU, SmolLM2-135M Q4_1)",
            f"; {args.tokens} greedy tokens per prompt, best of {args.repeats} rounds over every configuration; both "
            "engines warmed up on their whole surface. Free rows run `decode_steps` 4 per dispatch; a step with "
            "constrained rows runs one.",
            f"python scripts/bench_structured.py --tokens {args.tokens} --repeats {args.repeats}",
            text,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

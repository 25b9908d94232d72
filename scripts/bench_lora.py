"""LoRA serving overhead: decode throughput with adapters against the base model, in the same run.

SmolLM2 (the default Q4_1 GGUF) on this machine, through `LLM.generate` (greedy, `--tokens` tokens per
prompt, eos ignored, prefix caching off): the base model with no adapter slots, then the same engine with
adapter slots (`max_loras` 4, rank up to 16) where no row, every row (one adapter) or rows spread over 4
adapters use them; each at batch 1 and 32, in rounds over every configuration (the best of each kept), so
that the machine's drift hits them alike. Adapters are random, rank 16 on all seven projections (the most
work one can add). One untimed run first compiles each configuration's shapes. Results are printed and written into
docs/benchmarks.md between the `bench:lora` markers.

    python scripts/bench_lora.py [--tokens 64] [--repeats 3]
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
from bench import best_of_rounds, tokens_parser, write_report  # noqa: E402

BEGIN, END = "<!-- bench:lora -->", "<!-- /bench:lora -->"
ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def adapter(cfg, seed: int):
    import jax

    from jaxllm import lora

    a = lora.init(cfg, lora.LoraConfig(rank=16, alpha=16.0, targets=ALL), jax.random.PRNGKey(seed))
    a.weights = jax.tree.map(lambda w: w + 0.01, a.weights)  # b is zero at init: give it values
    return a


def runner(llm, batch: int, names, tokens: int):
    """A call generating `tokens` greedy tokens for `batch` prompts, rows through `names` in turn."""
    from jaxllm import SamplingParams

    params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
    prompts = [f"Story {i}: once upon a time" for i in range(batch)]
    adapters = [names[i % len(names)] for i in range(batch)] if names else None
    return lambda: llm.generate(prompts, params, use_tqdm=False, lora=adapters)


def main(argv=None) -> int:
    args = tokens_parser(__doc__, 64).parse_args(argv)
    import jaxllm
    from jaxllm import LLM

    model = jaxllm.load("smollm2", progress=False)
    base = LLM(loaded=model, max_num_seqs=32, max_model_len=256, prefix_caching=False)
    served = LLM(loaded=model, max_num_seqs=32, max_model_len=256, prefix_caching=False)
    for i in range(4):
        served.add_lora(f"a{i}", adapter(model.config, i))
    rows = [
        ("base model (no adapter slots)", base, None),
        ("adapter slots on, no row uses one", served, [None]),
        ("1 adapter, every row", served, ["a0"]),
        ("4 adapters, rows spread", served, ["a0", "a1", "a2", "a3"]),
    ]
    results = {}
    for batch in (1, 32):
        calls = [
            (label, runner(llm, batch, names, args.tokens))
            for label, llm, names in rows
            if batch > 1 or label[0] != "4"
        ]
        for _, call in calls:
            call()  # compiles this configuration's shapes
        for label, seconds in best_of_rounds(calls, args.repeats).items():
            results[(batch, label)] = batch * args.tokens / seconds
            print(f"batch {batch}: {label} {results[(batch, label)]:.1f} tok/s", flush=True)
    lines = ["| batch | rows | tok/s | vs base |", "|---|---|---|---|"]
    for (batch, label), r in results.items():
        lines.append(f"| {batch} | {label} | {r:.1f} | {r / results[(batch, rows[0][0])]:.2f}x |")
    text = "\n".join(lines)
    print(text)
    if not args.no_write:
        write_report(
            BEGIN,
            END,
            "LoRA serving overhead (CPU, SmolLM2-135M Q4_1)",
            f"; {args.tokens} greedy tokens per prompt, best of {args.repeats} rounds over every configuration; random "
            "rank-16 adapters on all seven projections, 4 slots.",
            f"python scripts/bench_lora.py --tokens {args.tokens} --repeats {args.repeats}",
            text,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

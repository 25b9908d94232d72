"""The `jaxllm` command: `generate` (one prompt or a JSONL batch), `batch` (a resumable JSONL job), `run` (a
chat REPL), `serve`, `perplexity` and `bench`.

Every error jaxllm raises on purpose is printed as one `error: ...` line on stderr with exit status 2.
Arguments and JSONL requests are validated before the model is loaded, so mistakes fail fast.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import sys
from pathlib import Path

from jaxllm import compile_cache
from jaxllm.batch.job import run_job
from jaxllm.cli_options import (
    add_distributed_arguments,
    add_parallel_arguments,
    add_quant_arguments,
    cluster,
    load_options,
    parallelism,
)
from jaxllm.cli_options import positive as _positive
from jaxllm.errors import InvalidRequestError, JaxLLMError
from jaxllm.sampling_params import SamplingParams
from jaxllm.serving import serve_command

FLAG_FIELDS = ("max_tokens", "temperature", "top_p", "top_k", "min_p", "seed", "stop")
REPL_HELP = """commands:
  /help            show this help
  /exit            quit (Ctrl-D works too)
  /system TEXT     set the system prompt (and clear the history); /system alone removes it
  /clear           forget the conversation so far
  /temperature X   set the sampling temperature"""


def _flags(args) -> dict:
    """The sampling flags that were given, as SamplingParams keywords."""
    return {k: getattr(args, k) for k in FLAG_FIELDS if getattr(args, k, None) is not None}


def _params(args, **overrides) -> SamplingParams:
    """SamplingParams from the sampling flags that were given (others keep their defaults), then overrides."""
    return SamplingParams(**{**_flags(args), **overrides})


def _load(args):
    from jaxllm.api import LLM

    compile_cache.enable()
    opts = load_options(args)
    group = cluster(args)
    llm = LLM(
        args.model,
        max_model_len=args.max_model_len,
        max_num_seqs=args.max_num_seqs,
        chat_template=getattr(args, "chat_template", None),
        quant=opts.quant,
        dequantize=opts.dequantize,
        quant_embeddings=opts.quant_embeddings,
        tensor_parallel=args.tensor_parallel,
        data_parallel=args.data_parallel,
        cluster=group,
    )
    if group is not None and not group.leader:  # a follower only replays process 0's steps
        llm.follow()
        raise SystemExit(0)
    return llm


# ---- generate and batch ----------------------------------------------------------------------
def cmd_generate(args) -> int:
    """One prompt to stdout, or a JSONL batch to --output (or stdout), in input order, stopping at a bad line."""
    if args.input is None:
        if args.prompt is None:
            raise InvalidRequestError("give a PROMPT or --input requests.jsonl")
        if args.output is not None:
            raise InvalidRequestError("--output goes with --input: a single completion is printed to stdout")
        params = _params(args)
        llm = _load(args)
        if args.chat:
            outs = llm.chat([{"role": "user", "content": args.prompt}], params, use_tqdm=False)
        else:
            outs = llm.generate(args.prompt, params, use_tqdm=False)
        print(outs[0].outputs[0].text, flush=True)
        return 0
    if args.prompt is not None:
        raise InvalidRequestError("give either a PROMPT or --input, not both")
    if args.chat:
        raise InvalidRequestError("--chat is for a single PROMPT: in JSONL use 'messages' lines instead")
    return run_job(
        args.input, lambda: _load(args), _flags(args), args.output, strict=True, overwrite=True, ordered=True
    )


def cmd_batch(args) -> int:
    """A JSONL file of requests (ours or OpenAI batch lines) streamed through the engine, records streamed out
    as requests finish; resumable, and a bad line is an error record unless --strict."""
    return run_job(
        args.input,
        lambda: _load_for_batch(args),
        _flags(args),
        args.output,
        args.errors,
        resume=args.resume,
        strict=args.strict,
        window=args.window,
    )


def _load_for_batch(args):
    """The model of a batch: an encoder folder loads as an `Embedder` (its embedding lines run, others are
    error records), anything else as an `LLM`."""
    from jaxllm.embeddings import Embedder, is_encoder_model

    if args.model and is_encoder_model(args.model):
        return Embedder.load(args.model)
    return _load(args)


# ---- run -----------------------------------------------------------------------------------------
def cmd_run(args) -> int:
    """Interactive chat: read a line, stream the answer, keep the history; /help lists the commands."""
    params = _params(args, n=1)
    llm = _load(args)
    system, history = args.system, []
    print(f"chatting with {llm.loaded.name}: /help for commands, /exit or Ctrl-D to quit", file=sys.stderr)
    while True:
        try:
            line = input(">>> ").strip()
        except EOFError:
            print()
            return 0
        if not line:
            continue
        if line.startswith("/"):
            cmd, _, arg = line.partition(" ")
            arg = arg.strip()
            if cmd == "/exit":
                return 0
            if cmd == "/help":
                print(REPL_HELP)
            elif cmd == "/system":
                system, history = arg or None, []
                print(f"system prompt {'set' if arg else 'removed'}, history cleared")
            elif cmd == "/clear":
                history = []
                print("history cleared")
            elif cmd == "/temperature":
                try:
                    params = dataclasses.replace(params, temperature=float(arg))
                    print(f"temperature set to {params.temperature}")
                except JaxLLMError as e:
                    print(f"error: {_one_line(e)}")
                except ValueError:
                    print("usage: /temperature X, a number such as 0.7 (0 is greedy)")
            else:
                print(f"unknown command {cmd}: type /help for the list")
            continue
        messages = ([{"role": "system", "content": system}] if system else []) + history
        messages.append({"role": "user", "content": line})
        parts = []
        try:
            for delta in llm.stream_chat(messages, params):
                print(delta.text, end="", flush=True)
                parts.append(delta.text)
        except JaxLLMError as e:  # e.g. the conversation outgrew the context: keep the REPL alive
            print(f"\nerror: {_one_line(e)}" + (" (/clear starts over)" if history else ""))
            continue
        print()
        history += [messages[-1], {"role": "assistant", "content": "".join(parts)}]


# ---- perplexity ----------------------------------------------------------------------------------
def cmd_perplexity(args) -> int:
    """Perplexity of the model over a text file in fixed windows, printed as one line (and JSON with --json)."""
    from jaxllm.eval.perplexity import perplexity, read_text_ids
    from jaxllm.loading.load import load_model

    if not Path(args.file).is_file():
        raise InvalidRequestError(f"cannot read {args.file}: no such file")
    compile_cache.enable()
    loaded = load_model(args.model, progress=False, options=load_options(args), parallel=parallelism(args))
    res = perplexity(loaded, read_text_ids(loaded.tokenizer, args.file), args.window, args.stride)
    weights = loaded.weight_bytes / 2**20
    if args.json:
        print(json.dumps({**dataclasses.asdict(res), "model": loaded.name, "weight_mib": weights}))
    else:
        print(
            f"perplexity {res.perplexity:.4f} (mean NLL {res.mean_nll:.4f}) over {res.tokens_scored} tokens in "
            f"{res.windows} windows of {args.window}; weights {weights:.1f} MiB"
        )
    return 0


# ---- bench ---------------------------------------------------------------------------------------
def cmd_bench(argv: list[str]) -> int:
    """Run scripts/bench.py's main(argv) from the source checkout."""
    path = Path(__file__).resolve().parent.parent / "scripts" / "bench.py"
    if not path.is_file():
        print(f"error: {path} not found: `jaxllm bench` needs a source checkout of jaxllm", file=sys.stderr)
        return 2
    spec = importlib.util.spec_from_file_location("jaxllm_bench_script", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return int(module.main(argv) or 0)


# ---- entry point ---------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--model", default=None, help="alias, .gguf, HF folder or hub id (default smollm2)")
    common.add_argument("--max-model-len", type=_positive, default=None, help="context length in tokens")
    common.add_argument("--max-num-seqs", type=_positive, default=32, help="most sequences decoded at once")
    common.add_argument("--chat-template", default=None, metavar="FILE", help="a .jinja chat template to use")
    common.add_argument("--max-tokens", type=int, default=None)
    common.add_argument("--temperature", type=float, default=None)
    add_quant_arguments(common)
    add_parallel_arguments(common)
    add_distributed_arguments(common)

    sampling = argparse.ArgumentParser(add_help=False)
    for flag, typ in (("--top-p", float), ("--top-k", int), ("--min-p", float), ("--seed", int)):
        sampling.add_argument(flag, type=typ, default=None)
    sampling.add_argument("--stop", nargs="+", default=None, metavar="STR", help="stop strings")

    parser = argparse.ArgumentParser(prog="jaxllm", description="A JAX/XLA inference engine for LLMs.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{generate,batch,run,serve,perplexity,bench}")
    gen = sub.add_parser("generate", parents=[common, sampling], help="complete one prompt or a JSONL batch")
    gen.add_argument("prompt", nargs="?", default=None, metavar="PROMPT")
    gen.add_argument("--chat", action="store_true", help="send PROMPT as one user message of a chat")
    gen.add_argument("--input", default=None, metavar="FILE", help="a JSONL file of requests")
    gen.add_argument("--output", default=None, metavar="FILE", help="JSONL results file (default stdout)")
    gen.set_defaults(func=cmd_generate)
    add_batch_parser(sub, [common, sampling])
    run = sub.add_parser("run", parents=[common], help="chat interactively")
    run.add_argument("--system", default=None, metavar="TEXT", help="a system prompt")
    run.set_defaults(func=cmd_run)
    serve_command.add_parser(sub, _positive)
    ppl = sub.add_parser("perplexity", help="perplexity over a text file in fixed windows")
    ppl.add_argument("--model", default=None, help="alias, .gguf, HF folder or hub id (default smollm2)")
    ppl.add_argument("--file", required=True, metavar="TEXT", help="a UTF-8 text file")
    ppl.add_argument("--window", type=_positive, default=512, help="tokens per window (default 512)")
    ppl.add_argument("--stride", type=_positive, default=None, help="tokens between window starts (default: window)")
    ppl.add_argument("--json", action="store_true", help="print the result as one JSON object")
    add_quant_arguments(ppl)
    add_parallel_arguments(ppl)
    ppl.set_defaults(func=cmd_perplexity)
    sub.add_parser("bench", help="run scripts/bench.py (all arguments go to it)", add_help=False)
    return parser


def add_batch_parser(sub, parents: list[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "batch",
        parents=parents,
        help="run a JSONL file of requests (ours or OpenAI Batch API lines), resumable",
        description="Run a JSONL file of requests: our lines (id, prompt or messages, sampling fields) or OpenAI "
        "Batch API lines (custom_id, method, url, body). Records are written as each request finishes; a line "
        "that cannot run gets an error record. The sampling flags fill what a line leaves unset; a body's model "
        "may name anything: the loaded model runs it (or the LoRA adapter of that name).",
    )
    p.add_argument("--input", required=True, metavar="FILE", help="the JSONL file of requests")
    p.add_argument("--output", required=True, metavar="FILE", help="the JSONL file of results")
    p.add_argument("--errors", default=None, metavar="FILE", help="error records go here (default: to --output)")
    p.add_argument("--resume", action="store_true", help="skip the requests --output/--errors answer; append")
    p.add_argument("--strict", action="store_true", help="stop at the first line that cannot run (exit status 2)")
    p.add_argument(
        "--window", type=_positive, default=None, metavar="N", help="requests in flight at most (default 4 x seqs)"
    )
    p.set_defaults(func=cmd_batch)


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or e.__class__.__name__


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        if argv and argv[0] == "bench":
            return cmd_bench(argv[1:])
        args = build_parser().parse_args(argv)
        return args.func(args)
    except JaxLLMError as e:
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `jaxllm generate ... | head`: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())

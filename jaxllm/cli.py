"""The `jaxllm` command: `generate` (one prompt or a JSONL batch), `run` (a chat REPL), `serve`, `perplexity`
and `bench`.

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
from jaxllm.chat_template import validate_messages
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

PARAM_FIELDS = {f.name for f in dataclasses.fields(SamplingParams)}
FLAG_FIELDS = ("max_tokens", "temperature", "top_p", "top_k", "min_p", "seed", "stop")
REPL_HELP = """commands:
  /help            show this help
  /exit            quit (Ctrl-D works too)
  /system TEXT     set the system prompt (and clear the history); /system alone removes it
  /clear           forget the conversation so far
  /temperature X   set the sampling temperature"""


def _params(args, **overrides) -> SamplingParams:
    """SamplingParams from the sampling flags that were given (others keep their defaults), then overrides."""
    given = {k: getattr(args, k) for k in FLAG_FIELDS if getattr(args, k, None) is not None}
    return SamplingParams(**{**given, **overrides})


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


# ---- generate ------------------------------------------------------------------------------------
def read_requests(path: str, args) -> list[dict]:
    """Validate a JSONL file into [{'id', 'prompt' or 'messages', 'params'}] (blank lines skipped)."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise InvalidRequestError(f"cannot read {path}: {getattr(e, 'strerror', None) or e}") from None
    requests = []
    for lineno, line in enumerate(lines, 1):
        if line.strip():
            requests.append(_parse_line(line, lineno, path, args))
    if not requests:
        raise InvalidRequestError(f"{path} has no requests: write one JSON object per line")
    return requests


def _parse_line(line: str, lineno: int, path: str, args) -> dict:
    def bad(msg):
        raise InvalidRequestError(f"{path} line {lineno}: {msg}")

    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        bad(f"invalid JSON ({e.msg} at column {e.colno})")
    if not isinstance(obj, dict):
        bad("expected a JSON object")
    unknown = sorted(set(obj) - PARAM_FIELDS - {"id", "prompt", "messages"})
    if unknown:
        bad(f"unknown field {unknown[0]!r}")
    if ("prompt" in obj) == ("messages" in obj):
        bad("give exactly one of 'prompt' (a string) or 'messages' (a chat list)")
    if "prompt" in obj and (not isinstance(obj["prompt"], str) or not obj["prompt"]):
        bad("'prompt' must be a non-empty string")
    if "messages" in obj:
        try:
            validate_messages(obj["messages"])
        except JaxLLMError as e:
            bad(str(e))
    try:
        params = _params(args, **{k: v for k, v in obj.items() if k in PARAM_FIELDS})
    except (JaxLLMError, TypeError, ValueError, AttributeError) as e:
        bad(f"bad sampling value: {e}")
    return {"id": obj.get("id", lineno), "prompt": obj.get("prompt"), "messages": obj.get("messages"), "params": params}


def _record(req: dict, out) -> dict:
    choices = []
    for c in out.outputs:
        choice = {"index": c.index, "text": c.text, "finish_reason": c.finish_reason, "token_ids": c.token_ids}
        if c.logprobs is not None:
            choice["logprobs"] = [dataclasses.asdict(lp) for lp in c.logprobs]
        choices.append(choice)
    u = out.usage
    return {
        "id": req["id"],
        "text": choices[0]["text"],
        "finish_reason": choices[0]["finish_reason"],
        "token_ids": choices[0]["token_ids"],
        "choices": choices,
        "usage": {
            "prompt_tokens": u.prompt_tokens,
            "completion_tokens": u.completion_tokens,
            "total_tokens": u.total_tokens,
        },
    }


def cmd_generate(args) -> int:
    """One prompt to stdout, or a JSONL batch to --output (or stdout) in one batched generate call."""
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
    requests = read_requests(args.input, args)
    if args.output is not None and not Path(args.output).resolve().parent.is_dir():
        raise InvalidRequestError(f"cannot write {args.output}: its folder does not exist")
    llm = _load(args)
    prompts = [r["prompt"] if r["prompt"] is not None else llm.apply_chat_template(r["messages"]) for r in requests]
    outs = llm.generate(prompts, [r["params"] for r in requests])
    records = (_record(r, o) for r, o in zip(requests, outs, strict=True))
    text = "".join(json.dumps(rec, ensure_ascii=False) + "\n" for rec in records)
    if args.output is None:
        sys.stdout.write(text)
        sys.stdout.flush()
    else:
        try:
            Path(args.output).write_text(text, encoding="utf-8")
        except OSError as e:
            raise InvalidRequestError(f"cannot write {args.output}: {e.strerror}") from None
    return 0


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

    parser = argparse.ArgumentParser(prog="jaxllm", description="A JAX/XLA inference engine for LLMs.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{generate,run,serve,perplexity,bench}")
    gen = sub.add_parser("generate", parents=[common], help="complete one prompt or a JSONL batch")
    gen.add_argument("prompt", nargs="?", default=None, metavar="PROMPT")
    for flag, typ in (("--top-p", float), ("--top-k", int), ("--min-p", float), ("--seed", int)):
        gen.add_argument(flag, type=typ, default=None)
    gen.add_argument("--stop", nargs="+", default=None, metavar="STR", help="stop strings")
    gen.add_argument("--chat", action="store_true", help="send PROMPT as one user message of a chat")
    gen.add_argument("--input", default=None, metavar="FILE", help="a JSONL file of requests")
    gen.add_argument("--output", default=None, metavar="FILE", help="JSONL results file (default stdout)")
    gen.set_defaults(func=cmd_generate)
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

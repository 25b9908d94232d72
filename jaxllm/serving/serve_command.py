"""`jaxllm serve`: load a model and serve it over HTTP with uvicorn."""

from __future__ import annotations

import argparse
import logging

from jaxllm import compile_cache
from jaxllm.cli_options import (
    add_distributed_arguments,
    add_parallel_arguments,
    add_quant_arguments,
    cluster,
    load_options,
    parallelism,
)
from jaxllm.errors import InvalidRequestError
from jaxllm.tools.loop import DEFAULT_MAX_ROUNDS

SERVE_DEFAULT_MAX_LEN = 2048


def add_parser(sub, positive) -> None:
    p = sub.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API")
    p.add_argument("--model", default=None, help="alias, .gguf, HF folder or hub id (default smollm2)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-seqs", type=positive, default=32, help="sequences decoded together (slots)")
    p.add_argument(
        "--max-model-len",
        type=positive,
        default=None,
        help=f"context per sequence (default: the model's, at most {SERVE_DEFAULT_MAX_LEN})",
    )
    p.add_argument("--max-waiting", type=positive, default=256, help="waiting-queue limit; beyond it: 429")
    p.add_argument(
        "--max-num-batched-tokens",
        "--token-budget",
        dest="token_budget",
        type=positive,
        default=None,
        help="prompt tokens one step computes beside the decodes (default: 256 on the CPU, where a step of them "
        "takes ~0.5 s and smaller steps give a burst's first tokens sooner; 2048 on accelerators); longer "
        "prompts go in chunks. It bounds the shapes compiled before serving",
    )
    p.add_argument(
        "--decode-steps",
        type=positive,
        default=2,
        help="decode steps per dispatch while no prompt waits (more: less overhead; fewer: new arrivals "
        "start sooner, as they wait for the dispatches in flight)",
    )
    p.add_argument("--page-size", type=positive, default=16, help="tokens per KV cache page")
    p.add_argument(
        "--kv-cache-memory",
        type=float,
        default=None,
        metavar="GIB",
        help="KV cache budget in GiB (default: 90%% of free device memory on GPU, 4 GiB on the CPU)",
    )
    p.add_argument("--no-prefix-caching", action="store_true", help="do not reuse cached pages of shared prefixes")
    p.add_argument(
        "--mixed-step",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="run a step's prefill chunks and decodes as one model call, weights read once per step (default: "
        "where a ragged attention kernel reads each sequence only to its length: the native one on the CPU, the "
        "Pallas one on a GPU once it passes its check at start)",
    )
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1 routes")
    p.add_argument(
        "--allowed-origins",
        type=lambda s: [o.strip() for o in s.split(",") if o.strip()],
        default=None,
        metavar="ORIGIN,...",
        help="browser origins allowed to call the API (CORS), e.g. http://localhost:3000, or '*' (default: none)",
    )
    p.add_argument(
        "--pooling",
        default=None,
        metavar="MODE",
        help="how a decoder's /v1/embeddings pools its hidden states: lasttoken, mean, cls, max, mean_sqrt_len "
        "or weightedmean (default: the model folder's sentence-transformers config, else lasttoken)",
    )
    p.add_argument(
        "--responses-db",
        default=None,
        metavar="FILE",
        help="SQLite file keeping stored responses (/v1/responses) across restarts (default: in memory)",
    )
    p.add_argument("--served-model-name", default=None, help="the model name clients use (default: the model's)")
    p.add_argument("--chat-template", default=None, metavar="FILE")
    p.add_argument(
        "--shutdown-timeout",
        type=float,
        default=30.0,
        help="seconds that running requests may take to finish after SIGTERM",
    )
    p.add_argument("--max-body-bytes", type=positive, default=4 * 2**20)
    p.add_argument(
        "--layers",
        choices=["scan", "unrolled"],
        default="scan",
        help="run the layers under one compiled scan (default: each new batch shape compiles ~3x faster) or "
        "unrolled (faster offline decode on the CPU, slower to compile)",
    )
    add_quant_arguments(p)
    add_parallel_arguments(p)
    add_distributed_arguments(p)
    p.add_argument(
        "--lora",
        action="append",
        type=lora_spec,
        default=[],
        metavar="NAME=PATH",
        help="serve a LoRA adapter (a PEFT folder or a saved adapter) under NAME: requests name it in 'model' "
        "(repeat for several)",
    )
    p.add_argument("--max-loras", type=positive, default=4, help="adapters served at once (slots)")
    p.add_argument("--max-lora-rank", type=positive, default=16, help="the largest adapter rank the slots take")
    add_tool_arguments(p, positive)
    p.add_argument("--no-warmup", action="store_true", help="compile on first use instead of before serving")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(func=cmd_serve)


def add_tool_arguments(p, positive) -> None:
    p.add_argument(
        "--max-tool-rounds",
        type=positive,
        default=DEFAULT_MAX_ROUNDS,
        help="rounds of server-run tool calls per answer; after them the model's text is the answer",
    )
    p.add_argument(
        "--enable-agent-tools",
        action="store_true",
        help="let the model read and write files in --agent-sandbox-root and run shell commands sandboxed there",
    )
    p.add_argument(
        "--mcp-config",
        default=None,
        metavar="FILE",
        help="MCP servers whose tools the server runs (JSON: see jaxllm/tools/mcp.py); listed at GET /v1/tools",
    )
    p.add_argument("--agent-sandbox-root", default=None, metavar="DIR", help="the only directory agent tools touch")
    p.add_argument(
        "--agent-readonly", nargs="+", action="extend", default=[], metavar="PATH", help="paths in it not to change"
    )
    p.add_argument(
        "--agent-max-file-size", type=positive, default=1 << 20, metavar="BYTES", help="largest file read or written"
    )
    p.add_argument(
        "--agent-allowed-extensions",
        type=lambda s: [e.strip() for e in s.split(",") if e.strip()],
        default=None,
        metavar=".EXT,...",
        help="the only file extensions agent tools read or write (default: any)",
    )


def server_tools(args: argparse.Namespace, log: logging.Logger) -> list:
    """The tools `jaxllm serve` runs itself, from its flags (checked before the model loads); says which."""
    if args.agent_sandbox_root and not args.enable_agent_tools:
        raise InvalidRequestError("--agent-sandbox-root is for agent tools: add --enable-agent-tools")
    if not args.enable_agent_tools:
        return []
    if not args.agent_sandbox_root:
        raise InvalidRequestError("--enable-agent-tools needs --agent-sandbox-root DIR: the one directory they touch")
    from jaxllm.tools.agent import Sandbox, agent_tools

    sandbox = Sandbox(
        args.agent_sandbox_root, args.agent_readonly, args.agent_max_file_size, args.agent_allowed_extensions
    )
    tools, why_no_shell = agent_tools(sandbox)
    log.info("agent tools in %s: %s", sandbox.root, ", ".join(t.name for t in tools))
    if why_no_shell:
        log.warning("the shell tool is not offered: %s", why_no_shell)
    return tools


def lora_spec(text: str) -> tuple[str, str]:
    """'NAME=PATH' -> (name, path)."""
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"{text!r} is not NAME=PATH (e.g. --lora support=./adapters/support)")
    return name, path


def default_token_budget() -> int:
    """Prompt tokens per step when --max-num-batched-tokens is not given: 256 on the CPU, 2048 elsewhere."""
    import jax

    return 256 if jax.default_backend() == "cpu" else 2048


def serve_embedder(args: argparse.Namespace, log: logging.Logger) -> int:
    """`jaxllm serve` of an encoder folder: /v1/embeddings only (generation routes answer 400)."""
    import uvicorn

    from jaxllm.embeddings import Embedder
    from jaxllm.serving.app import create_app

    generation_only = {
        "--lora": args.lora,
        "--enable-agent-tools": args.enable_agent_tools,
        "--mcp-config": args.mcp_config,
        "--coordinator-address": args.coordinator_address,
    }
    if args.pooling:
        raise InvalidRequestError("--pooling is for decoders: an encoder folder pools as its own config says")
    for flag, given in generation_only.items():
        if given:
            raise InvalidRequestError(f"{args.model} is an embedding model: {flag} needs a model that generates")
    embedder = Embedder.load(args.model)
    dims = (embedder.name, embedder.dim, embedder.max_model_len)
    log.info("embedding model %s: %d dimensions, inputs up to %d tokens; serving /v1/embeddings only", *dims)
    app = create_app(
        embedder,
        served_model_name=args.served_model_name,
        api_key=args.api_key,
        max_body_bytes=args.max_body_bytes,
        allowed_origins=args.allowed_origins,
    )
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from jaxllm.api import LLM, default_dtype
    from jaxllm.loading.load import load_model
    from jaxllm.serving.app import create_app

    compile_cache.enable()
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    log = logging.getLogger(__name__)
    from jaxllm.embeddings import is_encoder_model

    if args.model and is_encoder_model(args.model):
        return serve_embedder(args, log)
    if args.pooling:
        from jaxllm.loading.sentence_transformers import pooling_mode

        args.pooling = pooling_mode(args.pooling)  # a wrong name stops the start before the model loads
    tools = server_tools(args, log)
    if args.mcp_config:
        from jaxllm.tools.mcp import load_config

        load_config(args.mcp_config)  # a mistake in it stops the start before the model loads
    if args.responses_db:
        from jaxllm.serving.response_store import ResponseStore

        ResponseStore(args.responses_db).close()  # an unusable file stops the start before the model loads
    group = cluster(args)
    if group is not None:
        from jaxllm import distributed

        distributed.initialize(group)  # before the loader touches a device
    loaded = load_model(
        args.model,
        default_dtype(),
        chat_template=args.chat_template,
        scan_layers=args.layers == "scan",
        options=load_options(args),
        parallel=parallelism(args),
    )
    stored = f" ({loaded.quant.describe()})" if loaded.quant else ""
    log.info("weights: %.1f MiB on the device%s", loaded.weight_bytes / 2**20, stored)
    if loaded.placement:
        p = loaded.placement
        log.info("sharded: tensor parallel %d x data parallel %d", p.tensor_parallel, p.data_parallel)
    max_len = args.max_model_len or min(loaded.config.max_position_embeddings, SERVE_DEFAULT_MAX_LEN)
    llm = LLM(
        loaded=loaded,
        max_num_seqs=args.max_seqs,
        max_model_len=max_len,
        token_budget=args.token_budget or default_token_budget(),
        decode_steps=args.decode_steps,
        max_waiting=args.max_waiting,
        page_size=args.page_size,
        kv_cache_memory=args.kv_cache_memory,
        prefix_caching=not args.no_prefix_caching,
        mixed_step=args.mixed_step,
        cluster=group,
        lora=dict(args.lora),
        max_loras=args.max_loras,
        max_lora_rank=args.max_lora_rank,
        tools=tools,
        max_tool_rounds=args.max_tool_rounds,
        mcp=args.mcp_config,
    )
    if llm.mcp is not None:
        for server_id, why in llm.mcp.failures.items():
            log.error("MCP server %r: no tools registered: %s", server_id, why)
    for source in sorted({t.source for t in llm.tools.tools.values()}):
        names = [t.name for t in llm.tools.tools.values() if t.source == source]
        log.info("tools from %s: %s", source, ", ".join(names))
    for name, path in args.lora:
        log.info("LoRA adapter %r from %s: requests with model=%r use it", name, path, name)
    if group is not None and not group.leader:  # followers replay process 0's steps; it serves HTTP
        log.info("process %d follows process 0's steps", group.process_id)
        llm.follow()
        return 0
    app = create_app(
        llm,
        served_model_name=args.served_model_name,
        api_key=args.api_key,
        max_body_bytes=args.max_body_bytes,
        shutdown_timeout=args.shutdown_timeout,
        warmup=not args.no_warmup,
        warmup_progress=True,
        allowed_origins=args.allowed_origins,
        responses_db=args.responses_db,
        pooling=args.pooling,
    )
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        timeout_graceful_shutdown=int(args.shutdown_timeout) or 1,
    )
    return 0

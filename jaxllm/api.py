"""The notebook-facing API: `LLM(...).generate(...)`, `.chat(...)`, `.stream(...)`."""

from __future__ import annotations

import atexit
from collections.abc import Iterator

import jax
import jax.numpy as jnp
from tqdm.auto import tqdm

from jaxllm import distributed, scoring
from jaxllm.chat_template import render_chat
from jaxllm.distributed import Cluster
from jaxllm.engine.engine import Engine
from jaxllm.engine.output_processor import OutputProcessor
from jaxllm.engine.runner import ModelRunner
from jaxllm.errors import InvalidRequestError
from jaxllm.loading.load import LoadedModel, LoadOptions, Parallelism, load_model, same_layout
from jaxllm.outputs import CompletionOutput, RequestOutput, StreamDelta
from jaxllm.sampling_params import SamplingParams
from jaxllm.scoring import Score
from jaxllm.structured import tool_choice as tool_choice_grammar
from jaxllm.structured.tool_calls import format_for
from jaxllm.tools.loop import DEFAULT_MAX_ROUNDS, ToolLoop
from jaxllm.tools.mcp import McpHub, load_config, parse_config
from jaxllm.tools.registry import Tool, ToolRegistry


def default_dtype():
    """float32 on the CPU (bf16 is several times slower on XLA:CPU), bfloat16 on accelerators."""
    return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16


def load(
    model: str | None = None,
    *,
    dtype=None,
    quant: str | None = None,
    dequantize: bool | None = None,
    quant_embeddings: bool = False,
    chat_template: str | None = None,
    scan_layers: bool = True,
    tensor_parallel: int | None = None,
    data_parallel: int = 1,
    progress: bool = True,
) -> LoadedModel:
    """Load a model for research: its `config`, `tokenizer`, `params` pytree and a pure
    `forward(params, tokens, positions=None, hidden_layers=())` to `jax.jit`, `jax.grad` and `jax.vmap`
    (see `LoadedModel.forward`). The result also goes to `LLM(loaded=...)`, with edited params through
    `.with_params(params)`. Arguments as in `LLM`: dtype (default float32 on the CPU, bfloat16 on
    accelerators; a .gguf file keeps its quantized formats unless a dtype or `dequantize=True` is given),
    quant (an in-situ quantization scheme), tensor_parallel / data_parallel (the device layout)."""
    options = LoadOptions(quant, dtype is not None if dequantize is None else dequantize, quant_embeddings)
    return load_model(
        model,
        dtype or default_dtype(),
        chat_template=chat_template,
        progress=progress,
        scan_layers=scan_layers,
        options=options,
        parallel=Parallelism(tensor_parallel, data_parallel),
    )


class LLM:
    """A loaded model ready to generate. `LLM()` loads the packaged SmolLM2 default model.

    max_num_seqs: sequences decoded together; max_model_len: context limit (prompt + output);
    decode_steps: decode steps per dispatch; token_budget: prompt tokens prefilled per step, beside the
    decodes (longer prompts are prefilled in chunks of at most this many tokens); page_size: tokens per KV cache page;
    kv_cache_memory: KV cache budget in GiB (default: 90% of free device memory on accelerators,
    4 GiB on the CPU); prefix_caching: reuse the cached pages of shared prompt prefixes;
    scan_layers: run the layers under one compiled scan (the default: each step compiles ~3x faster)
    or unrolled (False: decodes faster on the CPU, for long offline runs over few shapes); with `loaded=`,
    the loaded model's layout is used.
    quant: quantize float weights while loading ('int8', 'int4' (group 32), 'int4-g64', 'int4-g128',
    'int4-sym', 'fp8'); a .gguf file is kept in its own quantized formats unless `dequantize=True` or a
    `dtype` is given. quant_embeddings: under `quant`, quantize the embedding and LM head too.
    tensor_parallel: devices the model is split over (None: as many local devices as split its heads; 1:
    one device); data_parallel: replicas of the tensor-parallel group (data_parallel × tensor_parallel devices),
    each with its share of the batch and of the KV pages (the slots round up to a multiple of it).
    mixed_step: run a step's prefill chunks and decodes as one model call (weights read once per step);
    None (the default): where the attention reads ragged batches only up to each sequence's length (the
    native CPU kernel; the Pallas kernel on a GPU, once it passes a check at start); False runs each prefill
    group and the decode as calls of their own.
    lora: LoRA adapters to serve, name -> a PEFT folder, an orbax checkpoint (`jaxllm.lora.save_adapter`) or
    an `Adapter`; requests name theirs (`generate(..., lora=name)`), and `add_lora` adds more at any time.
    max_loras, max_lora_rank: the adapter slots (adapters served at once) and the rank each module takes.
    tools: `jaxllm.tools.Tool`s the server runs when the model calls them in `chat` (up to `max_tool_rounds`
    rounds of calls per answer); mcp: MCP servers whose tools join them (a JSON file's path or its content, see
    `jaxllm.tools.mcp`).
    overlap_masks: a request under a grammar (json_schema, regex, tools...) decodes every step, its next
    allowed tokens computed while the model runs (True, the default), or every other step (False).
    `weight_bytes` says how many bytes the weights take on the device(s).
    """

    def __init__(
        self,
        model: str | None = None,
        *,
        dtype=None,
        max_num_seqs: int = 32,
        max_model_len: int | None = None,
        decode_steps: int = 4,
        token_budget: int = 2048,
        max_waiting: int | None = None,
        chat_template: str | None = None,
        page_size: int = 16,
        kv_cache_memory: float | None = None,
        prefix_caching: bool = True,
        scan_layers: bool = True,
        quant: str | None = None,
        dequantize: bool | None = None,
        quant_embeddings: bool = False,
        tensor_parallel: int | None = None,
        data_parallel: int = 1,
        mixed_step: bool | None = None,
        overlap_masks: bool = True,
        cluster: Cluster | None = None,
        progress: bool = True,
        loaded: LoadedModel | None = None,
        lora: dict | None = None,
        max_loras: int = 4,
        max_lora_rank: int = 16,
        tools: list[Tool] | None = None,
        max_tool_rounds: int = DEFAULT_MAX_ROUNDS,
        mcp: str | dict | None = None,
    ):
        if cluster is not None:
            distributed.initialize(cluster)
        self.loaded = loaded or load(
            model,
            dtype=dtype,
            chat_template=chat_template,
            progress=progress,
            scan_layers=scan_layers,
            quant=quant,
            dequantize=dequantize,
            quant_embeddings=quant_embeddings,
            tensor_parallel=tensor_parallel,
            data_parallel=data_parallel,
        )
        dtype = self.loaded.dtype
        self._embedding = None  # built on the first `embed`
        self.config, self.tokenizer = self.loaded.config, self.loaded.tokenizer
        self.max_model_len = max_model_len or min(self.config.max_position_embeddings, 8192)
        self.runner = ModelRunner(
            self.loaded.model, self.loaded.params, self.config, dtype, decode_steps, placement=self.loaded.placement
        )
        self.cluster = cluster
        self._channel = distributed.Channel() if cluster is not None else None
        if cluster is not None and cluster.leader:
            self.runner.channel = self._channel
            atexit.register(self.close)
        self.engine = Engine(
            self.runner,
            self.tokenizer,
            max_num_seqs,
            self.max_model_len,
            token_budget,
            max_waiting,
            page_size=page_size,
            kv_cache_memory=kv_cache_memory,
            prefix_caching=prefix_caching,
            mixed_step=mixed_step,
            overlap_masks=overlap_masks,
        )
        self.outputs = OutputProcessor(self.tokenizer)
        self.max_loras, self.max_lora_rank = max_loras, max_lora_rank
        self.tools, self.max_tool_rounds = ToolRegistry(), max_tool_rounds
        for tool in tools or []:
            self.add_tool(tool)
        self.mcp = None
        if mcp is not None:
            self.mcp = McpHub(load_config(mcp) if isinstance(mcp, str) else parse_config(mcp))
            for tool in self.mcp.start():
                self.add_tool(tool)
        for name, adapter in (lora or {}).items():
            self.add_lora(name, adapter)

    def follow(self) -> int:
        """On a follower of a multi-process group (`cluster.process_id` > 0): run the leader's steps until it
        closes; returns how many runner calls ran."""
        if self.cluster is None or self.cluster.leader:
            raise InvalidRequestError("follow() runs on the followers of a group (cluster.process_id > 0)")
        calls = distributed.follow(self.runner, self._channel)
        distributed.leave()
        return calls

    def close(self) -> None:
        """End the MCP sessions; on the leader of a group, tell the followers to stop (once; also at exit)."""
        if self.mcp is not None:
            self.mcp, mcp = None, self.mcp
            mcp.close()
        if self.runner.channel is not None:
            channel, self.runner.channel = self.runner.channel, None
            channel.send("stop")
            distributed.leave()

    @property
    def weight_bytes(self) -> int:
        """Bytes the model's weights take on the device(s), quantized or not."""
        return self.loaded.weight_bytes

    @property
    def params(self):
        """The params pytree the engine runs (see `set_params`)."""
        return self.runner.params

    def set_params(self, params) -> None:
        """Generate with other params from now on: edited ones (an ablated head, a swapped layer) of the same
        structure, shapes and dtypes, e.g. from `jaxllm.load(...).params`. Nothing is reloaded or recompiled;
        the prefix cache, computed with the old params, is dropped. Only between requests."""
        if self.engine.has_unfinished():
            raise InvalidRequestError("set_params runs between requests: wait for the running ones to finish")
        self.runner.params = same_layout(self.runner.params, params)
        self.loaded = self.loaded.with_params(self.runner.params)
        for pool in self.engine.scheduler.pools:
            pool.forget_cached()

    # ---- LoRA adapters --------------------------------------------------------------------------
    def add_lora(self, name: str, adapter) -> None:
        """Serve a LoRA adapter under `name` from now on, without a restart: an `Adapter` (e.g. from
        `jaxllm.train.lora_finetune`), a PEFT folder or an orbax checkpoint. Requests pick it by name
        (`generate(..., lora=name)`, or the `model` field through the server); an existing name is replaced."""
        from jaxllm import lora

        if not isinstance(adapter, lora.Adapter):
            adapter = lora.read_adapter(adapter, self.config)
        slots = None
        if self.engine.runner.lora is None:
            sharding = self.loaded.placement.replicated() if self.loaded.placement is not None else None
            slots = lora.LoraSlots(self.config, self.max_loras, self.max_lora_rank, self.loaded.dtype, sharding)
        self.engine.add_lora(name, adapter, slots)

    def remove_lora(self, name: str) -> None:
        """Stop serving the adapter called `name`."""
        self.engine.remove_lora(name)

    @property
    def lora_names(self) -> list[str]:
        """The adapters served, by name."""
        return self.engine.lora_names

    # ---- prompts --------------------------------------------------------------------------------
    def apply_chat_template(self, messages, add_generation_prompt: bool = True, tools=None) -> str:
        t = self.tokenizer
        return render_chat(
            t.chat_template,
            messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=t.bos_token,
            eos_token=t.eos_token,
            tools=tools,
        )

    def _encode(self, prompt) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            return prompt, self.tokenizer.encode(prompt)
        if isinstance(prompt, list | tuple) and all(isinstance(t, int) for t in prompt):
            return None, list(prompt)
        raise InvalidRequestError("a prompt must be a string or a list of token ids")

    # ---- generation -----------------------------------------------------------------------------
    def generate(
        self,
        prompts,
        params: SamplingParams | list[SamplingParams] | None = None,
        use_tqdm: bool = True,
        lora: str | list[str | None] | None = None,
    ) -> list[RequestOutput]:
        """Generate for one prompt or a list (strings or token-id lists), all batched together. lora: the
        adapter (by name, see `add_lora`) of every prompt, or one per prompt (None: the base model)."""
        return self._generate(prompts, params, use_tqdm, lora)

    def _generate(self, prompts, params, use_tqdm: bool, lora, tool_format=None) -> list[RequestOutput]:
        """`generate`, with tool calls parsed out of the outputs in `tool_format` when given (one for every
        prompt, or a list of one per prompt)."""
        single = isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int))
        prompts = [prompts] if single else list(prompts)
        plist = params if isinstance(params, list) else [params or SamplingParams()] * len(prompts)
        if len(plist) != len(prompts):
            raise InvalidRequestError(f"got {len(plist)} SamplingParams for {len(prompts)} prompts")
        adapters = lora if isinstance(lora, list) else [lora] * len(prompts)
        if len(adapters) != len(prompts):
            raise InvalidRequestError(f"got {len(adapters)} LoRA names for {len(prompts)} prompts")
        for name in set(adapters):
            self.engine.lora_slot(name)
        encoded = [self._encode(p) for p in prompts]
        for (_, ids), p in zip(encoded, plist, strict=True):
            self.engine.check_prompt(ids, p)
        total = sum(p.n for p in plist)
        longest = max(len(ids) + p.max_tokens for (_, ids), p in zip(encoded, plist, strict=True))
        self.engine.reserve(total, longest)
        results = {}
        formats = tool_format if isinstance(tool_format, list) else [tool_format] * len(prompts)
        for (text, ids), p, a, fmt in zip(encoded, plist, adapters, formats, strict=True):
            seqs = self.engine.add_request(ids, p, lora=a)
            self.outputs.add(seqs, fmt)
            results[seqs[0].request_id] = request_output(seqs, text)
        bar = tqdm(total=len(prompts), desc="generating", unit="req", disable=not use_tqdm or len(prompts) < 2)
        unfinished = {rid: len(r.outputs) for rid, r in results.items()}  # each sequence finishes once
        try:
            while self.engine.has_unfinished():
                for d in self.outputs.step(self.engine):
                    result = results[d.request_id]
                    result.outputs[d.index].add(d)
                    if d.prompt_logprobs is not None:
                        result.prompt_logprobs = d.prompt_logprobs
                    if d.finish_reason is not None:
                        unfinished[d.request_id] -= 1
                        bar.update(unfinished[d.request_id] == 0)
        except BaseException:  # interrupted (in a notebook, say): leave nothing running behind
            for rid in results:
                self.engine.abort(rid)
                self.outputs.drop(rid)
            raise
        finally:
            bar.close()
        return list(results.values())

    # ---- embeddings -----------------------------------------------------------------------------
    def embed(self, inputs, dimensions: int | None = None, pooling: str | None = None):
        """One vector per input (strings, encoded as `generate` does, or token-id lists used as given): the
        final hidden states (after the final norm), pooled and normalised as the model folder's
        sentence-transformers `modules.json` says (without one: the last token, normalised). pooling: another
        mode ('mean', 'lasttoken', 'cls', 'max', ...), normalised; dimensions: keep that many components,
        normalised again. Returns a `jaxllm.embeddings.EmbeddingResult`; an input over max_model_len raises
        `ContextLengthError`."""
        from jaxllm.embeddings import DecoderEmbedding, input_list

        if self.cluster is not None:  # the followers only replay the engine's steps: an embedding would hang
            raise InvalidRequestError("embeddings are not served by a group of processes yet: serve them from one")
        if self._embedding is None:
            self._embedding = DecoderEmbedding.for_model(self.loaded)
        ids = [self._encode(x)[1] for x in input_list(inputs)]
        return self._embedding.embed(self.params, ids, self.max_model_len, dimensions, pooling)

    # ---- scoring --------------------------------------------------------------------------------
    def score(self, contexts, continuations, use_tqdm: bool = False) -> list[Score]:
        """The log-likelihood of each continuation given its context, and whether it is the greedy one, all
        batched together. contexts, continuations: lists of the same length of strings (or of token-id lists);
        an empty context is scored after the beginning-of-sequence token. Returns a `Score` per pair."""
        if isinstance(contexts, str) or isinstance(continuations, str) or len(contexts) != len(continuations):
            raise InvalidRequestError("give lists of contexts and continuations of the same length")
        pairs = [scoring.encode_pair(self.tokenizer, c, x) for c, x in zip(contexts, continuations, strict=True)]
        prompts = [scoring.with_prefix(self.tokenizer, ctx) + cont for ctx, cont in pairs]
        outs = self.generate(prompts, scoring.SCORE_PARAMS, use_tqdm=use_tqdm) if prompts else []
        return [scoring.score_of(o, len(p) - len(cont)) for o, p, (_, cont) in zip(outs, prompts, pairs, strict=True)]

    def loglikelihood_rolling(self, texts, use_tqdm: bool = False) -> list[float]:
        """The log-likelihood of each whole text (a string or token ids), in windows of up to max_model_len
        tokens each scored after the token before it (the first after the beginning-of-sequence token): the
        sum of every token's logprob, for perplexity."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        prefix = scoring.with_prefix(self.tokenizer, [])[0] if texts else None
        windows, owner = [], []
        for i, text in enumerate(texts):
            ids = self._encode(text)[1]
            if ids[:1] == [prefix]:
                ids = ids[1:]
            for w in scoring.rolling_windows(ids, prefix, self.max_model_len - 1):
                windows.append(w)
                owner.append(i)
        outs = self.generate([w for w, _ in windows], scoring.SCORE_PARAMS, use_tqdm=use_tqdm) if windows else []
        totals = [0.0] * len(texts)
        for o, (_, ctx), i in zip(outs, windows, owner, strict=True):
            totals[i] += scoring.score_of(o, ctx).logprob
        return totals

    def chat(
        self,
        messages,
        params: SamplingParams | None = None,
        use_tqdm: bool = True,
        lora: str | None = None,
        tools: list[dict] | None = None,
        tool_choice: str | dict | None = "auto",
        parallel_tool_calls: bool = True,
    ) -> list[RequestOutput]:
        """Chat completion for one conversation (a list of messages) or a list of conversations.

        tools: OpenAI function tools, rendered by the chat template; the calls the model writes come back as
        `outputs[i].tool_calls` (finish_reason "tool_calls"). tool_choice: "auto" (the model decides), "none",
        "required" or {"type": "function", "function": {"name": ...}}, the last two enforced by a grammar.
        With server tools (`LLM(tools=...)`, `add_tool`), the calls of them are run and their results read by the
        model in further rounds (see `jaxllm.tools.loop`); the calls run are in `outputs[0].tool_steps`."""
        convs = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        if len(self.tools):
            return self._chat_with_server_tools(convs, params, use_tqdm, lora, tools, tool_choice, parallel_tool_calls)
        prompts = [self.apply_chat_template(m, tools=tools) for m in convs]
        params = self._forced(params, tools, tool_choice, parallel_tool_calls)
        return self._generate(
            prompts, params, use_tqdm, lora, self._tool_format if tools and tool_choice != "none" else None
        )

    @property
    def _tool_format(self) -> str:
        return format_for(self.tokenizer.chat_template)

    def _forced(self, params, tools, tool_choice, parallel_tool_calls) -> SamplingParams | None:
        """params with the grammar that forces a 'required' or named tool_choice (as they are otherwise)."""
        if not tools:
            return params
        return tool_choice_grammar.forced(
            params or SamplingParams(), self._tool_format, tool_choice, tools, parallel_tool_calls
        )

    def _chat_with_server_tools(self, convs, params, use_tqdm, lora, tools, tool_choice, parallel) -> list:
        """Each conversation in rounds (`ToolLoop`), the rounds of all of them batched together."""
        if params is not None and params.n != 1:
            raise InvalidRequestError("n must be 1 when the server runs tools: each answer follows its own calls")
        loops = [ToolLoop(self.tools, conv, tools, tool_choice, self.max_tool_rounds) for conv in convs]
        results: list = [None] * len(convs)
        active = list(range(len(convs)))
        while active:
            prompts = [self.apply_chat_template(loops[i].template_messages(), tools=loops[i].tools) for i in active]
            plist = [
                self._forced(params, loops[i].tools, loops[i].tool_choice, parallel) or SamplingParams() for i in active
            ]
            formats = [self._tool_format if loops[i].parses_calls else None for i in active]
            outs = self._generate(prompts, plist, use_tqdm, lora, formats)
            still = []
            for i, out in zip(active, outs, strict=True):
                c = out.outputs[0]
                if loops[i].take(c.text, c.tool_calls or []):
                    still.append(i)
                else:
                    c.tool_steps, results[i] = list(loops[i].steps), out
            active = still
        return results

    def add_tool(self, tool: Tool) -> None:
        """Serve a tool that the model may call and the server runs (see `jaxllm.tools.Tool`)."""
        self.tools.register(tool)

    def stream(self, prompt, params: SamplingParams | None = None, lora: str | None = None) -> Iterator[StreamDelta]:
        """Yield text deltas of one prompt (string or token ids) as they are generated."""
        params = params or SamplingParams()
        _, ids = self._encode(prompt)
        self.engine.check_prompt(ids, params)
        self.engine.lora_slot(lora)
        self.engine.reserve(params.n, len(ids) + params.max_tokens)
        seqs = self.engine.add_request(ids, params, lora=lora)
        self.outputs.add(seqs)
        try:
            while self.engine.has_unfinished():
                for d in self.outputs.step(self.engine):
                    if d.text or d.token_ids or d.finish_reason is not None:
                        yield d
        finally:  # an abandoned stream must not leave work behind
            self.engine.abort(seqs[0].request_id)
            self.outputs.drop(seqs[0].request_id)
            while self.engine.has_unfinished():
                self.engine.step()

    def stream_chat(
        self, messages, params: SamplingParams | None = None, lora: str | None = None
    ) -> Iterator[StreamDelta]:
        return self.stream(self.apply_chat_template(messages), params, lora)


def request_output(seqs, prompt_text) -> RequestOutput:
    """An empty output for a request's sequences, to which their deltas add up."""
    outs = [CompletionOutput(s.index, "", [], None, None, [] if s.params.logprobs is not None else None) for s in seqs]
    return RequestOutput(seqs[0].request_id, prompt_text, seqs[0].prompt_ids, outs, True)

"""The asyncio face of the engine: one background thread owns the device and steps the engine;
each request gets an async stream of its outputs.

Requests and aborts reach the thread as commands through a condition variable (no polling);
outputs go back to each request's asyncio queue with `call_soon_threadsafe`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import itertools
import logging
import os
import signal
import threading
from collections.abc import AsyncIterator

from jaxllm.engine.engine import Engine
from jaxllm.engine.output_processor import OutputProcessor
from jaxllm.errors import DistributedError, EngineShutdownError
from jaxllm.outputs import StreamDelta
from jaxllm.sampling_params import SamplingParams

log = logging.getLogger(__name__)


StreamOutput = StreamDelta  # what each request's stream yields


@dataclasses.dataclass
class EngineStats:
    waiting: int = 0
    running: int = 0
    slots: int = 0
    kv_pages_used: int = 0
    kv_pages_free: int = 0
    kv_pages_cached: int = 0
    kv_page_size: int = 0
    preemptions: int = 0
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0


class _Request:
    def __init__(self, loop: asyncio.AbstractEventLoop, n: int):
        self.loop, self.queue, self.open = loop, asyncio.Queue(), n


class AsyncEngine:
    """Thread-owned Engine with `generate()` async streams, `abort()`, and a graceful `shutdown()`."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.outputs = OutputProcessor(engine.tokenizer)  # used by the engine thread only
        self._cond = threading.Condition()
        self._commands: list = []
        self._requests: dict[str, _Request] = {}
        self._ids = itertools.count()
        self._thread: threading.Thread | None = None
        self._stop = False
        self.accepting = False
        self.stats = EngineStats()
        self._idle: asyncio.Event | None = None  # set when the last request ends, while shutting down

    # ---- lifecycle ------------------------------------------------------------------------------
    def start(self) -> None:
        """Size the cache for serving and start the engine thread."""
        e = self.engine
        e.reserve(e.max_num_seqs, e.max_model_len)
        self._update_stats()
        self._thread = threading.Thread(target=self._run, name="jaxllm-engine", daemon=True)
        self._thread.start()
        self.accepting = True

    def warmup(self, prompt_ids: list[int]) -> None:
        """Compile the common steps before serving: a greedy and a sampled request, run to the end."""
        for params in (
            SamplingParams(temperature=0, max_tokens=8),
            SamplingParams(temperature=1, top_p=0.9, max_tokens=8, seed=0),
        ):
            self.engine.add_request(prompt_ids, params)
            while self.engine.has_unfinished():
                self.engine.step()

    async def shutdown(self, timeout: float = 30.0) -> None:
        """Stop admitting, let running requests finish for up to `timeout` seconds, abort the rest, stop."""
        self.accepting = False
        if self._requests:
            self._idle = asyncio.Event()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._idle.wait(), timeout)
        for rid in list(self._requests):
            self.abort(rid)
        with self._cond:
            self._stop = True
            self._cond.notify()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 10)

    # ---- requests -------------------------------------------------------------------------------
    async def generate(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        request_id: str | None = None,
        lora: str | None = None,
        tool_format: str | None = None,
    ) -> AsyncIterator[StreamOutput]:
        """Stream the outputs of one request (through the LoRA adapter named `lora`, if any; with tool calls
        parsed out in `tool_format`, if given). Raises typed errors (queue full, context, unknown adapter)
        before the first."""
        if not self.accepting:
            raise EngineShutdownError("the server is shutting down: retry on another instance")
        self.engine.check_prompt(prompt_ids, params)
        self.engine.lora_slot(lora)
        rid = request_id or f"req-{next(self._ids)}"
        req = _Request(asyncio.get_running_loop(), params.n)
        added: concurrent.futures.Future = concurrent.futures.Future()
        self._requests[rid] = req
        self._send(("add", rid, prompt_ids, params, added, lora, tool_format))
        try:
            await asyncio.wrap_future(added)
            while req.open:
                out = await req.queue.get()
                if isinstance(out, BaseException):
                    raise out
                if out.finish_reason is not None:
                    req.open -= 1
                yield out
        finally:
            if req.open:  # the consumer left early: free its slots now
                self.abort(rid)
            self._requests.pop(rid, None)
            if not self._requests and self._idle is not None:
                self._idle.set()

    def abort(self, request_id: str) -> None:
        self._send(("abort", request_id))

    def _send(self, command) -> None:
        with self._cond:
            self._commands.append(command)
            self._cond.notify()

    # ---- the engine thread ----------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._commands and not self.engine.has_unfinished() and not self._stop:
                    self._cond.wait()
                if self._stop and not self.engine.has_unfinished():
                    return
                commands, self._commands = self._commands, []
            for cmd in commands:
                self._apply(cmd)
            if self.engine.has_unfinished():
                try:
                    self._deliver(self.outputs.step(self.engine))
                except DistributedError as e:  # the group is broken: tell the clients, then stop this process
                    log.error("%s", e)
                    self._fail_all(e)
                    os.kill(os.getpid(), signal.SIGTERM)
                    return
                except Exception as e:  # a device failure must reach the waiting clients, not kill the thread
                    log.exception("engine step failed")
                    self._fail_all(e)
            self._update_stats()

    def _apply(self, cmd) -> None:
        if cmd[0] == "add":
            _, rid, prompt_ids, params, fut, lora, tool_format = cmd
            try:
                self.outputs.add(self.engine.add_request(prompt_ids, params, rid, lora), tool_format)
                fut.set_result(None)
            except Exception as e:
                self._requests.pop(rid, None)
                fut.set_exception(e)
        elif cmd[0] == "abort":
            self.engine.abort(cmd[1])
            self.outputs.drop(cmd[1])

    def _deliver(self, deltas: list[StreamDelta]) -> None:
        for d in deltas:
            req = self._requests.get(d.request_id)
            if req is not None:
                req.loop.call_soon_threadsafe(req.queue.put_nowait, d)

    def _fail_all(self, error: Exception) -> None:
        for rid, req in list(self._requests.items()):
            self.engine.abort(rid)
            self.outputs.drop(rid)
            req.loop.call_soon_threadsafe(req.queue.put_nowait, error)
        # Pages registered for chunks whose dispatch failed may never have been written.
        for pool in self.engine.scheduler.pools:
            pool.forget_cached()

    def _update_stats(self) -> None:
        sched = self.engine.scheduler
        total = lambda attr: sum(getattr(pool, attr) for pool in sched.pools)  # over the data-parallel replicas
        self.stats = EngineStats(
            waiting=len(sched.waiting),
            running=len(sched.running),
            slots=sched.max_seqs,
            kv_pages_used=total("num_used"),
            kv_pages_free=total("num_free"),
            kv_pages_cached=total("num_cached"),
            kv_page_size=sched.page_size,
            preemptions=sched.preemptions,
            prefix_cache_queries=total("queries"),
            prefix_cache_hits=total("hits"),
        )

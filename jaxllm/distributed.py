"""Several processes (hosts) running one model: `jax.distributed`, and the leader's steps sent to followers.

Every process loads the same model onto its share of one global mesh and runs the same compiled steps in
the same order (JAX's multi-controller model: each step is a collective program). Process 0, the leader,
owns the scheduler and any server; each runner call it makes (allocate, prefill, decode, whose inputs are
plain data: `runner.StepInputs`) is first published over the coordination service's key-value store, and
each follower replays the calls in order (`follow`). A process that dies breaks the next collective at once
(the others' next step fails) and, when idle, is found by the coordination service's heartbeat within
`heartbeat_timeout` seconds, which stops the group.
"""

from __future__ import annotations

import dataclasses
import logging
import pickle

import jax

from jaxllm.errors import DistributedError, PlacementError

log = logging.getLogger(__name__)
PREFIX = "jaxllm/runner/"
KEEP = 16  # messages kept in the store: followers are never more than a step or two behind


@dataclasses.dataclass(frozen=True)
class Cluster:
    """Where this process stands in a group: the coordinator's host:port (process 0 listens there), how
    many processes, and this one's index (0: the leader)."""

    coordinator_address: str
    num_processes: int
    process_id: int
    heartbeat_timeout: int = 10

    @property
    def leader(self) -> bool:
        return self.process_id == 0


def initialize(cluster: Cluster) -> None:
    """`jax.distributed.initialize` for this process (before anything touches a device); on the CPU the
    collectives between processes go over gloo. Raises PlacementError for a group that cannot be formed."""
    if cluster.num_processes < 1 or not 0 <= cluster.process_id < cluster.num_processes:
        raise PlacementError(
            f"process id {cluster.process_id} is not within a group of {cluster.num_processes} processes: "
            f"give --process-id from 0 to {cluster.num_processes - 1}"
        )
    if jax.distributed.is_initialized():
        return
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(
            cluster.coordinator_address,
            cluster.num_processes,
            cluster.process_id,
            heartbeat_timeout_seconds=cluster.heartbeat_timeout,
        )
    except Exception as e:  # the coordination service's errors carry pages of context
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise PlacementError(
            f"process {cluster.process_id} could not join the group at {cluster.coordinator_address}: {first}"
        ) from e
    _first_collective()


def _first_collective() -> None:
    """One sum over every device of the group, now: it checks that the processes can compute together, and
    gloo's "[Gloo] ... connected" notice, which it writes to stdout when its first collective starts, goes
    to stderr instead of into a command's output."""
    import os
    import sys

    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    devices = jax.devices()
    mesh = Mesh(np.array(devices), ("all",))
    ones = jax.make_array_from_callback(
        (len(devices),), NamedSharding(mesh, PartitionSpec("all")), lambda index: np.ones(1, np.int32)
    )
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        total = jax.jit(lambda a: a.sum(), out_shardings=NamedSharding(mesh, PartitionSpec()))(ones)
        total = int(total)
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)
    if total != len(devices):
        raise DistributedError(
            f"the group's first sum over {len(devices)} devices gave {total}: the processes disagree"
        )


class Channel:
    """The leader's runner calls, in order, over the coordination service's key-value store."""

    def __init__(self, poll_ms: int = 1000):
        from jax._src import distributed as jax_distributed

        self.client = jax_distributed.global_state.client
        if self.client is None:
            raise DistributedError("jax.distributed is not initialized: call jaxllm.distributed.initialize first")
        self.poll_ms = poll_ms
        self.sent = self.received = 0

    def send(self, method: str, *args) -> None:
        """Publish one call (leader)."""
        self.client.key_value_set_bytes(f"{PREFIX}{self.sent}", pickle.dumps((method, args)))
        if self.sent >= KEEP:
            self.client.key_value_delete(f"{PREFIX}{self.sent - KEEP}")
        self.sent += 1

    def receive(self) -> tuple[str, tuple]:
        """The next call (follower), waiting for it as long as the group lives."""
        key = f"{PREFIX}{self.received}"
        while True:
            try:
                data = self.client.blocking_key_value_get_bytes(key, self.poll_ms)
                break
            except Exception as e:  # a deadline while the leader is idle: wait on
                if "DEADLINE_EXCEEDED" not in str(e) and "timed out" not in str(e).lower():
                    raise DistributedError(f"the leader stopped sending steps: {str(e).splitlines()[0]}") from e
        self.received += 1
        return pickle.loads(data)


def follow(runner, channel: Channel) -> int:
    """Replay the leader's runner calls on this process's runner until it says 'stop'; returns the calls run."""
    calls = 0
    while True:
        method, args = channel.receive()
        if method == "stop":
            return calls
        getattr(runner, method)(*args)
        calls += 1
        if calls % 64 == 0:  # keep the queue of dispatched steps short
            jax.block_until_ready(runner.cache)


def leave() -> None:
    """Leave the group at its shutdown barrier (every process calls it once its part is done), so that no
    process outlives the coordination service that process 0 hosts and dies on its lost connection."""
    if jax.distributed.is_initialized():
        jax.distributed.shutdown()


def peer_failure(e: BaseException) -> DistributedError:
    """The error a step raises when another process of the group is gone, as one line."""
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return DistributedError(f"a process of the distributed group stopped (its step failed: {first[:200]}): stopping")

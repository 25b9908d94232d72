"""Two processes on localhost form one group (jax.distributed, CPU devices over gloo): the leader's engine
drives both, the output is the single-process output, and a follower that dies stops the leader with a
clear error instead of a hang."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from jaxllm.distributed import Cluster, initialize
from jaxllm.errors import PlacementError
from jaxllm.serving.launch import free_port

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ["hello there the", "the cat sat on the mat and", "xyz"]

SCRIPT = """
import json, os, sys, time
from jaxllm import LLM, SamplingParams
from jaxllm.distributed import Cluster
from jaxllm.errors import DistributedError

folder, pid, port, prompts, gate = sys.argv[1], int(sys.argv[2]), sys.argv[3], json.loads(sys.argv[4]), sys.argv[5]
cluster = Cluster(f"127.0.0.1:{port}", 2 if pid >= 0 else 1, max(pid, 0)) if pid >= 0 else None
llm = LLM(folder, cluster=cluster, progress=False, max_num_seqs=4, tensor_parallel=2 if cluster else 1)
params = SamplingParams(temperature=0, max_tokens=12, min_tokens=12)
run = lambda: [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
if pid <= 0:
    print("RESULT", json.dumps(run()), flush=True)
    if gate != "-":  # wait for the test to kill the follower, then try again
        while not os.path.exists(gate):
            time.sleep(0.1)
        start = time.monotonic()
        try:
            run()
            print("NO-ERROR", flush=True)
        except DistributedError as e:
            print("ERROR", round(time.monotonic() - start, 1), str(e), flush=True)
        os._exit(0)
    if cluster:
        llm.close()
else:
    print("FOLLOWED", llm.follow(), flush=True)
"""

pytestmark = pytest.mark.slow


def _start(folder, pid: int, port: int, gate: str = "-") -> subprocess.Popen:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
    env.pop("XLA_FLAGS", None)  # one CPU device per process: the mesh spans the two processes
    args = [sys.executable, "-c", SCRIPT, str(folder), str(pid), str(port), json.dumps(PROMPTS), gate]
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _result(out: str):
    line = next(ln for ln in out.splitlines() if ln.startswith("RESULT "))
    return json.loads(line[len("RESULT ") :])


def test_two_processes_generate_what_one_process_does(tiny_models):
    folder = tiny_models["llama"][0]
    single = _start(folder, -1, 0)
    want = _result(single.communicate(timeout=300)[0])
    port = free_port()
    follower = _start(folder, 1, port)
    leader = _start(folder, 0, port)
    out, err = leader.communicate(timeout=300)
    assert _result(out) == want, err[-2000:]
    f_out, f_err = follower.communicate(timeout=60)
    assert "FOLLOWED" in f_out, f_err[-2000:]  # the leader's close() ended the follower's loop


def test_a_follower_that_dies_stops_the_leader_with_a_clear_error(tiny_models, tmp_path):
    folder, gate = tiny_models["llama"][0], tmp_path / "killed"
    port = free_port()
    follower = _start(folder, 1, port)
    leader = _start(folder, 0, port, str(gate))
    try:
        deadline = time.monotonic() + 300
        line = ""
        while not line.startswith("RESULT") and time.monotonic() < deadline:
            line = leader.stdout.readline()
        assert line.startswith("RESULT"), leader.stderr.read()[-2000:]
        follower.kill()
        follower.wait()
        gate.touch()
        out, _ = leader.communicate(timeout=120)
    finally:
        for p in (leader, follower):
            if p.poll() is None:
                p.kill()
    line = next(ln for ln in out.splitlines() if ln.startswith(("ERROR", "NO-ERROR")))
    assert line.startswith("ERROR"), out
    seconds, message = float(line.split()[1]), line.split(maxsplit=2)[2]
    assert seconds < 60 and "a process of the distributed group stopped" in message


def test_a_process_id_outside_the_group_is_refused():
    with pytest.raises(PlacementError, match="process id 2 is not within a group of 2 processes"):
        initialize(Cluster("127.0.0.1:1", 2, 2))


def test_jaxllm_generate_over_two_processes_prints_what_one_process_does(tiny_models):
    folder = str(tiny_models["llama"][0])
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
    env.pop("XLA_FLAGS", None)
    cmd = [sys.executable, "-m", "jaxllm", "generate", "--model", folder, "--temperature", "0", "--max-tokens", "8"]
    one = subprocess.run([*cmd, "the cat sat"], capture_output=True, text=True, env=env, timeout=300)
    assert one.returncode == 0, one.stderr[-2000:]
    group = ["--coordinator-address", f"127.0.0.1:{free_port()}", "--num-processes", "2", "--tensor-parallel", "2"]
    run = lambda i: subprocess.Popen(
        [*cmd, *group, "--process-id", str(i), "the cat sat"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    follower, leader = run(1), run(0)
    out, err = leader.communicate(timeout=300)
    assert leader.returncode == 0 and out == one.stdout, err[-2000:]  # stdout holds the completion alone
    f_out, f_err = follower.communicate(timeout=60)
    assert follower.returncode == 0 and f_out == "", f_err[-2000:]  # a follower prints nothing of its own


def test_process_0_serves_http_for_the_group(tiny_models):
    import httpx

    from jaxllm import LLM, SamplingParams
    from jaxllm.serving.launch import spawn_server

    folder = str(tiny_models["llama"][0])
    want = (
        LLM(folder, tensor_parallel=1, progress=False)
        .generate("the cat sat", SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)[0]
        .outputs[0]
        .text
    )
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
    env.pop("XLA_FLAGS", None)
    group = ["--model", folder, "--coordinator-address", f"127.0.0.1:{free_port()}", "--num-processes", "2"]
    follower = subprocess.Popen(
        [sys.executable, "-m", "jaxllm", "serve", *group, "--process-id", "1", "--port", str(free_port())],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    leader, url = spawn_server([*group, "--process-id", "0", "--no-warmup"], timeout=300, env=env)
    try:
        name = httpx.get(url + "/v1/models", timeout=30).json()["data"][0]["id"]
        body = {"model": name, "prompt": "the cat sat", "temperature": 0, "max_tokens": 8}
        r = httpx.post(url + "/v1/completions", json=body, timeout=120)
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == want
    finally:
        leader.terminate()
        leader.wait(timeout=60)
    follower.wait(timeout=60)  # the leader's exit ended the follower's loop
    assert follower.returncode == 0, follower.stderr.read()[-2000:]

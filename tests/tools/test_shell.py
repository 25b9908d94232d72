"""The sandboxed shell: it sees and writes only its root, has no network, and its time, output and processes
are bounded. Each escape attempt is a test of its own, and nothing outside the root changes."""

from __future__ import annotations

import os
import subprocess
import threading
import time

import pytest

from jaxllm.tools.agent.sandbox import Sandbox
from jaxllm.tools.agent.shell import MAX_PROCESSES, run_shell, shell_unavailable


@pytest.fixture
def world(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "ro").mkdir(parents=True)
    outside.mkdir()
    (root / "hello.txt").write_text("hello from inside\n")
    (root / "ro" / "keep.txt").write_text("keep\n")
    (outside / "secret.txt").write_text("the secret\n")
    before = sorted(p.name for p in tmp_path.iterdir())
    yield Sandbox(root, readonly=["ro"]), outside
    assert (outside / "secret.txt").read_text() == "the secret\n" and sorted(os.listdir(outside)) == ["secret.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_the_sandbox_can_be_set_up_here():
    """CI's machines allow user namespaces: the shell must be offered there (elsewhere it is not, and says why)."""
    assert shell_unavailable() is None


def test_commands_run_in_the_root_and_write_there(world):
    sb, _ = world
    out = run_shell(sb, "pwd; cat hello.txt; echo made > new.txt; ls")
    assert "/work\nhello from inside\n" in out and "new.txt" in out and "[exit status 0" in out
    assert open(os.path.join(sb.root, "new.txt")).read() == "made\n"
    assert "[exit status 3" in run_shell(sb, "exit 3")


def test_cd_dotdot_stays_inside(world):
    sb, outside = world
    out = run_shell(sb, f"cd ..; pwd; ls; cd ..; ls; ls {outside} 2>&1; cat {outside}/secret.txt 2>&1")
    assert "the secret" not in out and out.count("No such file or directory") == 2, out


def test_etc_passwd_is_not_there(world):
    sb, _ = world
    out = run_shell(sb, "cat /etc/passwd; ls /etc; ls /home /root")
    assert "root:" not in out and "No such file" in out


def test_writing_outside_fails(world):
    sb, outside = world
    out = run_shell(sb, f"echo x > /escaped.txt; echo x > {outside}/new.txt; echo x > /usr/escaped; touch /tmp/x")
    assert out.count("Read-only file system") + out.count("No such file") >= 3, out
    assert not os.path.exists("/escaped.txt") and not os.path.exists("/usr/escaped")


def test_read_only_paths_stay_read_only(world):
    sb, _ = world
    out = run_shell(sb, "echo changed > ro/keep.txt; rm ro/keep.txt; echo new > ro/new.txt")
    assert "Read-only file system" in out
    assert open(os.path.join(sb.root, "ro", "keep.txt")).read() == "keep\n"
    assert os.listdir(os.path.join(sb.root, "ro")) == ["keep.txt"]


def test_the_network_is_unreachable(world):
    sb, _ = world
    connect = "import socket; s = socket.socket(); s.settimeout(3); s.connect(('1.1.1.1', 53)); print('CONNECTED')"
    out = run_shell(sb, f'python3 -c "{connect}" 2>&1; echo IFACES; tail -n +3 /proc/net/dev | cut -d: -f1')
    assert "CONNECTED" not in out and "Network is unreachable" in out, out
    interfaces = [line.strip() for line in out.split("IFACES\n")[1].split("\n")[:-2] if line.strip()]
    assert interfaces == ["lo"], out  # the loopback alone


def test_environment_is_minimal(world, monkeypatch):
    sb, _ = world
    monkeypatch.setenv("JAXLLM_SECRET_TOKEN", "sk-123")
    out = run_shell(sb, "env")
    assert "sk-123" not in out and "PATH=" in out


def test_endless_output_is_cut(world):
    sb, _ = world
    start = time.monotonic()
    out = run_shell(sb, "yes spam", timeout=30, max_output=10_000)
    assert "[output cut at 10000 bytes" in out and len(out) < 11_000 and time.monotonic() - start < 20


def test_a_command_past_its_timeout_is_killed_with_its_children(world):
    sb, _ = world
    start = time.monotonic()
    out = run_shell(sb, "(sleep 100 &) ; sleep 100", timeout=2)
    assert "[timed out after 2 s" in out and time.monotonic() - start < 10


def test_a_command_cannot_run_more_than_its_processes(world):
    sb, _ = world
    spawn = (
        "import subprocess\nstarted = []\ntry:\n    for _ in range(200):\n"
        "        started.append(subprocess.Popen(['sleep', '5']))\nexcept OSError as e:\n    print(e)\n"
        "print(len(started))"
    )
    out = run_shell(sb, f'python3 -c "{spawn}"')
    lines = out.split("\n")
    assert "Resource temporarily unavailable" in lines[0] and 0 < int(lines[1]) <= MAX_PROCESSES, out


def test_a_fork_bomb_is_bounded_and_the_host_can_still_fork(world):
    sb, _ = world
    start = time.monotonic()
    result = {}
    bomb = threading.Thread(
        target=lambda: result.update(out=run_shell(sb, "bomb() { bomb | bomb & }; bomb; sleep 4; echo survived", 8))
    )
    bomb.start()
    time.sleep(2)
    assert subprocess.run(["true"]).returncode == 0  # the machine still forks while the bomb goes off
    bomb.join()
    assert time.monotonic() - start < 20 and ("[timed out" in result["out"] or "[exit status" in result["out"])


def test_a_read_only_root_is_read_only_to_the_shell(tmp_path):
    (tmp_path / "a.txt").write_text("a\n")
    out = run_shell(Sandbox(tmp_path, readonly=["."]), "echo b > a.txt; echo c > new.txt; cat a.txt")
    assert out.count("Read-only file system") == 2 and (tmp_path / "a.txt").read_text() == "a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]

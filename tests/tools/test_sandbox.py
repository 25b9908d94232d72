"""The agent's file tools stay inside their sandbox: every escape attempt fails with a clear error and touches
nothing outside the root; the tools work inside it."""

from __future__ import annotations

import os
import threading

import pytest

from jaxllm.tools.agent import files
from jaxllm.tools.agent.sandbox import Sandbox, SandboxError


@pytest.fixture
def world(tmp_path):
    """root/ (the sandbox: notes.txt, sub/data.csv, ro/keep.txt) beside outside/ (secret.txt): returns the
    sandbox, the outside directory and a snapshot function of everything outside the root."""
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "sub").mkdir(parents=True)
    (root / "ro").mkdir()
    outside.mkdir()
    (root / "notes.txt").write_text("alpha\nbeta\ngamma\nbeta\n")
    (root / "sub" / "data.csv").write_text("3,c\n1,a\n2,b\n")
    (root / "ro" / "keep.txt").write_text("do not touch\n")
    (outside / "secret.txt").write_text("the secret\n")
    sb = Sandbox(root, readonly=["ro"], max_file_size=1000, allowed_extensions=[".txt", ".csv", ".md"])

    def snapshot():
        return {p: p.read_bytes() if p.is_file() else None for p in sorted(outside.rglob("*"))}

    return sb, outside, snapshot


def refused(call, *words):
    with pytest.raises(SandboxError) as e:
        call()
    message = str(e.value)
    assert "\n" not in message and all(w in message for w in words), message
    return message


# ---- the tools work inside -------------------------------------------------------------------------------
def test_reading_tools(world):
    sb, _, _ = world
    assert files.read_file(sb, "notes.txt") == "alpha\nbeta\ngamma\nbeta\n"
    assert files.read_file(sb, "notes.txt", offset=1, limit=2) == "beta\ngamma\n"
    assert files.head(sb, "notes.txt", 2) == "alpha\nbeta\n" and files.tail(sb, "notes.txt", 1) == "beta\n"
    assert files.wc(sb, "notes.txt").startswith("4 lines, 4 words, 22 bytes")
    assert files.sort(sb, "notes.txt", unique=True) == "alpha\nbeta\ngamma"
    assert files.sort(sb, "sub/data.csv", numeric=True) == "1,a\n2,b\n3,c"
    assert files.uniq(sb, "notes.txt") == "alpha\nbeta\ngamma\nbeta"
    assert "sub/" in files.list_dir(sb) and "notes.txt  22 bytes" in files.list_dir(sb, ".")
    assert files.find(sb, name="*.csv") == "sub/data.csv"
    assert files.grep(sb, "^b", ".") == "notes.txt:2: beta\nnotes.txt:4: beta"
    assert "file, 22 bytes" in files.stat(sb, "notes.txt")


def test_writing_tools(world):
    sb, _, _ = world
    files.write_file(sb, "sub/../made.md", "one\n")
    files.append_file(sb, "made.md", "two\n")
    assert files.read_file(sb, "made.md") == "one\ntwo\n"
    assert files.mkdir(sb, "a/b/c") == "created a, a/b, a/b/c"
    files.move(sb, "made.md", "a/b/c/moved.md")
    assert files.read_file(sb, "a/b/c/moved.md") == "one\ntwo\n"
    refused(lambda: files.delete(sb, "a"), "not empty")
    assert files.delete(sb, "a", recursive=True) == "deleted a"
    assert not os.path.exists(os.path.join(sb.root, "a"))


def test_a_full_path_inside_the_root_is_accepted(world):
    sb, _, _ = world
    assert files.read_file(sb, os.path.join(sb.root, "notes.txt")).startswith("alpha")


# ---- escapes, each refused with nothing outside touched -------------------------------------------------
def test_dotdot_paths(world):
    sb, _, snap = world
    before = snap()
    refused(lambda: files.read_file(sb, "../outside/secret.txt"), "outside the sandbox")
    refused(lambda: files.read_file(sb, "sub/../../outside/secret.txt"), "outside the sandbox")
    refused(lambda: files.write_file(sb, "../outside/new.txt", "x"), "outside the sandbox")
    refused(lambda: files.list_dir(sb, ".."), "outside the sandbox")
    assert snap() == before


def test_absolute_paths(world):
    sb, outside, snap = world
    before = snap()
    refused(lambda: files.read_file(sb, str(outside / "secret.txt")), "outside the sandbox")
    refused(lambda: files.read_file(sb, "/etc/passwd"), "outside the sandbox")
    refused(lambda: files.write_file(sb, str(outside / "new.txt"), "x"), "outside the sandbox")
    refused(lambda: files.delete(sb, str(outside / "secret.txt")), "outside the sandbox")
    assert snap() == before


def test_a_symlink_to_an_outside_file(world):
    sb, outside, snap = world
    os.symlink(outside / "secret.txt", os.path.join(sb.root, "link.txt"))
    os.symlink("../outside/secret.txt", os.path.join(sb.root, "rel.txt"))
    before = snap()
    refused(lambda: files.read_file(sb, "link.txt"), "outside the sandbox")
    refused(lambda: files.read_file(sb, "rel.txt"), "outside the sandbox")
    refused(lambda: files.write_file(sb, "link.txt", "overwritten"), "outside the sandbox")
    refused(lambda: files.append_file(sb, "rel.txt", "more"), "outside the sandbox")
    assert "link.txt -> (symbolic link)" in files.list_dir(sb)
    assert snap() == before


def test_a_symlink_to_an_outside_directory(world):
    sb, outside, snap = world
    os.symlink(outside, os.path.join(sb.root, "out"))
    before = snap()
    refused(lambda: files.read_file(sb, "out/secret.txt"), "outside the sandbox")
    refused(lambda: files.list_dir(sb, "out"), "outside the sandbox")
    refused(lambda: files.write_file(sb, "out/new.txt", "x"), "outside the sandbox")
    refused(lambda: files.mkdir(sb, "out/d"), "outside the sandbox")
    assert "secret" not in files.find(sb, name="*")  # find does not enter links
    assert "secret" not in files.grep(sb, "secret")
    assert snap() == before


def test_symlinks_inside_the_root_are_followed(world):
    sb, _, _ = world
    os.symlink("sub", os.path.join(sb.root, "alias"))
    os.symlink(os.path.join(sb.root, "notes.txt"), os.path.join(sb.root, "sub", "abs.txt"))
    assert files.read_file(sb, "alias/data.csv").startswith("3,c")
    assert files.read_file(sb, "alias/abs.txt").startswith("alpha")


def test_a_symlink_swapped_in_after_the_check_cannot_redirect_the_open(world, monkeypatch):
    """A racing thread replaces a checked file by a symlink to the outside between the check and the open: the
    open refuses (O_NOFOLLOW on the held directory), whichever moment the swap lands."""
    sb, outside, snap = world
    target = os.path.join(sb.root, "sub", "race.txt")
    with open(target, "w") as f:
        f.write("inside\n")
    before = snap()
    real_open = os.open
    swapped = threading.Event()

    def racing_open(path, flags, *args, **kwargs):
        if path == "race.txt" and not swapped.is_set():
            t = threading.Thread(target=lambda: (os.unlink(target), os.symlink(outside / "secret.txt", target)))
            t.start()
            t.join()
            swapped.set()
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", racing_open)
    refused(lambda: files.read_file(sb, "sub/race.txt"), "replaced by a symbolic link")
    swapped.clear()
    with open(target + ".w", "w"):
        pass
    os.unlink(target)
    os.rename(target + ".w", target)
    refused(lambda: files.write_file(sb, "sub/race.txt", "overwritten"), "replaced by a symbolic link")
    monkeypatch.undo()
    assert snap() == before and (outside / "secret.txt").read_text() == "the secret\n"


def test_a_directory_swapped_for_a_symlink_mid_walk_is_not_followed(world, monkeypatch):
    sb, outside, snap = world
    real_open = os.open
    done = threading.Event()

    def racing_open(path, flags, *args, **kwargs):
        if path == "sub" and not done.is_set():
            done.set()
            os.rename(os.path.join(sb.root, "sub"), os.path.join(sb.root, "sub.old"))
            os.symlink(outside, os.path.join(sb.root, "sub"))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", racing_open)
    refused(lambda: files.write_file(sb, "sub/secret.txt", "overwritten"), "sub")
    monkeypatch.undo()
    assert (outside / "secret.txt").read_text() == "the secret\n"


def test_hard_links_to_outside_files(world):
    sb, outside, snap = world
    try:
        os.link(outside / "secret.txt", os.path.join(sb.root, "hard.txt"))
    except OSError as e:
        pytest.skip(f"this filesystem refuses the hard link itself ({e})")
    before = snap()
    refused(lambda: files.read_file(sb, "hard.txt"), "hard links")
    refused(lambda: files.write_file(sb, "hard.txt", "overwritten"), "hard links")
    refused(lambda: files.append_file(sb, "hard.txt", "more"), "hard links")
    assert snap() == before


def test_proc_self_root_and_cwd(world):
    sb, _, snap = world
    before = snap()
    refused(lambda: files.read_file(sb, "/proc/self/root/etc/passwd"), "outside the sandbox")
    refused(lambda: files.list_dir(sb, "/proc/self/cwd"), "outside the sandbox")
    os.symlink("/proc/self/root", os.path.join(sb.root, "proc_root"))
    os.symlink("/proc/self/cwd", os.path.join(sb.root, "proc_cwd"))
    refused(lambda: files.read_file(sb, "proc_root/etc/passwd"), "outside the sandbox")
    refused(lambda: files.list_dir(sb, "proc_cwd"), "outside the sandbox")
    assert snap() == before


def test_writes_to_read_only_paths(world):
    sb, _, _ = world
    keep = os.path.join(sb.root, "ro", "keep.txt")
    refused(lambda: files.write_file(sb, "ro/keep.txt", "changed"), "read-only")
    refused(lambda: files.append_file(sb, "ro/new.txt", "x"), "read-only")
    refused(lambda: files.delete(sb, "ro/keep.txt"), "read-only")
    refused(lambda: files.delete(sb, "ro", recursive=True), "read-only")
    refused(lambda: files.move(sb, "ro", "elsewhere"), "read-only")
    refused(lambda: files.move(sb, "notes.txt", "ro/notes.txt"), "read-only")
    refused(lambda: files.mkdir(sb, "ro/d"), "read-only")
    os.symlink("ro", os.path.join(sb.root, "ro_alias"))
    refused(lambda: files.write_file(sb, "ro_alias/keep.txt", "changed"), "read-only")
    assert open(keep).read() == "do not touch\n" and sorted(os.listdir(os.path.dirname(keep))) == ["keep.txt"]
    assert files.read_file(sb, "ro/keep.txt") == "do not touch\n"


def test_oversized_files(world):
    sb, _, _ = world
    big = os.path.join(sb.root, "big.txt")
    with open(big, "w") as f:
        f.write("line\n" * 1000)
    refused(lambda: files.read_file(sb, "big.txt"), "5000 bytes", "limit")
    refused(lambda: files.write_file(sb, "new.txt", "x" * 1001), "limit")
    files.write_file(sb, "small.txt", "x" * 900)
    refused(lambda: files.append_file(sb, "small.txt", "y" * 200), "limit")
    assert os.path.getsize(os.path.join(sb.root, "small.txt")) == 900
    assert files.head(sb, "big.txt", 2) == "line\nline\n"  # a bounded part of a big file is fine
    assert files.wc(sb, "big.txt").startswith("1000 lines")


def test_disallowed_extensions(world):
    sb, _, _ = world
    with open(os.path.join(sb.root, "run.sh"), "w") as f:
        f.write("echo hi\n")
    refused(lambda: files.read_file(sb, "run.sh"), "extension")
    refused(lambda: files.write_file(sb, "tool.py", "print(1)"), "extension")
    refused(lambda: files.move(sb, "notes.txt", "notes.sh"), "extension")
    assert not os.path.exists(os.path.join(sb.root, "tool.py")) and os.path.exists(os.path.join(sb.root, "notes.txt"))

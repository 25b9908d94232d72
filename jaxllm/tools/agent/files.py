"""The agent's file tools, each confined to a `Sandbox`: read_file, list_dir, find, grep, head, tail, wc, sort,
uniq, stat, write_file, append_file, mkdir, move, delete.

Each takes the sandbox and the call's arguments and returns the text the model reads; a refusal or failure
raises `SandboxError` (its message becomes the tool's result). Listings stop at `MAX_RESULTS` entries, saying
so. Nothing follows a symbolic link while walking a tree: links are listed, not entered.
"""

from __future__ import annotations

import fnmatch
import os
import re
import shutil
import stat as stat_module
import time
from collections.abc import Callable, Iterator

from jaxllm.tools.agent.sandbox import DIR_FLAGS, Sandbox, SandboxError

MAX_RESULTS = 500  # entries a listing, find or grep returns at most
MAX_DEPTH = 32  # directory levels find and grep descend at most


def _text(data: bytes) -> str:
    return data.decode("utf-8", errors="replace")


def _read(sb: Sandbox, path: str) -> str:
    fd, _ = sb.open_file(path, "r")
    with os.fdopen(fd, "rb") as f:
        return _text(f.read(sb.max_file_size + 1))


def _lines(sb: Sandbox, path: str) -> list[str]:
    return _read(sb, path).splitlines()


def _capped(lines: list[str], what: str) -> str:
    if len(lines) > MAX_RESULTS:
        return "\n".join(lines[:MAX_RESULTS] + [f"... ({len(lines) - MAX_RESULTS} more {what} not shown)"])
    return "\n".join(lines) if lines else f"(no {what})"


def read_file(sb: Sandbox, path: str, offset: int = 0, limit: int | None = None) -> str:
    lines = _read(sb, path).splitlines(keepends=True)
    return "".join(lines[offset : None if limit is None else offset + limit])


def _walk(sb: Sandbox, path: str) -> Iterator[tuple[str, os.DirEntry, int]]:
    """(path relative to the root, entry, depth) of everything under `path`, directories entered by descriptor
    (never through a symlink), in name order."""
    with sb.open_dir(path) as (fd, r):
        yield from _walk_fd(fd, r.rel, 0)


def _walk_fd(fd: int, rel: str, depth: int):
    with os.scandir(fd) as it:
        entries = sorted(it, key=lambda e: e.name)
    for e in entries:
        child = f"{rel}/{e.name}" if rel else e.name
        yield child, e, depth
        if e.is_dir(follow_symlinks=False) and depth < MAX_DEPTH:
            try:
                sub = os.open(e.name, DIR_FLAGS, dir_fd=fd)
            except OSError:
                continue  # replaced or removed meanwhile: not entered
            try:
                yield from _walk_fd(sub, child, depth + 1)
            finally:
                os.close(sub)


def _describe(e: os.DirEntry, name: str) -> str:
    if e.is_symlink():
        return f"{name} -> (symbolic link)"
    if e.is_dir(follow_symlinks=False):
        return name + "/"
    return f"{name}  {e.stat(follow_symlinks=False).st_size} bytes"


def list_dir(sb: Sandbox, path: str = ".") -> str:
    with sb.open_dir(path) as (fd, _):
        with os.scandir(fd) as it:
            entries = sorted(it, key=lambda e: e.name)
        lines = [_describe(e, e.name) for e in entries]  # while the directory is open: sizes are read through it
    return _capped(lines, "entries")


def find(sb: Sandbox, path: str = ".", name: str = "*", type: str = "any") -> str:  # noqa: A002 — the tool's word
    if type not in ("any", "file", "dir"):
        raise SandboxError(f"type must be 'any', 'file' or 'dir', got {type!r}")
    hits = []
    for rel, e, _ in _walk(sb, path):
        is_dir = e.is_dir(follow_symlinks=False)
        if fnmatch.fnmatch(e.name, name) and (type == "any" or (type == "dir") == is_dir):
            hits.append(rel + ("/" if is_dir else ""))
            if len(hits) > MAX_RESULTS:
                break
    return _capped(hits, "matches")


def grep(sb: Sandbox, pattern: str, path: str = ".", ignore_case: bool = False) -> str:
    try:
        rx = re.compile(pattern, re.IGNORECASE if ignore_case else 0)
    except re.error as e:
        raise SandboxError(f"pattern is not a valid regular expression: {e}") from None
    with sb.resolve(path) as r:
        single = (
            r.exists
            and r.name is not None
            and not stat_module.S_ISDIR(os.stat(r.name, dir_fd=r.dir_fd, follow_symlinks=False).st_mode)
        )
    targets = [path] if single else [rel for rel, e, _ in _walk(sb, path) if e.is_file(follow_symlinks=False)]
    hits = []
    for rel in targets:
        try:
            lines = _lines(sb, rel)
        except SandboxError:
            if single:
                raise
            continue  # too large, a disallowed extension, hard-linked: not searched
        hits += [f"{rel}:{i}: {line}" for i, line in enumerate(lines, 1) if rx.search(line)]
        if len(hits) > MAX_RESULTS:
            break
    return _capped(hits, "matching lines")


def _partial(sb: Sandbox, path: str, from_end: bool) -> str:
    """Up to the size limit's worth of bytes from the start (or the end) of a file of any size."""
    fd, _ = sb.open_file(path, "r", any_size=True)
    with os.fdopen(fd, "rb") as f:
        if from_end:
            f.seek(max(0, os.fstat(f.fileno()).st_size - sb.max_file_size))
        return _text(f.read(sb.max_file_size))


def head(sb: Sandbox, path: str, lines: int = 10) -> str:
    return "".join(_partial(sb, path, False).splitlines(keepends=True)[: max(lines, 0)])


def tail(sb: Sandbox, path: str, lines: int = 10) -> str:
    return "".join(_partial(sb, path, True).splitlines(keepends=True)[-lines:] if lines > 0 else [])


def wc(sb: Sandbox, path: str) -> str:
    fd, r = sb.open_file(path, "r", any_size=True)
    n_lines = n_words = n_bytes = 0
    inside = False  # the previous chunk ended inside a word
    with os.fdopen(fd, "rb") as f:
        while chunk := f.read(1 << 16):
            n_lines += chunk.count(b"\n")
            n_words += len(chunk.split()) - (inside and not chunk[:1].isspace())
            inside = not chunk[-1:].isspace()
            n_bytes += len(chunk)
    return f"{n_lines} lines, {n_words} words, {n_bytes} bytes  {r.display}"


def sort(sb: Sandbox, path: str, reverse: bool = False, numeric: bool = False, unique: bool = False) -> str:
    lines = _lines(sb, path)
    if unique:
        lines = list(dict.fromkeys(lines))
    if numeric:

        def key(line):
            m = re.match(r"\s*(-?\d+(?:\.\d+)?)", line)
            return (0, float(m.group(1)), line) if m else (1, 0.0, line)

        return "\n".join(sorted(lines, key=key, reverse=reverse))
    return "\n".join(sorted(lines, reverse=reverse))


def uniq(sb: Sandbox, path: str, count: bool = False) -> str:
    out: list[list] = []
    for line in _lines(sb, path):
        if out and out[-1][1] == line:
            out[-1][0] += 1
        else:
            out.append([1, line])
    return "\n".join(f"{n:7d} {line}" if count else line for n, line in out)


def stat(sb: Sandbox, path: str) -> str:
    with sb.resolve(path) as r:
        if not r.exists:
            raise SandboxError(f"{r.display}: no such file or directory")
        st = os.stat(r.name, dir_fd=r.dir_fd, follow_symlinks=False) if r.name else os.fstat(r.dir_fd)
    kind = "directory" if stat_module.S_ISDIR(st.st_mode) else "file" if stat_module.S_ISREG(st.st_mode) else "other"
    modified = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(st.st_mtime))
    return f"{r.display}: {kind}, {st.st_size} bytes, mode {stat_module.filemode(st.st_mode)}, modified {modified}"


def _write(sb: Sandbox, path: str, content: str, mode: str) -> str:
    data = content.encode()
    if len(data) > sb.max_file_size:
        raise SandboxError(f"{len(data)} bytes is over the {sb.max_file_size}-byte file limit: write less")
    fd, r = sb.open_file(path, mode)
    with os.fdopen(fd, "wb") as f:
        if mode == "a":
            size = os.fstat(f.fileno()).st_size
            if size + len(data) > sb.max_file_size:
                raise SandboxError(f"{r.display} would grow past the {sb.max_file_size}-byte file limit: refused")
            f.seek(size)
        f.write(data)
    return f"wrote {len(data)} bytes to {r.display}"


def write_file(sb: Sandbox, path: str, content: str) -> str:
    return _write(sb, path, content, "w")


def append_file(sb: Sandbox, path: str, content: str) -> str:
    return _write(sb, path, content, "a")


def mkdir(sb: Sandbox, path: str, parents: bool = True) -> str:
    parts = [p for p in path.split("/") if p not in ("", ".")]
    created = []
    for i in range(1, len(parts) + 1):
        sub = "/".join(parts[:i]) if not path.startswith("/") else "/" + "/".join(parts[:i])
        with sb.resolve(sub) as r:
            if r.exists:
                continue
            if i < len(parts) and not parents:
                raise SandboxError(f"{r.display}: no such directory (pass parents: true to create it)")
            sb.check_writable(r)
            os.mkdir(r.name, 0o755, dir_fd=r.dir_fd)
            created.append(r.display)
    return f"created {', '.join(created)}" if created else f"{path} exists already"


def move(sb: Sandbox, source: str, destination: str) -> str:
    with sb.resolve(source) as src, sb.resolve(destination) as dst:
        if not src.exists or src.name is None:
            raise SandboxError(f"{src.display}: no such file or directory (the root cannot be moved)")
        if dst.exists:
            raise SandboxError(f"{dst.display} exists already: delete it first or choose another name")
        sb.check_writable(src, holds=True)
        sb.check_writable(dst)
        if not stat_module.S_ISDIR(os.stat(src.name, dir_fd=src.dir_fd, follow_symlinks=False).st_mode):
            sb.check_file_name(dst)
        os.rename(src.name, dst.name, src_dir_fd=src.dir_fd, dst_dir_fd=dst.dir_fd)
        return f"moved {src.display} to {dst.display}"


def delete(sb: Sandbox, path: str, recursive: bool = False) -> str:
    with sb.resolve(path) as r:
        if r.name is None:
            raise SandboxError("the sandbox root itself cannot be deleted")
        if not r.exists:
            raise SandboxError(f"{r.display}: no such file or directory")
        sb.check_writable(r, holds=True)
        st = os.stat(r.name, dir_fd=r.dir_fd, follow_symlinks=False)
        if not stat_module.S_ISDIR(st.st_mode):
            os.unlink(r.name, dir_fd=r.dir_fd)
        elif recursive:
            shutil.rmtree(r.name, dir_fd=r.dir_fd)  # by descriptor: never follows a symlink out
        else:
            try:
                os.rmdir(r.name, dir_fd=r.dir_fd)
            except OSError:
                raise SandboxError(f"{r.display} is a directory that is not empty: pass recursive: true") from None
        return f"deleted {r.display}"


def _schema(required: list[str], **props) -> dict:
    return {"type": "object", "properties": props, "required": required, "additionalProperties": False}


PATH = {"type": "string", "description": "a path inside the sandbox, relative to its root"}
LINES = {"type": "integer", "minimum": 0, "description": "how many lines"}

# name -> (function, description, JSON schema of its arguments, whether it changes files)
TOOLS: dict[str, tuple[Callable[..., str], str, dict, bool]] = {
    "read_file": (
        read_file,
        "Read a text file (optionally lines [offset, offset + limit)).",
        _schema(["path"], path=PATH, offset={"type": "integer", "minimum": 0}, limit={"type": "integer", "minimum": 0}),
        False,
    ),
    "list_dir": (list_dir, "List a directory's entries.", _schema([], path=PATH), False),
    "find": (
        find,
        "Find files or directories whose name matches a glob pattern, under a directory.",
        _schema(["name"], path=PATH, name={"type": "string"}, type={"enum": ["any", "file", "dir"]}),
        False,
    ),
    "grep": (
        grep,
        "Search files (a file, or a directory's tree) for lines matching a regular expression.",
        _schema(["pattern"], pattern={"type": "string"}, path=PATH, ignore_case={"type": "boolean"}),
        False,
    ),
    "head": (head, "The first lines of a file.", _schema(["path"], path=PATH, lines=LINES), False),
    "tail": (tail, "The last lines of a file.", _schema(["path"], path=PATH, lines=LINES), False),
    "wc": (wc, "Count a file's lines, words and bytes.", _schema(["path"], path=PATH), False),
    "sort": (
        sort,
        "A file's lines, sorted.",
        _schema(
            ["path"], path=PATH, reverse={"type": "boolean"}, numeric={"type": "boolean"}, unique={"type": "boolean"}
        ),
        False,
    ),
    "uniq": (
        uniq,
        "A file's lines with adjacent repeats collapsed (optionally counted).",
        _schema(["path"], path=PATH, count={"type": "boolean"}),
        False,
    ),
    "stat": (stat, "A path's kind, size, mode and modification time.", _schema(["path"], path=PATH), False),
    "write_file": (
        write_file,
        "Write a text file (replacing its content).",
        _schema(["path", "content"], path=PATH, content={"type": "string"}),
        True,
    ),
    "append_file": (
        append_file,
        "Append text to a file (created if missing).",
        _schema(["path", "content"], path=PATH, content={"type": "string"}),
        True,
    ),
    "mkdir": (mkdir, "Create a directory.", _schema(["path"], path=PATH, parents={"type": "boolean"}), True),
    "move": (
        move,
        "Move or rename a file or directory.",
        _schema(["source", "destination"], source=PATH, destination=PATH),
        True,
    ),
    "delete": (
        delete,
        "Delete a file, or a directory (recursive: with everything in it).",
        _schema(["path"], path=PATH, recursive={"type": "boolean"}),
        True,
    ),
}

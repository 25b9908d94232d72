"""A directory the agent tools may touch, and nothing outside it.

A path is resolved one component at a time from a descriptor of the root, never by the kernel's own lookup of
the whole path: each directory on the way is opened with `O_NOFOLLOW` and held, a symlink is read and its target
resolved the same way (an absolute target only where it lies under the root), and `..` never climbs above the
root. The final open is relative to the held descriptor of its directory, again with `O_NOFOLLOW`: a symlink
swapped in after the check makes it fail (`ELOOP`), it cannot redirect it. `/proc/self/root` and the like are
absolute paths outside the root, refused like any other.

A regular file with more than one hard link is refused: its other names may be outside the root. Writes to
read-only paths (and moves or deletes of them or of a directory holding one), files over the size limit and
names with a disallowed extension are refused before anything changes. Every refusal is a `SandboxError`
whose one-line message the model reads as the tool's result.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import errno
import os
import stat
from collections.abc import Iterator
from pathlib import Path

from jaxllm.errors import JaxLLMError

MAX_SYMLINKS = 40  # as the kernel's own limit on symlinks followed in one lookup
DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class SandboxError(JaxLLMError):
    """An agent tool was refused or failed: the message goes back to the model as the tool's result."""


@dataclasses.dataclass
class Resolved:
    """Where a path leads inside the sandbox: the held descriptor of its directory, its last component (None:
    the path is that directory itself), whether that exists, and the path relative to the root."""

    dir_fd: int
    name: str | None
    exists: bool
    rel: str

    @property
    def display(self) -> str:
        return self.rel or "."


class Sandbox:
    """The root the agent tools work in. readonly: paths (under the root, relative to it or absolute) that may
    not be changed; max_file_size: bytes a file read or written may have; allowed_extensions: the extensions
    (".txt", ...) of the files that may be read or written (None: any)."""

    def __init__(
        self,
        root: str | os.PathLike,
        readonly: tuple[str, ...] | list[str] = (),
        max_file_size: int = 1 << 20,
        allowed_extensions: tuple[str, ...] | list[str] | None = None,
    ):
        path = Path(root)
        if not path.is_dir():
            raise SandboxError(f"the agent sandbox root {root} is not a directory: create it or pass another")
        self.root = os.path.realpath(path)
        self.max_file_size = max_file_size
        self.allowed_extensions = None
        if allowed_extensions is not None:
            self.allowed_extensions = {e.lower() if e.startswith(".") else "." + e.lower() for e in allowed_extensions}
        self.readonly = []
        for p in readonly:
            with self.resolve(p) as r:
                self.readonly.append(r.rel)

    # ---- resolution -----------------------------------------------------------------------------
    @contextlib.contextmanager
    def resolve(self, path: str) -> Iterator[Resolved]:
        """Resolve `path` inside the root (see the module docstring); the directory descriptor it holds is closed
        on leaving. A missing last component is allowed (`exists` False); a missing directory on the way is not."""
        stack = [(os.open(self.root, DIR_FLAGS), "")]
        try:
            yield self._walk(str(path), stack)
        finally:
            for fd, _ in stack:
                os.close(fd)

    def _walk(self, path: str, stack: list[tuple[int, str]]) -> Resolved:
        pending = collections.deque(self._components(path, path))
        links = 0
        while pending:
            name = pending.popleft()
            if name == "..":
                if len(stack) == 1:
                    raise SandboxError(f"{path} leads outside the sandbox: use a path inside it")
                os.close(stack.pop()[0])
                continue
            cur = stack[-1][0]
            try:
                st = os.stat(name, dir_fd=cur, follow_symlinks=False)
            except FileNotFoundError:
                if pending:
                    raise SandboxError(f"{path}: no such directory {self._rel(stack, name)}") from None
                return Resolved(cur, name, False, self._rel(stack, name))
            if stat.S_ISLNK(st.st_mode):
                links += 1
                if links > MAX_SYMLINKS:
                    raise SandboxError(f"{path}: too many symbolic links")
                target = os.readlink(name, dir_fd=cur)
                if os.path.isabs(target):  # from the root again, if it lies under it
                    while len(stack) > 1:
                        os.close(stack.pop()[0])
                pending.extendleft(reversed(self._components(target, path)))
                continue
            if not pending:
                return Resolved(cur, name, True, self._rel(stack, name))
            if not stat.S_ISDIR(st.st_mode):
                raise SandboxError(f"{path}: {self._rel(stack, name)} is not a directory")
            stack.append((self._open_dir_at(cur, name, path), name))
        return Resolved(stack[-1][0], None, True, self._rel(stack, None))

    def _components(self, path: str, shown: str) -> list[str]:
        """The components of a path (an absolute one only under the root, made relative to it)."""
        if os.path.isabs(path):
            if path != self.root and not path.startswith(self.root + os.sep):
                raise SandboxError(f"{shown} is outside the sandbox: use a path inside it (relative to its root)")
            path = os.path.relpath(path, self.root)
        return [c for c in path.split("/") if c not in ("", ".")]

    @staticmethod
    def _rel(stack, name: str | None) -> str:
        return "/".join([n for _, n in stack[1:]] + ([name] if name else []))

    @staticmethod
    def _open_dir_at(dir_fd: int, name: str, shown: str) -> int:
        try:
            return os.open(name, DIR_FLAGS, dir_fd=dir_fd)
        except OSError as e:
            raise SandboxError(f"{shown}: {_changed(e)}") from None

    # ---- checks ---------------------------------------------------------------------------------
    def check_writable(self, r: Resolved, holds: bool = False) -> None:
        """Refuse a change at `r` when it is read-only or under a read-only path (or, with `holds`, a directory
        holding one: a move or delete of it would change them)."""
        for ro in self.readonly:
            if _under(r.rel, ro) or (holds and _under(ro, r.rel)):
                raise SandboxError(f"{r.display} is read-only: write elsewhere in the sandbox")

    def check_file_name(self, r: Resolved) -> None:
        if self.allowed_extensions is not None and os.path.splitext(r.name or "")[1].lower() not in (
            self.allowed_extensions
        ):
            allowed = ", ".join(sorted(self.allowed_extensions))
            raise SandboxError(f"{r.display}: files of this extension are not allowed (allowed: {allowed})")

    # ---- opening --------------------------------------------------------------------------------
    def open_file(self, path: str, mode: str = "r", any_size: bool = False) -> tuple[int, Resolved]:
        """A descriptor of the regular file at `path` for reading ('r'), or for writing from empty ('w') or at
        its end ('a'), created if missing; the caller closes it. Checked: inside the root, one hard link, the
        extension, read-only paths for writes, the size limit for reads (unless `any_size`: the caller reads a
        bounded part)."""
        with self.resolve(path) as r:
            if r.name is None:
                raise SandboxError(f"{r.display} is a directory, not a file")
            self.check_file_name(r)
            if mode != "r":
                self.check_writable(r)
            if not r.exists and mode == "r":
                raise SandboxError(f"{r.display}: no such file")
            flags = os.O_NOFOLLOW | os.O_CLOEXEC | (os.O_RDONLY if mode == "r" else os.O_WRONLY | os.O_CREAT)
            try:
                fd = os.open(r.name, flags, 0o644, dir_fd=r.dir_fd)
            except OSError as e:
                raise SandboxError(f"{r.display}: {_changed(e)}") from None
            try:
                st = os.fstat(fd)
                if not stat.S_ISREG(st.st_mode):
                    raise SandboxError(f"{r.display} is not a regular file")
                if st.st_nlink > 1:
                    raise SandboxError(f"{r.display} has other hard links, which may lie outside the sandbox: refused")
                if mode == "r" and not any_size and st.st_size > self.max_file_size:
                    raise SandboxError(
                        f"{r.display} has {st.st_size} bytes, over the {self.max_file_size}-byte limit: read part of "
                        "it with head or tail"
                    )
                if mode == "w":
                    os.ftruncate(fd, 0)
                return fd, r
            except BaseException:
                os.close(fd)
                raise

    @contextlib.contextmanager
    def open_dir(self, path: str) -> Iterator[tuple[int, Resolved]]:
        """A descriptor of the directory at `path` (closed on leaving)."""
        with self.resolve(path) as r:
            if r.name is None:
                yield r.dir_fd, r
                return
            if not r.exists:
                raise SandboxError(f"{r.display}: no such directory")
            fd = self._open_dir_at(r.dir_fd, r.name, r.display)
            try:
                yield fd, r
            finally:
                os.close(fd)


def _under(path: str, prefix: str) -> bool:
    """Whether the root-relative `path` is `prefix` or beneath it ('' is the root)."""
    return prefix == "" or path == prefix or path.startswith(prefix + "/")


def _changed(e: OSError) -> str:
    if e.errno == errno.ELOOP:
        return "it was replaced by a symbolic link while being opened: refused"
    if e.errno == errno.ENOTDIR:
        return "not a directory"
    return os.strerror(e.errno) if e.errno else str(e)

"""Where a batch job's records go, one flushed line each; and, to resume, which requests an earlier run of the
job already answered.

A job killed part way (even with SIGKILL) leaves whole lines and at most one cut short at the end: resuming
drops that one (its request runs again) and appends after the rest.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

from jaxllm.batch.lines import key_of
from jaxllm.errors import InvalidRequestError


@dataclasses.dataclass
class Answered:
    """What earlier runs wrote: the ids of requests that ran, and the input lines that got error records."""

    keys: set[str] = dataclasses.field(default_factory=set)  # `key_of` ids
    lines: set[int] = dataclasses.field(default_factory=set)

    def add(self, record, where: str) -> None:
        if not isinstance(record, dict) or not ({"id", "custom_id"} & set(record)):
            raise InvalidRequestError(f"{where} is not a record of a batch job: give --output a file of its own")
        error = record.get("error")
        if isinstance(error, dict) and isinstance(error.get("line"), int):
            self.lines.add(error["line"])
        else:
            self.keys.add(key_of(record["custom_id"] if "custom_id" in record else record["id"]))


def scan(path: str | None, answered: Answered) -> None:
    """Add what `path` (an output or errors file; missing: nothing yet) holds to `answered`, cutting off a last
    line that a kill left unfinished."""
    if path is None or not Path(path).exists():
        return
    good_end = 0  # bytes of whole, valid lines
    with open(path, "rb+") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                record = json.loads(raw) if raw.endswith(b"\n") else None
            except (json.JSONDecodeError, UnicodeDecodeError):
                record = None
            if record is None:
                if f.read(1):
                    raise InvalidRequestError(
                        f"{path} line {lineno} is not JSON: this is not a batch job's output; give another file"
                    )
                f.truncate(good_end)
                return
            answered.add(record, f"{path} line {lineno}")
            good_end += len(raw)


def check_writable(path: str) -> None:
    """Refuse a path that cannot be written (before the model loads): a missing folder, a folder."""
    p = Path(path)
    if p.is_dir():
        raise InvalidRequestError(f"cannot write {path}: it is a folder, give a file")
    if not p.resolve().parent.is_dir():
        raise InvalidRequestError(f"cannot write {path}: its folder does not exist")


class Writer:
    """Writes records as JSON lines, each flushed as it comes: results to `output` (stdout when None), error
    records to `errors` when given (else to `output` too). append: continue the files (resuming)."""

    def __init__(self, output: str | None, errors: str | None = None, append: bool = False):
        self._files = []
        try:
            self.out = sys.stdout if output is None else self._open(output, append)
            self.err = self.out if errors is None else self._open(errors, append)
        except OSError as e:
            self.close()
            raise InvalidRequestError(f"cannot write {e.filename}: {e.strerror}") from None

    def _open(self, path: str, append: bool):
        f = open(path, "a" if append else "w", encoding="utf-8")  # noqa: SIM115 - closed by close()
        self._files.append(f)
        return f

    def write(self, record: dict, ok: bool = True) -> None:
        f = self.out if ok else self.err
        f.write(json.dumps(record, ensure_ascii=False) + "\n")
        f.flush()

    def close(self) -> None:
        for f in self._files:
            f.close()
        self._files = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

"""Stored responses (`store: true`) in SQLite: the response object as returned, and the conversation it ends
(the chat messages a `previous_response_id` continues from). One file survives restarts (`--responses-db`);
without one the store lives in memory for the server's lifetime."""

from __future__ import annotations

import json
import sqlite3
import threading
import time

from jaxllm.errors import InvalidRequestError


class ResponseStore:
    """Responses by id. Safe to use from any thread (one connection behind a lock; each call is a single small
    statement)."""

    def __init__(self, path: str | None = None):
        self.path = path or ":memory:"
        self._lock = threading.Lock()
        try:
            self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS responses ("
                "id TEXT PRIMARY KEY, created_at REAL NOT NULL, response TEXT NOT NULL, messages TEXT NOT NULL)"
            )
        except sqlite3.Error as e:
            raise InvalidRequestError(
                f"cannot use {self.path} as the responses database ({e}): give a writable SQLite file path"
            ) from None

    def put(self, response: dict, messages: list[dict]) -> None:
        """Keep `response` (an OpenAI response object) and the whole conversation through its output."""
        row = (response["id"], time.time(), json.dumps(response), json.dumps(messages))
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO responses VALUES (?, ?, ?, ?)", row)

    def get(self, response_id: str) -> dict | None:
        """The stored response object, or None."""
        row = self._row("response", response_id)
        return None if row is None else json.loads(row)

    def messages(self, response_id: str) -> list[dict] | None:
        """The conversation a response ends, or None when no such response is stored."""
        row = self._row("messages", response_id)
        return None if row is None else json.loads(row)

    def delete(self, response_id: str) -> bool:
        with self._lock:
            return self._db.execute("DELETE FROM responses WHERE id = ?", (response_id,)).rowcount > 0

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _row(self, column: str, response_id: str):
        with self._lock:
            row = self._db.execute(f"SELECT {column} FROM responses WHERE id = ?", (response_id,)).fetchone()
        return None if row is None else row[0]

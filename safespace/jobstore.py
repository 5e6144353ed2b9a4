"""Durable job records: one SQLite file under the job manager's root, so a restarted server finds
every job a visitor submitted.

A record holds what the page lists (id, visitor, kind, title, state, times, message, error, result,
meta) and, for a job that can run again, its call: the name of a registered job function and its
arguments as JSON. The manager keeps working from memory; this file is written on every change of
state and read once, at start.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import sqlite3
import threading
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

FILE = "jobs.sqlite3"      # under the manager's root, with SQLite's -wal and -shm companions
SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT UNIQUE NOT NULL,
    visitor TEXT NOT NULL,
    kind TEXT NOT NULL,
    title TEXT NOT NULL,
    state TEXT NOT NULL,
    submitted REAL NOT NULL,
    queued REAL NOT NULL,
    started REAL,
    finished REAL,
    progress REAL NOT NULL DEFAULT 0,
    message TEXT NOT NULL DEFAULT '',
    error TEXT,
    result TEXT,
    meta TEXT NOT NULL DEFAULT '{}',
    call TEXT
);
CREATE INDEX IF NOT EXISTS jobs_visitor ON jobs (visitor);
"""
FIELDS = ("state", "queued", "started", "finished", "progress", "message", "error", "result", "meta")


def _plain(value):
    """JSON for dataclasses (settings): their dict form; anything else is not a plain argument."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return value.to_dict() if hasattr(value, "to_dict") else dataclasses.asdict(value)
    raise TypeError(f"{type(value).__name__} is not JSON-able")


def encode_call(name: str, args: tuple, kwargs: dict) -> str | None:
    """The call as JSON text, or None when an argument has no plain form (the job stays memory-only)."""
    try:
        return json.dumps({"fn": name, "args": list(args), "kwargs": kwargs}, default=_plain)
    except (TypeError, ValueError):
        return None


def to_json(value: Any) -> str | None:
    """A result or meta as JSON text; None when it has no plain form."""
    try:
        return json.dumps(value, default=_plain)
    except (TypeError, ValueError):
        return None


class JobStore:
    """The records file (WAL mode, one connection shared under a lock: writes are small and few)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(self.path), timeout=30, check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(SCHEMA)

    def add(self, record: dict) -> None:
        columns = ", ".join(record)
        marks = ", ".join("?" for _ in record)
        with self._lock:
            self._db.execute(f"INSERT OR REPLACE INTO jobs ({columns}) VALUES ({marks})", tuple(record.values()))

    def update(self, job_id: str, **values) -> None:
        unknown = set(values) - set(FIELDS)
        if unknown:
            raise ValueError(f"unknown job record field(s): {', '.join(sorted(unknown))}")
        if not values:
            return
        sets = ", ".join(f"{k} = ?" for k in values)
        with self._lock:
            self._db.execute(f"UPDATE jobs SET {sets} WHERE id = ?", (*values.values(), job_id))

    def load(self) -> list[dict]:
        """Every record in submission order."""
        with self._lock:
            rows = self._db.execute("SELECT * FROM jobs ORDER BY seq").fetchall()
        return [dict(row) for row in rows]

    def delete(self, job_ids: list[str]) -> None:
        with self._lock:
            self._db.executemany("DELETE FROM jobs WHERE id = ?", [(i,) for i in job_ids])

    def delete_visitor(self, visitor: str) -> None:
        with self._lock:
            self._db.execute("DELETE FROM jobs WHERE visitor = ?", (visitor,))

    def close(self) -> None:
        with self._lock:
            try:
                self._db.close()
            except sqlite3.Error:
                log.exception("closing the job records failed")

"""The job store: one SQLite database, so a restart keeps every finished job."""
from __future__ import annotations

import json
import re
import sqlite3
import threading
import time
import uuid
from typing import Any

ID_RE = re.compile(r"^video_[0-9a-f]{32}$")
INTERRUPTED = "interrupted: the server stopped before this job finished"


def new_id() -> str:
    return f"video_{uuid.uuid4().hex}"


class JobStore:
    def __init__(self, path: str):
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS jobs (id TEXT PRIMARY KEY, seq INTEGER, created_at INTEGER, status TEXT,"
            " progress INTEGER, request TEXT, error TEXT, completed_at INTEGER, perf TEXT)")
        with self._lock:  # nothing silently lost: what was queued or running at a crash is failed, with a reason
            self._db.execute("UPDATE jobs SET status='failed', error=? WHERE status IN ('queued','in_progress')",
                             (INTERRUPTED,))

    def add(self, job_id: str, request: dict[str, Any]) -> None:
        with self._lock:
            seq = self._db.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM jobs").fetchone()[0]
            self._db.execute("INSERT INTO jobs VALUES (?,?,?,?,?,?,?,?,?)",
                             (job_id, seq, int(time.time()), "queued", 0, json.dumps(request), None, None, None))

    def update(self, job_id: str, **fields: Any) -> None:
        if "perf" in fields and fields["perf"] is not None:
            fields["perf"] = json.dumps(fields["perf"])
        cols = ", ".join(f"{k}=?" for k in fields)
        with self._lock:
            self._db.execute(f"UPDATE jobs SET {cols} WHERE id=?", (*fields.values(), job_id))

    def get(self, job_id: str) -> dict[str, Any] | None:
        with self._lock:
            cur = self._db.execute("SELECT * FROM jobs WHERE id=?", (job_id,))
            row = cur.fetchone()
            names = [c[0] for c in cur.description]
        return self._row(names, row) if row else None

    def list(self, after: str | None, limit: int, order: str) -> list[dict[str, Any]]:
        op, direction = (">", "ASC") if order == "asc" else ("<", "DESC")
        with self._lock:
            where, params = "", ()
            if after is not None:
                r = self._db.execute("SELECT seq FROM jobs WHERE id=?", (after,)).fetchone()
                if r is not None:
                    where, params = f"WHERE seq {op} ?", (r[0],)
            cur = self._db.execute(f"SELECT * FROM jobs {where} ORDER BY seq {direction} LIMIT ?", (*params, limit))
            rows = cur.fetchall()
            names = [c[0] for c in cur.description]
        return [self._row(names, r) for r in rows]

    def delete(self, job_id: str) -> None:
        with self._lock:
            self._db.execute("DELETE FROM jobs WHERE id=?", (job_id,))

    @staticmethod
    def _row(names, row) -> dict[str, Any]:
        d = dict(zip(names, row))
        d["request"] = json.loads(d["request"])
        d["perf"] = json.loads(d["perf"]) if d["perf"] else None
        return d

    def close(self) -> None:
        with self._lock:
            self._db.close()

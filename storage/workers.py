"""Worker processes: one row per process start, with its heartbeat.

The id is the tasks' ``lease_owner``. Rows tell an operator who works on the queue, on which host
and stages, and when each last showed signs of life; they let a worker recover the tasks of a
dead worker in its own PID namespace at once (see :mod:`pipeline.workerid`). Everyone else's
tasks come back by lease expiry alone. A worker that stops cleanly records ``stopped_at``.
"""
from __future__ import annotations

from typing import Any, Iterable

import sqlite_utils

from .db import transaction


def register(db: sqlite_utils.Database, *, id: str, hostname: str, pid: int,
             pid_ns: str | None, proc_start: int | None, stages: Iterable[str],
             now: float) -> None:
    with transaction(db, concurrent=True) as conn:
        conn.execute(
            "INSERT INTO workers (id, hostname, pid, pid_ns, proc_start, stages, started_at,"
            " heartbeat_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            [id, hostname, pid, pid_ns, proc_start, ",".join(sorted(stages)), now, now])


def heartbeat(db: sqlite_utils.Database, worker_id: str, *, now: float) -> None:
    with transaction(db, concurrent=True) as conn:
        conn.execute("UPDATE workers SET heartbeat_at = ? WHERE id = ?", [now, worker_id])


def stopped(db: sqlite_utils.Database, worker_id: str, *, now: float) -> None:
    with transaction(db, concurrent=True) as conn:
        conn.execute("UPDATE workers SET stopped_at = ?, heartbeat_at = ? WHERE id = ?",
                     [now, now, worker_id])


def get(db: sqlite_utils.Database, worker_ids: Iterable[str]) -> dict[str, dict[str, Any]]:
    ids = list(worker_ids)
    if not ids:
        return {}
    marks = ",".join("?" * len(ids))
    return {r["id"]: r for r in db.query(f"SELECT * FROM workers WHERE id IN ({marks})", ids)}


def live(db: sqlite_utils.Database, *, now: float, within: float) -> list[dict[str, Any]]:
    """Workers not stopped whose heartbeat is at most ``within`` seconds old."""
    return list(db.query("SELECT * FROM workers WHERE stopped_at IS NULL AND heartbeat_at >= ?"
                         " ORDER BY started_at", [now - within]))


def prune(db: sqlite_utils.Database, *, now: float, keep_days: float = 7.0) -> int:
    """Forget workers silent for ``keep_days`` that hold no running task (a worker starting
    calls this: one row per process start would otherwise pile up)."""
    with transaction(db) as conn:
        return conn.execute(
            "DELETE FROM workers WHERE heartbeat_at < ? AND id NOT IN (SELECT lease_owner FROM"
            " tasks WHERE status = 'running' AND lease_owner IS NOT NULL)",
            [now - keep_days * 86400]).rowcount

"""Learned run times per workflow (``run_times`` table), so a new process starts warm.

Only the last ``keep`` rows of each workflow are kept: :func:`record` deletes older ones in the
same transaction, so the table stays small however many runs go through.
"""
from __future__ import annotations

import sqlite_utils

from .db import transaction


#: Run times older than this are not loaded: a workflow edited since may run quite differently.
MAX_AGE = 14 * 86400.0


def load(db: sqlite_utils.Database, workflow_id: str, *, limit: int,
         since: float | None = None) -> list[float]:
    """The last ``limit`` run times of ``workflow_id``, oldest first; with ``since``, only runs
    that ended at or after it (pass ``now - MAX_AGE``)."""
    rows = db.execute("SELECT seconds FROM run_times WHERE workflow_id = ?"
                      " AND (? IS NULL OR ended_at >= ?) ORDER BY id DESC LIMIT ?",
                      [workflow_id, since, since, limit]).fetchall()
    return [r[0] for r in reversed(rows)]


def record(db: sqlite_utils.Database, workflow_id: str, seconds: float, *, now: float,
           keep: int, execute_id: str | None = None) -> None:
    """Store one run time and drop the ones older than the last ``keep`` of that workflow."""
    with transaction(db, concurrent=True, key=f"run_times:{workflow_id}") as conn:
        conn.execute("INSERT INTO run_times (workflow_id, seconds, execute_id, ended_at)"
                     " VALUES (?, ?, ?, ?)", [workflow_id, float(seconds), execute_id, now])
        conn.execute("DELETE FROM run_times WHERE workflow_id = ? AND id <= (SELECT id FROM"
                     " run_times WHERE workflow_id = ? ORDER BY id DESC LIMIT 1 OFFSET ?)",
                     [workflow_id, workflow_id, keep])

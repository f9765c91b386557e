"""Aggregates that ``/metrics`` reads: task counts and attempt totals over id ranges.

``attempts`` is append-only with an integer primary key, so a scrape reads only the rows
added since the last one (``lo < id <= hi``).
"""
from __future__ import annotations

from typing import Iterable

import sqlite_utils


def last_attempt_id(db: sqlite_utils.Database) -> int:
    """The highest ``attempts.id`` (0 when the table is empty)."""
    return db.execute("SELECT MAX(id) FROM attempts").fetchone()[0] or 0


def attempts_by_class(db: sqlite_utils.Database, lo: int, hi: int) -> list[tuple[str, int]]:
    """``(error_class or 'none', count)`` of attempts with ``lo < id <= hi``."""
    return list(db.execute("SELECT COALESCE(error_class, 'none') AS ec, COUNT(*) FROM"
                           " attempts WHERE id > ? AND id <= ? GROUP BY ec", [lo, hi]))


def stage_durations(db: sqlite_utils.Database, lo: int, hi: int,
                    buckets: Iterable[float]) -> list[tuple]:
    """Per stage, successful attempts with ``lo < id <= hi``: the row ``(stage, n <= b for each
    bucket b..., sum of durations, count)``."""
    sums = ", ".join(f"SUM(d <= {float(le)!r})" for le in buckets)
    return list(db.execute(
        f"SELECT stage, {sums}, SUM(d), COUNT(*) FROM (SELECT stage, ended_at - started_at"
        f" AS d FROM attempts WHERE id > ? AND id <= ? AND outcome = 'success'"
        f" AND ended_at IS NOT NULL) AS done GROUP BY stage", [lo, hi]))


def task_counts(db: sqlite_utils.Database) -> dict[str, int]:
    """``{status: count}`` over every task (statuses with no task are absent)."""
    return dict(db.execute("SELECT status, COUNT(*) FROM tasks GROUP BY status"))

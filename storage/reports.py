"""The daily report's aggregate queries over ``tasks`` and ``attempts``.

Every function reads one half-open time range ``[start, end)`` (Unix seconds); the report's
definitions live in :mod:`bot.alerting.report`.
"""
from __future__ import annotations

import re

import sqlite_utils

_STAGE = re.compile(r"^[a-z][a-z0-9_]*$")


def _of(pipelines) -> tuple[str, list[str]]:
    """SQL restricting ``tasks`` or ``attempts`` rows to batches of ``pipelines`` (None: all)."""
    if pipelines is None:
        return "", []
    names = list(pipelines)
    return (f" AND batch_id IN (SELECT id FROM batches WHERE pipeline IN"
            f" ({','.join('?' * len(names)) or 'NULL'}))", names)


def finished_tasks(db: sqlite_utils.Database, start: float,
                   end: float, pipelines=None) -> list[tuple[str, float]]:
    """``(status, finished_at)`` of tasks that ended (succeeded, failed, ignored, cancelled)
    in the range."""
    return list(db.execute(
        "SELECT status, finished_at FROM tasks WHERE finished_at >= ? AND finished_at < ?"
        " AND status IN ('succeeded', 'failed', 'ignored', 'cancelled')" + _of(pipelines)[0],
        [start, end, *_of(pipelines)[1]]))


def failed_attempts(db: sqlite_utils.Database, start: float,
                    end: float, pipelines=None) -> list[tuple[str, str]]:
    """``(node or error class or 'unknown', error class or 'unknown')`` of every attempt that
    started in the range with an outcome other than success."""
    return [(r[0], r[1]) for r in db.execute(
        "SELECT COALESCE(node, error_class, 'unknown'), COALESCE(error_class, 'unknown')"
        " FROM attempts WHERE started_at >= ? AND started_at < ? AND outcome != 'success'"
        + _of(pipelines)[0], [start, end, *_of(pipelines)[1]])]


def retry_count(db: sqlite_utils.Database, start: float, end: float, pipelines=None) -> int:
    """Attempts that started in the range with outcome ``retry`` or ``resubmit``."""
    return db.execute(
        "SELECT COUNT(*) FROM attempts WHERE started_at >= ? AND started_at < ?"
        " AND outcome IN ('retry', 'resubmit')" + _of(pipelines)[0],
        [start, end, *_of(pipelines)[1]]).fetchone()[0]


def seconds_by_stage(db: sqlite_utils.Database, start: float,
                     end: float, pipelines=None) -> list[tuple[str, float | None]]:
    """``(stage, seconds)``: time spent in attempts that ended in the range, per stage (every
    outcome; a negative duration counts as 0)."""
    return db.execute(
        "SELECT stage, SUM(MAX(0, ended_at - started_at)) FROM attempts WHERE ended_at >= ?"
        " AND ended_at < ? AND ended_at IS NOT NULL" + _of(pipelines)[0] + " GROUP BY stage",
        [start, end, *_of(pipelines)[1]]).fetchall()


def gate_counts(db: sqlite_utils.Database, start: float, end: float, pipelines=None) -> tuple[int, int]:
    """``(resubmits, failed)``: quality-gate attempts started in the range by outcome."""
    row = db.execute(
        "SELECT COALESCE(SUM(outcome = 'resubmit'), 0), COALESCE(SUM(outcome = 'fail'), 0)"
        " FROM attempts WHERE stage = 'gate' AND started_at >= ? AND started_at < ?"
        + _of(pipelines)[0], [start, end, *_of(pipelines)[1]]).fetchone()
    return row[0], row[1]


def success_durations(db: sqlite_utils.Database, stage: str, start: float,
                      end: float, pipelines=None) -> list[float]:
    """Durations of successful attempts of ``stage`` that ended in the range."""
    return [r[0] for r in db.execute(
        "SELECT ended_at - started_at FROM attempts WHERE stage = ? AND outcome = 'success'"
        " AND ended_at >= ? AND ended_at < ? AND ended_at IS NOT NULL" + _of(pipelines)[0],
        [stage, start, end, *_of(pipelines)[1]])]


def task_stage_seconds(db: sqlite_utils.Database, stage: str, start: float,
                       end: float, pipelines=None) -> list[float]:
    """The ``tasks.<stage>_seconds`` values of tasks finished in the range (not null).
    Raises ValueError for a stage name that is not a plain identifier."""
    if not _STAGE.match(stage):
        raise ValueError(f"not a stage name: {stage!r}")
    column = f"{stage}_seconds"
    return [r[0] for r in db.execute(
        f"SELECT {column} FROM tasks WHERE finished_at >= ? AND finished_at < ?"
        f" AND {column} IS NOT NULL" + _of(pipelines)[0], [start, end, *_of(pipelines)[1]])]

"""Circuit-breaker rows (``breakers`` table), one per service.

The breaker logic lives in :mod:`pipeline.breaker`; these functions only read and write rows.
A row is returned as the tuple ``(service, state, failures, successes, opened_at, reason,
submit_failures)``.
"""
from __future__ import annotations

from typing import Any

import sqlite_utils

from .db import transaction


def get(db: sqlite_utils.Database, service: str) -> tuple | None:
    """The row of ``service``, or None when it has never been written."""
    return db.execute(
        "SELECT service, state, failures, successes, opened_at, reason, submit_failures"
        " FROM breakers WHERE service = ?", [service]).fetchone()


def put(db: sqlite_utils.Database, *, service: str, state: str, failures: int, successes: int,
        opened_at: float | None, reason: str | None, submit_failures: int, now: float) -> None:
    """Insert or overwrite the row of ``service`` in one transaction."""
    with transaction(db, concurrent=True, key=f"breaker:{service}") as conn:
        put_in(conn, service=service, state=state, failures=failures, successes=successes,
               opened_at=opened_at, reason=reason, submit_failures=submit_failures, now=now)


def put_in(conn: Any, *, service: str, state: str, failures: int, successes: int,
           opened_at: float | None, reason: str | None, submit_failures: int,
           now: float) -> None:
    """As :func:`put`, inside the caller's transaction (read-then-write in one lock)."""
    conn.execute(
        "INSERT INTO breakers (service, state, failures, successes, opened_at, reason,"
        " updated_at, submit_failures) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
        " ON CONFLICT(service) DO UPDATE SET"
        " state = excluded.state, failures = excluded.failures,"
        " successes = excluded.successes, opened_at = excluded.opened_at,"
        " reason = excluded.reason, updated_at = excluded.updated_at,"
        " submit_failures = excluded.submit_failures",
        [service, state, failures, successes, opened_at, reason, now, submit_failures])


def close_all(db: sqlite_utils.Database, now: float,
              services: list[str] | tuple[str, ...] | None = None) -> int:
    """Close every breaker (of ``services``, if given) that is not closed; returns how many
    rows changed."""
    only, args = "", []
    if services is not None:
        only = f" AND service IN ({','.join('?' * len(services)) or 'NULL'})"
        args = list(services)
    with transaction(db) as conn:
        cur = conn.execute("UPDATE breakers SET state = 'closed', failures = 0, successes = 0,"
                           " submit_failures = 0, opened_at = NULL, reason = NULL,"
                           f" updated_at = ? WHERE state != 'closed'{only}",
                           [now, *args])
        return cur.rowcount


def all_rows(db: sqlite_utils.Database) -> list[tuple]:
    """Every row, ordered by service."""
    return list(db.execute(
        "SELECT service, state, failures, successes, opened_at, reason, submit_failures"
        " FROM breakers ORDER BY service"))


def summaries(db: sqlite_utils.Database) -> list[dict[str, Any]]:
    """``{service, state, reason}`` of every breaker, ordered by service (the chat's status)."""
    return list(db.query("SELECT service, state, reason FROM breakers ORDER BY service"))


def not_closed(db: sqlite_utils.Database) -> list[str]:
    """Services whose breaker is open or half open, in order."""
    return [r[0] for r in db.execute(
        "SELECT service FROM breakers WHERE state != 'closed' ORDER BY service")]


def states(db: sqlite_utils.Database) -> list[tuple[str, str]]:
    """``(service, state)`` of every breaker, ordered by service."""
    return list(db.execute("SELECT service, state FROM breakers ORDER BY service"))

"""Alert rows (``alerts`` table) and silences (``silences`` table).

The alert policy (grouping, tiers, holding, cards) lives in :mod:`bot.alerting.router`; these functions
only read and write rows. An alert is a dict of the table's columns with ``details`` parsed
from JSON. Functions named ``..._in`` take the caller's connection and must run inside the
caller's transaction (``with transaction(db) as conn``).
"""
from __future__ import annotations

import json
from typing import Any

import sqlite_utils

from .db import transaction


def _row_to_alert(cols: list[str], row: tuple) -> dict[str, Any]:
    alert = dict(zip(cols, row))
    alert["details"] = json.loads(alert.get("details") or "{}")
    return alert


def get(db: sqlite_utils.Database, key: str) -> dict[str, Any] | None:
    """The alert row for ``key`` with ``details`` parsed, or None."""
    cur = db.execute("SELECT * FROM alerts WHERE key = ?", [key])
    row = cur.fetchone()
    return _row_to_alert([d[0] for d in cur.description], row) if row else None


def get_in(conn, key: str) -> dict[str, Any] | None:
    """As :func:`get`, on the caller's connection (inside its transaction)."""
    cur = conn.execute("SELECT * FROM alerts WHERE key = ?", [key])
    row = cur.fetchone()
    return _row_to_alert([d[0] for d in cur.description], row) if row else None


def save_in(conn, alert: dict[str, Any]) -> None:
    """Insert or overwrite the row ``alert["key"]`` on the caller's connection."""
    conn.execute(
        "INSERT INTO alerts (key, tier, status, count, first_at, last_at, resolved_at,"
        " message_uuid, batch_id, task_id, details) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
        " ON CONFLICT(key) DO UPDATE SET tier = excluded.tier, status = excluded.status,"
        " count = excluded.count, first_at = excluded.first_at, last_at = excluded.last_at,"
        " resolved_at = excluded.resolved_at, message_uuid = excluded.message_uuid,"
        " batch_id = excluded.batch_id, task_id = excluded.task_id, details = excluded.details",
        [alert["key"], alert["tier"], alert["status"], alert["count"], alert["first_at"],
         alert["last_at"], alert.get("resolved_at"), alert.get("message_uuid"),
         alert.get("batch_id"), alert.get("task_id"),
         json.dumps(alert["details"], ensure_ascii=False)])


def save(db: sqlite_utils.Database, alert: dict[str, Any]) -> None:
    """Insert or overwrite the row ``alert["key"]`` in one transaction."""
    with transaction(db) as conn:
        save_in(conn, alert)


def held_by_in(conn, key: str) -> dict[str, dict[str, Any]]:
    """Open, unsent alerts whose ``details.held_by`` is ``key``:
    ``{alert_key: {"count", "tier"}}`` in first-seen order (caller's connection)."""
    rows = conn.execute(
        "SELECT key, count, tier FROM alerts WHERE status = 'open' AND message_uuid IS NULL"
        " AND json_extract(details, '$.held_by') = ? ORDER BY first_at, key", [key]).fetchall()
    return {r[0]: {"count": r[1], "tier": r[2]} for r in rows}


def open_rows(db: sqlite_utils.Database, *, batch_id: str | None = None) -> list[dict[str, Any]]:
    """Every open alert (of ``batch_id`` when given), details parsed, in table order."""
    sql, args = "SELECT * FROM alerts WHERE status = 'open'", []
    if batch_id is not None:
        sql += " AND batch_id = ?"
        args.append(batch_id)
    cur = db.execute(sql, args)
    cols = [d[0] for d in cur.description]
    return [_row_to_alert(cols, r) for r in cur.fetchall()]


def status_and_batch(db: sqlite_utils.Database, key: str) -> tuple[str, str | None] | None:
    """``(status, batch_id)`` of the alert ``key``, or None when there is none."""
    return db.execute("SELECT status, batch_id FROM alerts WHERE key = ?",
                      [key]).fetchone()


def counts(db: sqlite_utils.Database) -> list[tuple[str, str, int]]:
    """``(tier, status, count)`` over every alert row, ordered by tier and status."""
    return list(db.execute("SELECT tier, status, COUNT(*) FROM alerts"
                           " GROUP BY tier, status ORDER BY tier, status"))


# -- silences -----------------------------------------------------------------------------------


def active_silences(db: sqlite_utils.Database, now: float) -> list[tuple[str, float]]:
    """``(key, until)`` of every silence still in force at ``now``."""
    return list(db.execute("SELECT key, until FROM silences WHERE until > ?", [now]))


def put_silence(db: sqlite_utils.Database, key: str, until: float, *, by: str | None,
                now: float) -> None:
    """Silence ``key`` until ``until`` (insert or overwrite) in one transaction."""
    with transaction(db) as conn:
        conn.execute("INSERT INTO silences (key, until, created_by, created_at) VALUES (?, ?, ?, ?)"
                     " ON CONFLICT(key) DO UPDATE SET until = excluded.until,"
                     " created_by = excluded.created_by, created_at = excluded.created_at",
                     [key, until, by, now])

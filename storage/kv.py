"""Small named values in the ``kv`` table (the last report date, the bot's identity, ...).

Values are text; callers that keep structure store JSON. ``put`` overwrites.
"""
from __future__ import annotations

import json
from typing import Any

import sqlite_utils

from .db import transaction


def get(db: sqlite_utils.Database | Any, key: str) -> str | None:
    """The value stored under ``key``, or None. ``db`` may also be the connection of an open
    :func:`~storage.db.transaction` (read inside it)."""
    row = db.execute("SELECT value FROM kv WHERE key = ?", [key]).fetchone()
    return None if row is None else str(row[0])


def put(db: sqlite_utils.Database, key: str, value: str, *, now: float) -> None:
    """Store ``value`` under ``key`` (insert or overwrite) in one transaction."""
    with transaction(db, concurrent=True) as conn:
        put_in(conn, key, value, now=now)


def put_many(db: sqlite_utils.Database, items: dict[str, str], *, now: float) -> None:
    """Store every ``key: value`` of ``items`` (insert or overwrite) in one transaction."""
    with transaction(db) as conn:
        for key, value in items.items():
            put_in(conn, key, value, now=now)


def get_in(conn, key: str) -> str | None:
    """As :func:`get`, on the caller's connection (inside its transaction)."""
    row = conn.execute("SELECT value FROM kv WHERE key = ?", [key]).fetchone()
    return None if row is None else str(row[0])


def put_in(conn, key: str, value: str, *, now: float) -> None:
    """As :func:`put`, on the caller's connection: it runs inside the caller's transaction."""
    conn.execute("INSERT INTO kv (key, value, updated_at) VALUES (?, ?, ?)"
                 " ON CONFLICT(key) DO UPDATE SET value = excluded.value,"
                 " updated_at = excluded.updated_at", [key, value, now])


def get_json(db: sqlite_utils.Database, key: str) -> Any:
    """The JSON value under ``key``; None when absent or not valid JSON."""
    raw = get(db, key)
    if raw is None:
        return None
    try:
        return json.loads(raw)
    except ValueError:
        return None


def put_json(db: sqlite_utils.Database, key: str, value: Any, *, now: float) -> None:
    put(db, key, json.dumps(value, ensure_ascii=False, sort_keys=True), now=now)

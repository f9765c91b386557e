"""The inbox: Feishu events the webhook accepted, deduplicated durably.

``record`` inserts with the dedup key as primary key: the first delivery wins, any redelivery
(same message_id, even under a new event_id) is a no-op, across restarts and across processes.
A handler then claims the row with a lease, so exactly one process acts on it.
"""
from __future__ import annotations

import json
from typing import Any

import sqlite_utils

from .db import is_postgres, transaction


def record(db: sqlite_utils.Database, key: str, *, event_type: str, payload: dict[str, Any],
           now: float, event_id: str | None = None) -> bool:
    """Store an event; return True when it is new, False for a duplicate.

    One statement on both backends (``ON CONFLICT DO NOTHING``): of concurrent deliveries of
    one key, PostgreSQL lets the first insert win and the others wait for it, then do nothing."""
    with transaction(db, concurrent=True) as conn:
        cur = conn.execute(
            "INSERT INTO inbox (key, event_id, event_type, payload, received_at)"
            " VALUES (?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
            [key, event_id, event_type, json.dumps(payload, ensure_ascii=False), now])
        return cur.rowcount == 1


def claim(db: sqlite_utils.Database, *, owner: str, now: float, lease: float = 60.0,
          key: str | None = None, limit: int = 10) -> list[dict[str, Any]]:
    """Claim new events (one by ``key``, or the oldest due ones) for ``owner``.

    PostgreSQL: one statement whose scan skips the rows another claimer has locked
    (``FOR UPDATE SKIP LOCKED``), so concurrent claimers take disjoint rows without waiting.
    SQLite: read the due keys, then take them (its one writer makes that atomic)."""
    one = " AND key = ?" if key is not None else ""
    due = ("SELECT key FROM inbox WHERE status = 'new' AND (lease_until IS NULL OR lease_until < ?)"
           f"{one} ORDER BY received_at, key LIMIT ?")
    due_args = [now, *([key] if key is not None else []), limit]
    with transaction(db, concurrent=True) as conn:
        if is_postgres(db):
            cur = conn.execute(
                f"WITH due AS MATERIALIZED ({due} FOR UPDATE SKIP LOCKED)"
                " UPDATE inbox SET lease_owner = ?, lease_until = ?, attempts = attempts + 1"
                " FROM due WHERE inbox.key = due.key RETURNING inbox.*",
                [*due_args, owner, now + lease])
            cols = [d[0] for d in cur.description]
            rows = sorted((dict(zip(cols, r)) for r in cur.fetchall()),
                          key=lambda r: (r["received_at"], r["key"]))
        else:
            ids = [r[0] for r in conn.execute(due, due_args)]
            if not ids:
                return []
            marks = ",".join("?" * len(ids))
            conn.execute(f"UPDATE inbox SET lease_owner = ?, lease_until = ?,"
                         f" attempts = attempts + 1 WHERE key IN ({marks})",
                         [owner, now + lease, *ids])
            cols = [d[0] for d in conn.execute("SELECT * FROM inbox LIMIT 0").description]
            rows = [dict(zip(cols, r)) for r in conn.execute(
                f"SELECT * FROM inbox WHERE key IN ({marks}) ORDER BY received_at, key", ids)]
    for row in rows:
        row["payload"] = json.loads(row["payload"])
    return rows


def finish(db: sqlite_utils.Database, key: str, *, now: float, error: str | None = None) -> None:
    with transaction(db, concurrent=True) as conn:
        conn.execute("UPDATE inbox SET status = ?, handled_at = ?, error = ?, lease_owner = NULL,"
                     " lease_until = NULL WHERE key = ?",
                     ["failed" if error else "done", now, error, key])


def pending(db: sqlite_utils.Database) -> int:
    return db.execute("SELECT COUNT(*) FROM inbox WHERE status = 'new'").fetchone()[0]

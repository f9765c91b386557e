"""The outbox: every outgoing Feishu call, recorded before it is attempted.

A sender claims due rows with a lease, performs the call with the row's ``uuid`` as Feishu's
idempotency key, and marks the row sent (or schedules a retry). A sender that dies leaves the
lease to expire and another sends the row again with the same uuid: Feishu dedupes it, so a
message is never lost and never shown twice.

Feishu keeps a send ``uuid`` for one hour (:data:`UUID_WINDOW`), so that promise holds for one
hour from a row's first attempt (``first_attempt_at``): after it, a retry could show the
message twice, and the row is dead instead (the sender decides). A dead row blocks nothing
behind it. :func:`replay` puts dead rows back under a new send uuid (``send_uuid``); the
row's ``uuid`` stays its name, so patches that target it still find it.
"""
from __future__ import annotations

import hashlib
import json
import uuid as uuidlib
from typing import Any

import sqlite_utils

from .db import transaction

KINDS = ("send", "reply", "patch", "bitable_update",
         "bitable_attach", "bitable_create")  # the last two: see bot.feishu.sender._deliver_bitable_extra
UUID_KINDS = ("send", "reply")   # made idempotent by Feishu's uuid (patches and writes are)
UUID_WINDOW = 3600.0             # seconds Feishu dedupes a send uuid
#: Every outbox write takes turns with the others (PostgreSQL: this per-key lock; SQLite: its one
#: writer). A claim keeps order per target by reading the other rows' due times and leases, so a
#: mark committed between its read and its write (a retry pushing an older row back) could let
#: a newer row of the target go first; and row ids must be committed in the order given out.
#: Writes to other tables do not wait for the outbox.
WRITES = "outbox"


def reply_uuid(message_id: str) -> str:
    """The uuid of the bot's reply to the command message ``message_id`` (the alert router patches
    a run's reply by it). Feishu's uuid must be <= 50 chars; long ids are hashed."""
    uid = "r-" + message_id
    return uid if len(uid) <= 50 else "r-" + hashlib.sha256(message_id.encode()).hexdigest()[:40]


def enqueue(db: sqlite_utils.Database, kind: str, target: str, payload: dict[str, Any], *,
            now: float, uuid: str | None = None, ref: str | None = None) -> str:
    """Record an outgoing call; return its uuid. Enqueuing the same uuid twice is a no-op."""
    if kind not in KINDS:
        raise ValueError(f"unknown outbox kind {kind!r}")
    key = uuid or uuidlib.uuid4().hex
    with transaction(db, concurrent=True, key=WRITES) as conn:
        conn.execute(
            "INSERT OR IGNORE INTO outbox (uuid, kind, target, payload, ref, created_at, next_at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)",
            [key, kind, target, json.dumps(payload, ensure_ascii=False), ref, now, now])
    return key


def claim_due(db: sqlite_utils.Database, *, owner: str, now: float, lease: float = 30.0,
              limit: int = 20, kinds: tuple[str, ...] | None = None,
              uuids: tuple[str, ...] | None = None) -> list[dict[str, Any]]:
    """Claim pending rows whose time has come, oldest first.

    Order is kept per target across every sender: a row waits while an older row for the same
    target is still pending, whether not yet due or in flight with another sender. ``kinds``
    limits the claim (the web process sends messages but leaves Bitable writes to the worker, so
    one table is never written by two processes at once); ``uuids`` claims only those rows.
    """
    extra = ""
    args: list[Any] = [now, now, now, now, owner]
    if kinds:
        extra += f" AND kind IN ({','.join('?' * len(kinds))})"
        args += list(kinds)
    if uuids:
        extra += f" AND uuid IN ({','.join('?' * len(uuids))})"
        args += list(uuids)
    args.append(limit)
    with transaction(db, concurrent=True, key=WRITES) as conn:
        # Skip rows behind an older pending row of the same target (not due, or leased).
        rows = conn.execute(
            "SELECT id FROM outbox o WHERE status = 'pending' AND next_at <= ?"
            " AND (lease_until IS NULL OR lease_until < ?)"
            " AND NOT EXISTS (SELECT 1 FROM outbox p WHERE p.target = o.target"
            "   AND p.status = 'pending' AND p.id < o.id AND (p.next_at > ?"
            "   OR (p.lease_until >= ? AND p.lease_owner IS NOT ?)))"
            f"{extra} ORDER BY id LIMIT ?", args).fetchall()
        ids = [r[0] for r in rows]
        if not ids:
            return []
        marks = ",".join("?" * len(ids))
        conn.execute(f"UPDATE outbox SET lease_owner = ?, lease_until = ? WHERE id IN ({marks})",
                     [owner, now + lease, *ids])
        cols = [d[0] for d in conn.execute("SELECT * FROM outbox LIMIT 0").description]
        out = [dict(zip(cols, r)) for r in conn.execute(
            f"SELECT * FROM outbox WHERE id IN ({marks}) ORDER BY id", ids)]
    for row in out:
        row["payload"] = json.loads(row["payload"])
    return out


def _owned(owner: str | None) -> tuple[str, list[Any]]:
    """SQL (and its argument) limiting an update to a row still leased by ``owner``."""
    return ("", []) if owner is None else (" AND lease_owner = ?", [owner])


def mark_sent(db: sqlite_utils.Database, row_id: int, *, now: float,
              result: str | None = None, owner: str | None = None) -> bool:
    """Mark a row sent; with ``owner``, only while that sender still holds it (a sender whose
    lease was taken over leaves the row to the new holder). True when the row was marked."""
    where, args = _owned(owner)
    with transaction(db, concurrent=True, key=WRITES) as conn:
        cur = conn.execute("UPDATE outbox SET status = 'sent', sent_at = ?, result = ?,"
                           " attempts = attempts + 1, lease_owner = NULL, lease_until = NULL,"
                           f" last_error = NULL WHERE id = ?{where}",
                           [now, result, row_id, *args])
        return cur.rowcount > 0


def mark_retry(db: sqlite_utils.Database, row_id: int, *, now: float, next_at: float,
               error: str, owner: str | None = None) -> bool:
    """Schedule a row again; with ``owner``, only while that sender still holds it."""
    where, args = _owned(owner)
    with transaction(db, concurrent=True, key=WRITES) as conn:
        cur = conn.execute("UPDATE outbox SET attempts = attempts + 1, next_at = ?,"
                           " last_error = ?, lease_owner = NULL, lease_until = NULL"
                           f" WHERE id = ?{where}", [next_at, error[:500], row_id, *args])
        return cur.rowcount > 0


def extend_lease(db: sqlite_utils.Database, row_id: int, *, owner: str, until: float) -> bool:
    """Keep a pending row leased to ``owner`` until ``until`` (before a long call, such as an
    upload, that may outlast the lease); False when another sender holds it now."""
    with transaction(db, concurrent=True, key=WRITES) as conn:
        cur = conn.execute("UPDATE outbox SET lease_until = MAX(COALESCE(lease_until, 0), ?)"
                           " WHERE id = ? AND status = 'pending' AND lease_owner = ?",
                           [until, row_id, owner])
        return cur.rowcount > 0


def release(db: sqlite_utils.Database, row_id: int, *, next_at: float, reason: str,
            owner: str | None = None) -> bool:
    """Put a claimed row off until ``next_at`` without counting an attempt (rate limit, order).

    Only a pending row; with ``owner``, only while that sender still holds it (a sender whose
    lease ran out must not release the row another sender now holds). True when released."""
    where, args = _owned(owner)
    with transaction(db, concurrent=True, key=WRITES) as conn:
        cur = conn.execute("UPDATE outbox SET next_at = ?, last_error = ?, lease_owner = NULL,"
                           f" lease_until = NULL WHERE id = ? AND status = 'pending'{where}",
                           [next_at, reason[:500], row_id, *args])
        return cur.rowcount > 0


def status_of(db: sqlite_utils.Database, uuid: str) -> str | None:
    """pending / sent / dead, or None for an unknown uuid."""
    row = db.execute("SELECT status FROM outbox WHERE uuid = ?", [uuid]).fetchone()
    return row[0] if row else None


def mark_dead(db: sqlite_utils.Database, row_id: int, *, now: float, error: str,
              owner: str | None = None) -> bool:
    """Give up on a row that can never succeed (e.g. bot removed from the chat).

    Only a pending row (a sent one stays sent); with ``owner``, only while that sender still
    holds it. True when the row was marked."""
    where, args = _owned(owner)
    with transaction(db, concurrent=True, key=WRITES) as conn:
        cur = conn.execute("UPDATE outbox SET status = 'dead', attempts = attempts + 1,"
                           " last_error = ?, lease_owner = NULL, lease_until = NULL, sent_at = ?"
                           f" WHERE id = ? AND status = 'pending'{where}",
                           [error[:500], now, row_id, *args])
        return cur.rowcount > 0


def result_of(db: sqlite_utils.Database, uuid: str) -> str | None:
    """The Feishu message_id a sent row got (None while unsent)."""
    row = db.execute("SELECT result FROM outbox WHERE uuid = ? AND status = 'sent'",
                     [uuid]).fetchone()
    return row[0] if row else None


def depth(db: sqlite_utils.Database) -> int:
    return db.execute("SELECT COUNT(*) FROM outbox WHERE status = 'pending'").fetchone()[0]


def next_due(db: sqlite_utils.Database) -> float | None:
    row = db.execute("SELECT MIN(next_at) FROM outbox WHERE status = 'pending'").fetchone()
    return row[0] if row and row[0] is not None else None


def uuid_for_message(db: sqlite_utils.Database, message_id: str) -> str | None:
    """The uuid of the send or reply row that produced ``message_id`` (None: not ours, or
    pruned). Patches use it as their target, so they stay in order with the row's others."""
    row = db.execute("SELECT uuid FROM outbox WHERE result = ? AND kind IN ('send', 'reply')"
                     " ORDER BY id DESC LIMIT 1", [message_id]).fetchone()
    return None if row is None else str(row[0])


def send_uuid(row: dict[str, Any]) -> str:
    """The uuid to send a row under: a replayed row's new one, else the row's own."""
    return row.get("send_uuid") or row["uuid"]


def mark_attempt(db: sqlite_utils.Database, row_id: int, *, now: float) -> float:
    """Record that the row is about to be sent (the first time only); return that time."""
    with transaction(db, concurrent=True, key=WRITES) as conn:
        conn.execute("UPDATE outbox SET first_attempt_at = COALESCE(first_attempt_at, ?)"
                     " WHERE id = ?", [now, row_id])
        return conn.execute("SELECT first_attempt_at FROM outbox WHERE id = ?",
                            [row_id]).fetchone()[0]


def dead_count(db: sqlite_utils.Database) -> int:
    """Rows given up on and not replayed (kept for a week, see ``storage.db.prune``)."""
    return db.execute("SELECT COUNT(*) FROM outbox WHERE status = 'dead'").fetchone()[0]


def replay(db: sqlite_utils.Database, ids: list[int] | None = None, *,
           now: float) -> list[dict[str, Any]]:
    """Put dead rows (all, or those ``ids``) back in the queue; return them as they were.

    A replayed send or reply gets a new send uuid: its old one may have lapsed at Feishu, and
    if the first attempts did land after all, the message now shows twice. The row keeps its
    id (its place in the order per target) and its ``uuid`` (patches find it by that).
    """
    where, args = "status = 'dead'", []
    if ids is not None:
        if not ids:
            return []
        where += f" AND id IN ({','.join('?' * len(ids))})"
        args = list(ids)
    with transaction(db) as conn:
        cols = [d[0] for d in conn.execute("SELECT * FROM outbox LIMIT 0").description]
        rows = [dict(zip(cols, r)) for r in conn.execute(
            f"SELECT * FROM outbox WHERE {where} ORDER BY id", args)]
        for row in rows:
            fresh = uuidlib.uuid4().hex if row["kind"] in UUID_KINDS else None
            conn.execute(
                "UPDATE outbox SET status = 'pending', attempts = 0, next_at = ?,"
                " first_attempt_at = NULL, send_uuid = ?, sent_at = NULL, lease_owner = NULL,"
                " lease_until = NULL, last_error = ? WHERE id = ? AND status = 'dead'",
                [now, fresh, f"replayed (was: {row['last_error'] or 'dead'})"[:500],
                 row["id"]])
    return rows


# -- single-row reads and writes used by the bot (the storage seam) -----------------------------


def row_state(db: sqlite_utils.Database, uuid: str) -> tuple[str, str | None, float] | None:
    """``(status, last_error, next_at)`` of the row named ``uuid``, or None when absent."""
    return db.execute(
        "SELECT status, last_error, next_at FROM outbox WHERE uuid = ?", [uuid]).fetchone()


def id_of(db: sqlite_utils.Database, uuid: str) -> int | None:
    """The row id of the row named ``uuid``, or None when absent."""
    row = db.execute("SELECT id FROM outbox WHERE uuid = ?", [uuid]).fetchone()
    return None if row is None else row[0]


def set_payload(db: sqlite_utils.Database, row_id: int, payload: dict[str, Any]) -> None:
    """Overwrite the payload of row ``row_id`` (as JSON) in one transaction."""
    with transaction(db, concurrent=True, key=WRITES) as conn:
        conn.execute("UPDATE outbox SET payload = ? WHERE id = ?",
                     [json.dumps(payload, ensure_ascii=False), row_id])


def next_at_of(db: sqlite_utils.Database, row_id: int) -> float:
    """When row ``row_id`` is next due; raises TypeError when the row does not exist."""
    return db.execute("SELECT next_at FROM outbox WHERE id = ?", [row_id]).fetchone()[0]


def enqueue_patch(db: sqlite_utils.Database, target: str, payload: dict[str, Any], *, now: float,
                  ref: str | None = None, interval: float = 1.0) -> str:
    """Record a patch of the message ``target`` carrying ``payload``, coalesced; return the uuid
    of the row that carries it.

    A pending patch row of ``target`` that no sender holds gets ``payload`` instead of a second
    row. Otherwise a new row is added, due no sooner than ``interval`` seconds after the
    previous patch of that target. One transaction.
    """
    body = json.dumps(payload, ensure_ascii=False)
    with transaction(db, concurrent=True, key=WRITES) as conn:
        row = conn.execute(
            "SELECT id, uuid FROM outbox WHERE kind = 'patch' AND target = ? AND status = 'pending'"
            " AND (lease_until IS NULL OR lease_until < ?) ORDER BY id DESC LIMIT 1",
            [target, now]).fetchone()
        if row is not None:
            conn.execute("UPDATE outbox SET payload = ? WHERE id = ?", [body, row[0]])
            return row[1]
        last = conn.execute("SELECT MAX(next_at) FROM outbox WHERE kind = 'patch' AND target = ?",
                            [target]).fetchone()[0]
        due = now if last is None else max(now, last + interval)
        key = "p-" + uuidlib.uuid4().hex
        conn.execute("INSERT INTO outbox (uuid, kind, target, payload, ref, created_at, next_at)"
                     " VALUES (?, 'patch', ?, ?, ?, ?, ?)", [key, target, body, ref, now, due])
    return key


def has_pending_patch(db: sqlite_utils.Database, target: str) -> bool:
    """Is a patch of ``target`` still pending (held by a sender or not)?"""
    return db.execute("SELECT 1 FROM outbox WHERE kind = 'patch' AND target = ?"
                      " AND status = 'pending' LIMIT 1", [target]).fetchone() is not None


def enqueue_in(conn, *, uuid: str, kind: str, target: str, payload: dict[str, Any],
               ref: str | None, now: float) -> None:
    """As :func:`enqueue` on the caller's connection, inside its transaction (a uuid already
    present is a no-op)."""
    if kind not in KINDS:
        raise ValueError(f"unknown outbox kind {kind!r}")
    conn.execute(
        "INSERT OR IGNORE INTO outbox (uuid, kind, target, payload, ref, created_at, next_at)"
        " VALUES (?, ?, ?, ?, ?, ?, ?)",
        [uuid, kind, target, json.dumps(payload, ensure_ascii=False), ref, now, now])

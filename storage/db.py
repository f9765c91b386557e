"""Opening the SQLite store: WAL mode, busy timeout, and schema migrations.

One file is shared by the web process (several gunicorn workers) and the worker. WAL lets readers
run beside one writer; ``busy_timeout`` makes a writer wait for the lock instead of failing.
Every write that must be atomic runs inside ``with db.conn:`` (one transaction).
"""
from __future__ import annotations

import sqlite3
from pathlib import Path

import sqlite_utils

from .migrations import MIGRATIONS


class StorageError(Exception):
    """Base of the storage package's errors."""


class NotFound(StorageError):
    """A row that the caller named does not exist."""


class Conflict(StorageError):
    """The row is not in a state that allows the change (e.g. retrying a running task)."""


def open_db(path: str | Path, *, migrate: bool = True) -> sqlite_utils.Database:
    """Open (creating folders and file as needed) the store at ``path`` and migrate it.

    ``":memory:"`` gives a private in-memory store, for unit tests.
    """
    if str(path) != ":memory:":
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(str(path), timeout=30.0, isolation_level=None,
                           check_same_thread=False)
    conn.execute("PRAGMA busy_timeout = 30000")
    if str(path) != ":memory:":
        conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = NORMAL")
    conn.execute("PRAGMA foreign_keys = ON")
    db = sqlite_utils.Database(conn)
    if migrate:
        apply_migrations(db)
    return db


def path_of(db: sqlite_utils.Database) -> str:
    """The file behind ``db`` (``":memory:"`` for a private in-memory store)."""
    row = db.execute("PRAGMA database_list").fetchone()
    return row[2] if row and row[2] else ":memory:"


def schema_version(db: sqlite_utils.Database) -> int:
    row = db.execute("PRAGMA user_version").fetchone()
    return int(row[0])


def apply_migrations(db: sqlite_utils.Database) -> int:
    """Apply the migrations this store has not seen yet; return the new version.

    Each migration runs in its own ``BEGIN IMMEDIATE`` transaction and bumps ``user_version``
    with it, so two processes starting at once never apply one twice.
    """
    for version, statements in enumerate(MIGRATIONS, start=1):
        if schema_version(db) >= version:
            continue
        db.conn.execute("BEGIN IMMEDIATE")
        try:
            if schema_version(db) < version:  # re-check under the write lock
                for sql in statements:
                    db.conn.execute(sql)
                db.conn.execute(f"PRAGMA user_version = {version}")
            db.conn.execute("COMMIT")
        except BaseException:
            db.conn.execute("ROLLBACK")
            raise
    return schema_version(db)


class transaction:
    """``with transaction(db):`` runs the block in one ``BEGIN IMMEDIATE`` transaction."""

    def __init__(self, db: sqlite_utils.Database) -> None:
        self.conn = db.conn

    def __enter__(self) -> sqlite3.Connection:
        self.conn.execute("BEGIN IMMEDIATE")
        return self.conn

    def __exit__(self, exc_type, exc, tb) -> None:
        self.conn.execute("COMMIT" if exc_type is None else "ROLLBACK")


def prune(db: sqlite_utils.Database, *, now: float, keep_days: float = 7.0) -> dict[str, int]:
    """Delete handled inbox rows and delivered (or dead) outbox rows older than ``keep_days``.

    A week is far past Feishu's last re-push (6 h) and its send-uuid window (1 h), so dedup and
    idempotency are unaffected. Tasks, attempts and alerts are kept: the reports read them.
    """
    cutoff = now - keep_days * 86400
    with transaction(db) as conn:
        inbox = conn.execute("DELETE FROM inbox WHERE status != 'new' AND received_at < ?",
                             [cutoff]).rowcount
        outbox = conn.execute("DELETE FROM outbox WHERE status != 'pending' AND created_at < ?",
                              [cutoff]).rowcount
    return {"inbox": inbox, "outbox": outbox}

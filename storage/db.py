"""Opening the store: SQLite (WAL mode, busy timeout) or PostgreSQL, and schema migrations.

``OPSBOT_DB`` is a file path (SQLite, the default) or a ``postgresql://`` URL (see
:mod:`storage.pg`, which gives the same functions a PostgreSQL connection pool).

One file is shared by the web process (several gunicorn workers) and the worker. WAL lets readers
run beside one writer; ``busy_timeout`` makes a writer wait for the lock instead of failing.
Every write that must be atomic runs inside ``with transaction(db):`` (one ``BEGIN IMMEDIATE``).
An asyncio process does that waiting off its loop: :class:`StoreThread` runs its writes on a
thread with a connection of its own.
"""
from __future__ import annotations

import asyncio
import logging
import sqlite3
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import sqlite_utils

from . import pg
from .migrations import MIGRATIONS

log = logging.getLogger("opsbot.store")


class StorageError(Exception):
    """Base of the storage package's errors."""


class NotFound(StorageError):
    """A row that the caller named does not exist."""


class Conflict(StorageError):
    """The row is not in a state that allows the change (e.g. retrying a running task)."""


def open_db(path: str | Path, *, migrate: bool = True) -> sqlite_utils.Database:
    """Open (creating folders and file as needed) the store at ``path`` and migrate it.

    ``":memory:"`` gives a private in-memory store, for unit tests. A ``postgresql://`` URL
    opens a :class:`storage.pg.PgDatabase` instead.
    """
    if pg.is_url(path):
        pgdb = pg.PgDatabase(str(path))
        if migrate:
            try:
                pg.apply_migrations(pgdb, MIGRATIONS)
            except BaseException:
                pgdb.close()
                raise
        return pgdb  # type: ignore[return-value]
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
    """The file behind ``db`` (``":memory:"`` for a private in-memory store; the URL of a
    PostgreSQL store)."""
    if isinstance(db, pg.PgDatabase):
        return db.url
    row = db.execute("PRAGMA database_list").fetchone()
    return row[2] if row and row[2] else ":memory:"


def schema_version(db: sqlite_utils.Database) -> int:
    if isinstance(db, pg.PgDatabase):
        return pg.schema_version(db)
    row = db.execute("PRAGMA user_version").fetchone()
    return int(row[0])


def apply_migrations(db: sqlite_utils.Database) -> int:
    """Apply the migrations this store has not seen yet; return the new version.

    Each migration runs in its own ``BEGIN IMMEDIATE`` transaction and bumps ``user_version``
    with it, so two processes starting at once never apply one twice. (PostgreSQL: see
    :func:`storage.pg.apply_migrations`.)
    """
    if isinstance(db, pg.PgDatabase):
        return pg.apply_migrations(db, MIGRATIONS)
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
    """``with transaction(db):`` runs the block in one ``BEGIN IMMEDIATE`` transaction.

    On SQLite every block runs alone (one writer). On PostgreSQL a block runs alone by default
    too; ``concurrent=True`` says the block stays correct with other writers running beside it
    (atomic statements, row locks, ``SKIP LOCKED``), so it runs in parallel with other such
    blocks, and ``key`` serializes it with the blocks naming the same key (see
    :mod:`storage.pg`). SQLite ignores both.
    """

    def __init__(self, db: sqlite_utils.Database, *, concurrent: bool = False,
                 key: str | None = None) -> None:
        self._pg = db.begin(shared=concurrent, key=key) if isinstance(db, pg.PgDatabase) \
            else None
        self.conn = db.conn

    def __enter__(self) -> sqlite3.Connection:
        if self._pg is not None:   # the write lock, exclusive or shared (see storage.pg)
            return self._pg.__enter__()  # type: ignore[return-value]
        self.conn.execute("BEGIN IMMEDIATE")
        return self.conn

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._pg is not None:
            self._pg.__exit__(exc_type, exc, tb)
            return
        self.conn.execute("COMMIT" if exc_type is None else "ROLLBACK")


def is_postgres(db: Any) -> bool:
    """True when ``db`` is a PostgreSQL store (its claims take ``FOR UPDATE SKIP LOCKED``)."""
    return isinstance(db, pg.PgDatabase)


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


def database_file(db: sqlite_utils.Database) -> str | None:
    """The file behind ``db`` (None for an in-memory store and for PostgreSQL)."""
    if isinstance(db, pg.PgDatabase):
        return None
    for _, name, file in db.execute("PRAGMA database_list").fetchall():
        if name == "main":
            return file or None
    return None


def set_lock_wait(db: sqlite_utils.Database, seconds: float) -> None:
    """How long a statement of this connection waits for another process's write lock before
    it fails (``sqlite3.OperationalError``, "database is locked"; on PostgreSQL the wait for any
    lock of a transaction, the write lock, a per-key lock or a row lock, as ``lock_timeout``)."""
    if isinstance(db, pg.PgDatabase):
        db.lock_wait = seconds
        return
    db.conn.execute(f"PRAGMA busy_timeout = {int(seconds * 1000)}")


def ping(db: sqlite_utils.Database) -> None:
    """One round trip to the store; raises what the driver raises when it cannot answer."""
    db.execute("SELECT 1").fetchone()


def journal_mode(db: sqlite_utils.Database) -> str:
    """The store's journal mode, lower case (``wal`` for a file store opened by :func:`open_db`;
    ``postgresql`` for a PostgreSQL store, which has none)."""
    if isinstance(db, pg.PgDatabase):
        return "postgresql"
    return str(db.execute("PRAGMA journal_mode").fetchone()[0]).lower()


def write_probe(db: sqlite_utils.Database) -> str:
    """Take the write lock and give it back, changing nothing: ``""`` when that worked, else the
    driver's error as text (the lock stayed busy past the lock wait, a read-only file)."""
    if isinstance(db, pg.PgDatabase):
        try:
            with db.begin() as tx:
                tx.execute("UPDATE opsbot_schema SET version = version")  # a write, no change
            return ""
        except Exception as exc:  # noqa: BLE001 - reported as text, like SQLite's errors
            return f"{type(exc).__name__}: {exc}"
    try:
        db.conn.execute("BEGIN IMMEDIATE")
        db.conn.execute(f"PRAGMA user_version = {schema_version(db)}")
        db.conn.execute("ROLLBACK")
        return ""
    except sqlite3.Error as exc:
        if db.conn.in_transaction:
            db.conn.execute("ROLLBACK")
        return f"{type(exc).__name__}: {exc}"


class StoreThread:
    """Store calls on one dedicated thread with its own connection, awaited from the event loop.

    SQLite lets one writer hold the lock at a time and a waiting writer blocks (up to the busy
    timeout) inside the call. On the event loop that would freeze every coroutine, lease
    renewals included, while another process (the web process, ``opsbot run``) writes. Here the
    wait happens on this thread; the loop goes on. Calls run one at a time, in the order they
    were submitted, so writes of one coroutine keep their order. Awaiting a call shields it: a
    cancelled caller does not cancel a write that was already asked for (the sync code it
    replaces always completed its writes too).

    ``fn(db, *args)`` gets this thread's own :class:`sqlite_utils.Database`. Reads may stay on
    the loop's connection: in WAL mode a reader never waits for a writer. An in-memory store
    cannot be opened twice, so its calls run inline on the loop.
    """

    def __init__(self, db: sqlite_utils.Database) -> None:
        self._path = database_file(db)
        # PostgreSQL: the store thread shares ``db`` (its pool serves every thread)
        self._shared = db if isinstance(db, pg.PgDatabase) else None
        self._inline_db = None if self._path or self._shared is not None else db
        self._db: sqlite_utils.Database | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()

    def _thread_db(self) -> sqlite_utils.Database:
        if self._shared is not None:
            return self._shared  # type: ignore[return-value]
        if self._db is None:   # opened on the store thread, the first time it is needed
            self._db = open_db(self._path, migrate=False)
        return self._db

    def _run(self, fn: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        with self._lock:
            return fn(self._thread_db(), *args, **kwargs)

    def submit(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> asyncio.Future:
        """Queue ``fn(db, *args, **kwargs)``; returns a future of its result (not awaited here:
        a failure is logged if nobody awaits it)."""
        loop = asyncio.get_running_loop()
        if self._inline_db is not None:
            fut = loop.create_future()
            try:
                fut.set_result(fn(self._inline_db, *args, **kwargs))
            except Exception as exc:  # noqa: BLE001 - handed to the awaiting caller
                fut.set_exception(exc)
        else:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(1, thread_name_prefix="opsbot-store")
            fut = loop.run_in_executor(self._pool, self._run, fn, args, kwargs)
        fut.add_done_callback(_log_unretrieved)
        return fut

    async def __call__(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run ``fn(db, *args, **kwargs)`` on the store thread and return its result."""
        return await asyncio.shield(self.submit(fn, *args, **kwargs))

    def close(self) -> None:
        """Wait for queued calls, close the thread's connection (it reopens when used again)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        with self._lock:
            if self._db is not None:
                self._db.conn.close()
                self._db = None


def _log_unretrieved(fut: asyncio.Future) -> None:
    if fut.cancelled():
        return
    exc = fut.exception()   # marks it retrieved; the awaiting caller (if any) still gets it
    if exc is not None and not isinstance(exc, sqlite3.OperationalError):
        log.debug("store call failed: %s", exc)

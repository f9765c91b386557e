"""The PostgreSQL backend: ``OPSBOT_DB=postgresql://...`` (psycopg 3 with a connection pool).

Errors reach callers as the ``sqlite3`` errors they already handle (see
:func:`_as_sqlite_errors`), so a lost server is treated like a busy SQLite file.

The storage functions keep their SQL in SQLite's form (``?`` placeholders); :func:`translate`
rewrites a statement for PostgreSQL in this one place, and :func:`translate_ddl` does the same for
the migrations, so both backends share one schema and one list of migrations.

:class:`PgDatabase` offers the part of ``sqlite_utils.Database`` the storage functions use:
``execute``, ``executemany``, ``query`` and ``conn`` (whose ``close()`` closes the pool).
``with transaction(db)`` (see :mod:`storage.db`) takes a pooled connection, begins a transaction
and takes the write lock, a transaction-scoped advisory lock, in one of two modes:

- *exclusive* (the default): the block runs alone, as under SQLite's ``BEGIN IMMEDIATE``, so a
  multi-statement read-modify-write keeps the meaning it has on SQLite. Batch creation, cancel,
  block, requeue, outbox replay, lease expiry of dead workers, alerts and silences, kv writes of
  several keys, prune and the doctor's write probe stay here: they are rare, and their
  correctness rests on nobody writing between their reads and their writes.
- *shared* (``transaction(db, concurrent=True)``): the block runs beside every other shared
  block and waits only while an exclusive one runs. Each such block is correct on its own
  terms, without the global lock: task and inbox claims are one statement whose candidate scan
  takes ``FOR UPDATE SKIP LOCKED`` (concurrent claimers lock disjoint rows and never wait on each
  other), lease renewals, task updates and heartbeats are single conditional ``UPDATE``s
  (the row lock orders them), inbox dedup is ``INSERT ... ON CONFLICT DO NOTHING``, and a
  finished batch is marked done by an ``UPDATE`` that re-checks its status under the row lock.
  (The first claims of a still-queued batch wait briefly on the batch row, to start it.)
  A shared block that reads then writes rows that may not exist yet also names a ``key``; it
  takes a second, per-key advisory lock (:func:`key_lock`) and so runs alone only among blocks
  of that key: the Coze QPS budget of one account (``budget:<account>``), the breaker of one
  service (``breaker:<service>``), the count of Coze runs in flight of one account
  (``coze-in-flight:<its pipelines>``), the learned run times of one workflow, the
  recording of attempts (``attempts``: their ids must be committed in the order given
  out, see :data:`storage.queue.ATTEMPT_WRITES`), and the outbox (``outbox``):
  its claim keeps order per target by reading other rows' due times and leases, and its ids
  must be committed in the order given out, so every outbox write takes turns with the others
  (see :data:`storage.outbox.WRITES`).

Every lock wait (advisory or row) is bounded by ``lock_wait`` (``lock_timeout``), like SQLite's
busy timeout; a deadlock the server detects is a "try again" error too. Reads outside a
transaction never wait. A statement run through ``db`` on a thread that holds an open
transaction of that ``db`` runs inside it (as on SQLite's single connection). Claims use
``WITH ... AS MATERIALIZED``: PostgreSQL 12 or newer.

Migrations run in one transaction under their own advisory lock, so processes that start at once
apply each migration exactly once; the version sits in table ``opsbot_schema``.
"""
from __future__ import annotations

import hashlib
import re
import sqlite3
import threading
from contextlib import contextmanager
from functools import lru_cache
from typing import Any, Iterable, Iterator

WRITE_LOCK = 0x6F707362          # "opsb": the write lock (exclusive or shared) of transactions
MIGRATE_LOCK = 0x6F70736D        # "opsm": the advisory lock of the migrations
KEY_LOCKS = 0x6F70736B           # "opsk": first half of every per-key lock (see key_lock)

URL_PREFIXES = ("postgresql://", "postgres://")


def is_url(location: object) -> bool:
    """True when ``location`` names a PostgreSQL server rather than a SQLite file."""
    return str(location).startswith(URL_PREFIXES)


def redacted(text: str) -> str:
    """``text`` with the password of any PostgreSQL URL in it replaced by ``***``."""
    return re.sub(r"(postgres(?:ql)?://[^:/@\s]*):[^@\s]*@", r"\1:***@", text)


# --- SQL translation -------------------------------------------------------------------------

def _unquoted(text: str, start: int = 0):
    """``(index, char, depth)`` of every character of ``text`` from ``start`` that is outside
    quotes; ``depth`` counts the parentheses open around it (a ``)`` is at its outer depth)."""
    depth, quote = 0, None
    for i in range(start, len(text)):
        ch = text[i]
        if quote:
            if ch == quote:
                quote = None
            continue
        if ch in "'\"":
            quote = ch
            continue
        if ch == ")":
            depth -= 1
        yield i, ch, depth
        if ch == "(":
            depth += 1


def _close_paren(sql: str, start: int) -> int:
    """Index of the ``)`` closing the ``(`` at ``start`` (quotes respected)."""
    for i, ch, depth in _unquoted(sql, start):
        if ch == ")" and depth == 0:
            return i
    raise ValueError(f"unbalanced parentheses in SQL: {sql!r}")


def _top_level(text: str) -> tuple[list[int], bool]:
    """Positions of top-level commas in ``text``, and whether it holds a top-level comparison."""
    commas, compares = [], False
    for i, ch, depth in _unquoted(text):
        if depth == 0 and ch == ",":
            commas.append(i)
        elif depth == 0 and ch in "=<>":
            compares = True
    return commas, compares


def _rewrite_calls(sql: str) -> str:
    """``MAX(a, b)``/``MIN(a, b)`` (SQLite's scalar forms) become GREATEST/LEAST; ``SUM(cond)``
    (a sum of booleans) becomes a sum of ``CASE WHEN cond THEN 1 ELSE 0 END``."""
    out, pos = [], 0
    for m in re.finditer(r"\b(MAX|MIN|SUM)\(", sql, flags=re.IGNORECASE):
        if m.start() < pos:
            continue
        open_at = m.end() - 1
        close_at = _close_paren(sql, open_at)
        inner = _rewrite_calls(sql[open_at + 1:close_at])
        commas, compares = _top_level(inner)
        name = m.group(1).upper()
        out.append(sql[pos:m.start()])
        if name in ("MAX", "MIN") and commas:
            out.append(f"{'GREATEST' if name == 'MAX' else 'LEAST'}({inner})")
        elif name == "SUM" and compares:
            out.append(f"SUM(CASE WHEN {inner} THEN 1 ELSE 0 END)")
        else:
            out.append(f"{m.group(1)}({inner})")
        pos = close_at + 1
    out.append(sql[pos:])
    return "".join(out)


@lru_cache(maxsize=2048)
def translate(sql: str) -> str:
    """Rewrite one statement from the SQLite form the storage functions use to PostgreSQL."""
    sql = sql.replace("%", "%%")
    ignore = re.match(r"\s*INSERT OR IGNORE INTO\b", sql, flags=re.IGNORECASE)
    if ignore:
        sql = "INSERT INTO" + sql[ignore.end():].rstrip().rstrip(";") + " ON CONFLICT DO NOTHING"
    sql = re.sub(r"\bjson_extract\((\w+(?:\.\w+)?), '\$\.(\w+)'\)", r"(\1::jsonb ->> '\2')", sql)
    sql = re.sub(r"\b((?:\w+\.)?id) IN \(SELECT value FROM json_each\(\?\)\)",
                 r"\1 IN (SELECT value::bigint FROM jsonb_array_elements_text(?::jsonb))", sql)
    sql = re.sub(r"\bjson_each\(\?\)", "jsonb_array_elements_text(?::jsonb)", sql)
    sql = re.sub(r"\bIS NOT \?", "IS DISTINCT FROM ?", sql)
    sql = re.sub(r"\bIS \?", "IS NOT DISTINCT FROM ?", sql)
    if re.search(r"\b(MAX|MIN|SUM)\(", sql, flags=re.IGNORECASE):
        sql = _rewrite_calls(sql)
    return _placeholders(sql)


def _placeholders(sql: str) -> str:
    """``?`` outside string literals becomes ``%s``."""
    out, quote = [], None
    for ch in sql:
        if quote:
            if ch == quote:
                quote = None
        elif ch in "'\"":
            quote = ch
        elif ch == "?":
            out.append("%s")
            continue
        out.append(ch)
    return "".join(out)


# Columns PostgreSQL has no implicit form of: batches are ordered by insertion (SQLite's rowid)
# where their creation times tie.
_EXTRA_COLUMNS = {"batches": "rowid BIGINT GENERATED ALWAYS AS IDENTITY"}


def translate_ddl(sql: str) -> str:
    """Rewrite one migration statement for PostgreSQL (types, identity columns, rowid)."""
    sql = re.sub(r"\bINTEGER PRIMARY KEY AUTOINCREMENT\b",
                 "BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY", sql)
    sql = re.sub(r"\bINTEGER\b", "BIGINT", sql)
    sql = re.sub(r"\bREAL\b", "DOUBLE PRECISION", sql)
    m = re.match(r"\s*CREATE TABLE (\w+) \(", sql)
    if m and m.group(1) in _EXTRA_COLUMNS:
        end = sql.rstrip().rfind(")")
        sql = sql[:end].rstrip() + ",\n    " + _EXTRA_COLUMNS[m.group(1)] + "\n)"
    return sql


# --- connections -------------------------------------------------------------------------------

class Result:
    """A finished statement's rows (read at once), ``rowcount`` and ``description``."""

    def __init__(self, cur: Any) -> None:
        self.description = cur.description
        self.rowcount = cur.rowcount
        self._rows = list(cur.fetchall()) if cur.description is not None else []
        self._at = 0

    def fetchone(self) -> tuple | None:
        if self._at >= len(self._rows):
            return None
        self._at += 1
        return self._rows[self._at - 1]

    def fetchall(self) -> list[tuple]:
        rows, self._at = self._rows[self._at:], len(self._rows)
        return rows

    def __iter__(self) -> Iterator[tuple]:
        return iter(self.fetchall())


@contextmanager
def _as_sqlite_errors() -> Iterator[None]:
    """Raise the driver's errors as the ``sqlite3`` errors the callers already handle: a lost
    server, a timeout or an exhausted pool as ``OperationalError`` (the "store busy, try again"
    paths), a constraint as ``IntegrityError``, anything else as ``DatabaseError``. The
    PostgreSQL error stays attached as the cause."""
    import psycopg
    try:
        yield
    except psycopg.errors.LockNotAvailable as exc:   # a lock stayed busy past lock_wait
        raise sqlite3.OperationalError(f"database is locked (postgresql: {exc})") from exc
    except psycopg.errors.DeadlockDetected as exc:   # the server rolled one side back: retry
        raise sqlite3.OperationalError(f"database is locked (postgresql: {exc})") from exc
    except psycopg.OperationalError as exc:
        raise sqlite3.OperationalError(f"postgresql: {redacted(str(exc))}") from exc
    except psycopg.IntegrityError as exc:
        raise sqlite3.IntegrityError(f"postgresql: {exc}") from exc
    except psycopg.Error as exc:
        raise sqlite3.DatabaseError(f"postgresql: {exc}") from exc


class Transaction:
    """One pooled connection inside ``BEGIN ... COMMIT``; what ``with transaction(db)`` yields."""

    def __init__(self, raw: Any) -> None:
        self.raw = raw

    def execute(self, sql: str, params: Iterable[Any] | None = None) -> Result:
        with _as_sqlite_errors(), self.raw.cursor() as cur:
            cur.execute(translate(sql), tuple(params or ()))
            return Result(cur)

    def executemany(self, sql: str, seq: Iterable[Iterable[Any]]) -> Result:
        with _as_sqlite_errors(), self.raw.cursor() as cur:
            cur.executemany(translate(sql), [tuple(p) for p in seq])
            return Result(cur)


class _Conn:
    """``db.conn``: closing it closes the pool (as closing a SQLite connection would)."""

    def __init__(self, db: "PgDatabase") -> None:
        self._db = db

    def execute(self, sql: str, params: Iterable[Any] | None = None) -> Result:
        return self._db.execute(sql, params)

    @property
    def in_transaction(self) -> bool:
        return self._db._current() is not None

    def commit(self) -> None:
        """Statements outside ``transaction(db)`` commit as they run (autocommit): nothing to do."""

    def close(self) -> None:
        self._db.close()


def _configure(raw: Any) -> None:
    # SUM over integers is NUMERIC in PostgreSQL; give back int (or float) as SQLite does
    from psycopg.adapt import Loader

    class NumericLoader(Loader):
        def load(self, data: Any) -> Any:
            text = bytes(data).decode()
            return int(text) if re.fullmatch(r"-?\d+", text) else float(text)

    raw.adapters.register_loader("numeric", NumericLoader)


class PgDatabase:
    """A PostgreSQL store behind a connection pool, used where a ``sqlite_utils.Database`` is."""

    backend = "postgresql"

    def __init__(self, url: str, *, max_size: int = 8, connect_timeout: float = 30.0) -> None:
        try:
            from psycopg_pool import ConnectionPool
        except ImportError as exc:  # pragma: no cover - depends on the install
            raise RuntimeError("OPSBOT_DB names a PostgreSQL server but psycopg is not installed:"
                               " pip install 'opsbot[postgres]'") from exc
        import psycopg
        self.url = url
        with _as_sqlite_errors():   # fail fast, with the server's own reason, when it is unreachable
            psycopg.connect(url, connect_timeout=max(1, int(connect_timeout))).close()
        self.pool = ConnectionPool(url, min_size=1, max_size=max_size, open=True,
                                   kwargs={"autocommit": True}, configure=_configure,
                                   name="opsbot-store")
        try:
            with _as_sqlite_errors():
                self.pool.wait(timeout=connect_timeout)
        except BaseException:
            self.pool.close()
            raise
        self.conn = _Conn(self)
        self.lock_wait = 30.0   # seconds a transaction waits for the write lock (set_lock_wait)
        self._local = threading.local()

    # the open transaction of this thread, if any (statements through ``db`` join it)
    def _current(self) -> Transaction | None:
        return getattr(self._local, "tx", None)

    def execute(self, sql: str, params: Iterable[Any] | None = None) -> Result:
        tx = self._current()
        if tx is not None:
            return tx.execute(sql, params)
        with _as_sqlite_errors(), self.pool.connection() as raw:
            return Transaction(raw).execute(sql, params)

    def executemany(self, sql: str, seq: Iterable[Iterable[Any]]) -> Result:
        with self.begin() as tx:
            return tx.executemany(sql, seq)

    def query(self, sql: str, params: Iterable[Any] | None = None) -> Iterator[dict[str, Any]]:
        res = self.execute(sql, params)
        cols = [d[0] for d in res.description or ()]
        for row in res.fetchall():
            yield dict(zip(cols, row))

    def begin(self, lock: int = WRITE_LOCK, *, shared: bool = False,
              key: str | None = None) -> "_Begin":
        """A transaction under advisory lock ``lock`` (shared or exclusive), and under the
        per-key lock of ``key`` when given (see the module docstring)."""
        return _Begin(self, lock, shared=shared, key=key)

    def close(self) -> None:
        self.pool.close()


def key_lock(key: str) -> tuple[int, int]:
    """The advisory lock of ``key``: ``(KEY_LOCKS, 32-bit hash of key)``. The two-int form keeps
    these apart from the single-bigint locks above (they never collide)."""
    digest = hashlib.blake2b(key.encode(), digest_size=4).digest()
    return KEY_LOCKS, int.from_bytes(digest, "big", signed=True)


class _Begin:
    def __init__(self, db: PgDatabase, lock: int, *, shared: bool = False,
                 key: str | None = None) -> None:
        self.db, self.lock, self.shared, self.key = db, lock, shared, key
        self.raw: Any = None

    def _opening(self) -> str:
        """BEGIN, the lock wait and the locks as one round trip (integers only: no parameters)."""
        # as SQLite's busy_timeout: wait this long for any lock (advisory or row), then fail
        parts = ["BEGIN", f"SET LOCAL lock_timeout = {max(1, int(self.db.lock_wait * 1000))}",
                 f"SELECT pg_advisory_xact_lock{'_shared' if self.shared else ''}"
                 f"({int(self.lock)})"]
        if self.key is not None:
            parts.append("SELECT pg_advisory_xact_lock(%d, %d)" % key_lock(self.key))
        return "; ".join(parts)

    def __enter__(self) -> Transaction:
        if self.db._current() is not None:
            raise RuntimeError("a transaction of this store is already open on this thread")
        with _as_sqlite_errors():
            self.raw = self.db.pool.getconn()
        try:
            with _as_sqlite_errors():
                self.raw.execute(self._opening())
        except BaseException:
            self._release(commit=False)
            raise
        tx = Transaction(self.raw)
        self.db._local.tx = tx
        return tx

    def __exit__(self, exc_type, exc, tb) -> None:
        self._release(commit=exc_type is None)

    def _release(self, *, commit: bool) -> None:
        self.db._local.tx = None
        raw, self.raw = self.raw, None
        try:
            with _as_sqlite_errors():
                raw.execute("COMMIT" if commit else "ROLLBACK")
        finally:
            self.db.pool.putconn(raw)


def schema_version(db: PgDatabase) -> int:
    row = db.execute("SELECT to_regclass('opsbot_schema') IS NOT NULL").fetchone()
    if not row[0]:
        return 0
    row = db.execute("SELECT version FROM opsbot_schema").fetchone()
    return int(row[0]) if row else 0


def apply_migrations(db: PgDatabase, migrations: list[list[str]]) -> int:
    """Apply the migrations this store has not seen yet, all in one transaction under an
    advisory lock (a second process starting at once waits, then finds them applied)."""
    with db.begin(MIGRATE_LOCK) as tx:
        tx.raw.execute("CREATE TABLE IF NOT EXISTS opsbot_schema (version BIGINT NOT NULL)")
        row = tx.raw.execute("SELECT version FROM opsbot_schema").fetchone()
        current = int(row[0]) if row else 0
        if row is None:
            tx.raw.execute("INSERT INTO opsbot_schema (version) VALUES (0)")
        for version, statements in enumerate(migrations, start=1):
            if version <= current:
                continue
            for sql in statements:
                tx.raw.execute(translate_ddl(sql))
            tx.raw.execute("UPDATE opsbot_schema SET version = %s", (version,))
    return schema_version(db)

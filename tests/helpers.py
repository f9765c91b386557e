"""Test helpers. The Feishu request builders live in :mod:`bot.standins.events` (``opsbot demo`` uses
them too) and are re-exported here, so tests keep importing ``tests.helpers``."""
from __future__ import annotations

import re

from bot.standins.card_rules import check_answer
from bot.standins.events import *  # noqa: F401,F403
from bot.standins.events import (ADMIN, CHAT, DIRECTORY, ENCRYPT_KEY, TOKEN, USER, _ids,  # noqa: F401
                          card_action_event, encrypt, legacy_card_action, message_event, sign,
                          sign_legacy, signed_event, url_verification)


def table_counts(db) -> dict[str, int]:
    """Rows per table that a rejected request must never touch."""
    return {name: db.execute(f"SELECT COUNT(*) FROM {name}").fetchone()[0]
            for name in ("inbox", "outbox", "batches", "tasks", "silences")}


_MARKUP = re.compile(r"&#?[0-9A-Za-z]+;|\*\*|`")


def checked_answer(answer):
    """``answer`` (a card-callback answer) after asserting Feishu would take it: the same rules
    as the fake Feishu applies to cards (:func:`bot.standins.card_rules.check_answer`, mentions of the
    fake's directory only, no ``<at id=all>``), and a toast that is plain text (Feishu shows
    toast content as typed: no markdown, no entities). Tests that press buttons call this."""
    problems = [str(v) for v in check_answer(answer, users=DIRECTORY)]
    content = ((answer or {}).get("toast") or {}).get("content") or ""
    if _MARKUP.search(content):
        problems.append(f"toast is not plain text: {content!r}")
    assert not problems, f"Feishu would refuse or mis-show this answer: {problems}"
    return answer


# --- the store, on either backend (SQLite in the SQLite pass, PostgreSQL in the PostgreSQL pass) --

_KEYS = {"inbox": "key", "batches": "id", "tasks": "id", "attempts": "id", "outbox": "id",
         "breakers": "service", "alerts": "key", "silences": "key", "kv": "key",
         "run_times": "id", "budgets": "key", "workers": "id"}


def table_rows(db, table: str) -> list[tuple]:
    """Every row of ``table`` in primary-key order (for before/after snapshots; SQLite's
    ``rowid`` does not exist on PostgreSQL)."""
    return [tuple(r) for r in db.execute(f"SELECT * FROM {table} ORDER BY {_KEYS[table]}")]


def table_names(db) -> set[str]:
    """The tables that exist in the store (from its own catalogue)."""
    from storage import pg
    from storage.db import path_of
    if pg.is_url(path_of(db)):
        sql = "SELECT tablename FROM pg_tables WHERE schemaname = current_schema()"
    else:
        sql = "SELECT name FROM sqlite_master WHERE type = 'table'"
    return {r[0] for r in db.execute(sql)}


def empty_store(db) -> None:
    """Delete every row of every table: the store as a fresh one, without making a new one."""
    from storage.db import transaction
    with transaction(db) as conn:
        for table in _KEYS:
            conn.execute(f"DELETE FROM {table}")


class held_write_lock:
    """Hold the store's write lock, as another process in the middle of a write would, until
    :meth:`release` (or the end of the ``with`` block). On SQLite that is ``BEGIN IMMEDIATE``
    on a connection of its own, on PostgreSQL the advisory lock every writer takes: both through
    ``storage.db.transaction`` on a second handle of the store at ``location``."""

    def __init__(self, location) -> None:
        from storage.db import open_db, transaction
        self.db = open_db(location, migrate=False)
        self._tx = transaction(self.db)
        self._held = False

    def acquire(self) -> "held_write_lock":
        self._tx.__enter__()
        self._held = True
        return self

    def release(self) -> None:
        if self._held:
            self._held = False
            self._tx.__exit__(None, None, None)

    def __enter__(self) -> "held_write_lock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Release the lock if it is still held, and close this second handle."""
        self.release()
        self.db.conn.close()


class StatementLog:
    """``db`` that records each statement and its parameters (in the storage functions' SQLite
    form, before any translation) as ``(sql, params)`` in :attr:`statements`; pass it where the
    code under test takes a store that it only reads through ``execute``/``query``."""

    def __init__(self, db) -> None:
        self.db = db
        self.statements: list[tuple[str, list]] = []

    def execute(self, sql, params=None):
        self.statements.append((sql, list(params or ())))
        return self.db.execute(sql, params) if params is not None else self.db.execute(sql)

    def query(self, sql, params=None):
        self.statements.append((sql, list(params or ())))
        return self.db.query(sql, params) if params is not None else self.db.query(sql)

    def __getattr__(self, name):
        return getattr(self.db, name)


def store_at_version(location, version: int):
    """Open the store at ``location`` with only the first ``version`` migrations applied, as an
    older opsbot left it; returns the handle (opened without migrating)."""
    from storage import pg
    from storage.db import open_db, transaction
    from storage.migrations import MIGRATIONS
    from storage.db import schema_version
    db = open_db(location, migrate=False)
    found = schema_version(db)
    if found != 0:
        db.conn.close()
        raise AssertionError(f"store_at_version needs an empty store, {location} is at version "
                             f"{found}: mark the test @pytest.mark.empty_database")
    if pg.is_url(location):
        pg.apply_migrations(db, MIGRATIONS[:version])
        return db
    for number, statements in enumerate(MIGRATIONS[:version], start=1):
        with transaction(db) as conn:
            for sql in statements:
                conn.execute(sql)
            conn.execute(f"PRAGMA user_version = {number}")
    return db

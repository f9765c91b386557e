"""Concurrency review of the shared/exclusive write lock (storage.pg): check-and-create of the
canary, who waits behind a waiting exclusive transaction, and the claim's index.

Races are made deterministic by holding a lock in an open transaction of a second connection
until every contender has reached it (PostgreSQL: seen waiting in ``pg_locks``; SQLite: its
``BEGIN IMMEDIATE`` seen by a trace callback), never by sleeping.
"""
from __future__ import annotations

import sqlite3
import threading
import time

import pytest

from bot.alerting.canary import Canary
from bot.alerting.router import AlertRouter
from bot.settings import AlertSettings, FeishuSettings, Settings
from pipeline.clock import FakeClock
from storage import pg, queue
from storage.db import open_db, set_lock_wait, transaction


@pytest.fixture
def pg_url(db_path):
    """The store's URL; the tests that take it run in the PostgreSQL pass only."""
    return str(db_path)


def _settings(db_path, **alerts):
    return Settings(feishu=FeishuSettings(alert_chat_id="oc_alerts", oncall_ids=("ou_oncall",)),
                    alerts=AlertSettings(**alerts), db_path=db_path)


def _wait_until(check, what: str, timeout: float = 60.0) -> None:
    """Poll ``check()`` until true (a bound for a broken test, not a timing assumption)."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def _advisory_waiters(url: str) -> int:
    import psycopg
    with psycopg.connect(url, autocommit=True) as c:
        return c.execute("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'"
                         " AND NOT granted AND database = (SELECT oid FROM pg_database"
                         " WHERE datname = current_database())").fetchone()[0]


class _WriteLockHolder:
    """Another process mid-write: holds the store's write lock (PostgreSQL: the exclusive
    advisory lock; SQLite: ``BEGIN IMMEDIATE``) until :meth:`release`."""

    def __init__(self, location) -> None:
        self.location = location
        if pg.is_url(location):
            import psycopg
            self.raw = psycopg.connect(str(location), autocommit=True)
            self.raw.execute("BEGIN")
            self.raw.execute("SELECT pg_advisory_xact_lock(%s)", (pg.WRITE_LOCK,))
        else:
            self.raw = sqlite3.connect(str(location), isolation_level=None)
            self.raw.execute("BEGIN IMMEDIATE")

    def release(self) -> None:
        if self.raw is not None:
            self.raw.execute("COMMIT")
            self.raw.close()
            self.raw = None


def test_two_canary_tickers_at_once_queue_one_canary(db_path, tmp_path):
    """Two workers tick the canary at the same moment, each with its own store connection.
    Both find no canary (reads never wait) while another writer holds the write lock; once it
    lets go, exactly one canary may be queued. (Checking outside the creating transaction, as
    before, queued two.)"""
    db = open_db(db_path)
    settings = _settings(db_path, canary_interval=600, canary_timeout=300,
                         canary_params={"topic": "canary"})
    clock = FakeClock(start=1_000_000)
    n = 2
    stores = [open_db(db_path, migrate=False) for _ in range(n)]
    reached = [threading.Event() for _ in range(n)]
    if not pg.is_url(db_path):
        for store, ev in zip(stores, reached):   # the ticker is about to wait for the lock
            store.conn.set_trace_callback(
                lambda sql, ev=ev: ev.set() if sql.lstrip().upper().startswith("BEGIN") else None)
    holder = _WriteLockHolder(db_path)
    results: list = [None] * n
    errors: list = []

    def tick(i):
        try:
            results[i] = Canary(stores[i], settings, clock,
                                AlertRouter(stores[i], settings, clock)).tick()
        except BaseException as exc:  # noqa: BLE001 - re-raised below
            errors.append(exc)

    threads = [threading.Thread(target=tick, args=(i,)) for i in range(n)]
    try:
        for t in threads:
            t.start()
        if pg.is_url(db_path):
            _wait_until(lambda: _advisory_waiters(str(db_path)) >= n, "both tickers")
        else:
            _wait_until(lambda: all(ev.is_set() for ev in reached), "both tickers")
        holder.release()
        for t in threads:
            t.join(60)
        if errors:
            raise errors[0]
        created = [r for r in results if r is not None]
        assert len(created) == 1
        rows = list(db.query("SELECT id FROM batches WHERE source = 'canary'"))
        assert [r["id"] for r in rows] == created
        # still one at a time afterwards, and due again after the interval
        assert Canary(db, settings, clock, AlertRouter(db, settings, clock)).tick() is None
        clock.advance(600)
        assert queue.get_batch(db, created[0])["status"] == "queued"   # still open, too old
        again = Canary(db, settings, clock, AlertRouter(db, settings, clock)).tick()
        assert again is not None and again != created[0]
    finally:
        holder.release()
        for store in stores:
            store.conn.close()
        db.conn.close()


def test_create_batch_when_due_checks_the_latest_batch_of_its_source(db_path):
    db = open_db(db_path)
    try:
        task = [{"task_key": "c", "params": {}}]
        first = queue.create_batch_when_due(db, task, now=1000.0, source="canary",
                                            every=600, open_for=300)
        assert first is not None
        # another source's batches do not count
        queue.create_batch(db, [{"task_key": "x", "params": {}}], now=1700.0, source="cli")
        for now in (1000.0, 1599.9):              # younger than ``every``
            assert queue.create_batch_when_due(db, task, now=now, source="canary",
                                               every=600, open_for=900) is None
        # old enough, but still open and younger than ``open_for``: not yet
        assert queue.create_batch_when_due(db, task, now=1600.0, source="canary",
                                           every=600, open_for=900) is None
        # finished: due at ``every``
        queue.set_batch_status(db, first, "done", now=1500.0)
        second = queue.create_batch_when_due(db, task, now=1600.0, source="canary",
                                             every=600, open_for=900)
        assert second not in (None, first)
        # open past ``open_for``: due again (the hung one is reported, not waited on forever)
        third = queue.create_batch_when_due(db, task, now=2500.0, source="canary",
                                            every=600, open_for=900, pipeline="p2")
        assert third not in (None, first, second)
        assert queue.get_batch(db, third)["pipeline"] == "p2"
        assert queue.get_batch(db, first)["pipeline"] == "default"
        assert [t["params"] for t in queue.tasks_of(db, third)] == ["{}"]
        with pytest.raises(ValueError):
            queue.create_batch_when_due(db, task * 2, now=9999.0, source="canary",
                                        every=600, open_for=300)
        assert len(list(db.query("SELECT id FROM batches WHERE source = 'canary'"))) == 3
    finally:
        db.conn.close()


@pytest.mark.backend("postgresql")
def test_a_waiting_exclusive_transaction_is_not_overtaken_by_shared_ones(pg_url):
    """A rare transaction that must run alone cannot starve: once it waits for the write lock,
    shared transactions that come later queue behind it (PostgreSQL's lock queue), so a stream
    of claims never keeps it out. Shown with a 1 s lock wait on the later claim, which fails
    because it waits behind the exclusive one while a first shared holder is still open."""
    db = open_db(pg_url)
    other = open_db(pg_url, migrate=False)
    batch = queue.create_batch(db, [{"task_key": f"k{i}", "params": {}} for i in range(3)],
                               now=100.0, source="cli")
    import psycopg
    raw = psycopg.connect(pg_url, autocommit=True)
    raw.execute("BEGIN")
    raw.execute("SELECT pg_advisory_xact_lock_shared(%s)", (pg.WRITE_LOCK,))
    done: list = []
    try:
        waiter = threading.Thread(target=lambda: done.append(
            queue.set_batch_status(other, batch, "paused", now=200.0)))
        waiter.start()
        _wait_until(lambda: _advisory_waiters(pg_url) >= 1, "the exclusive transaction")
        set_lock_wait(db, 1.0)
        with pytest.raises(sqlite3.OperationalError, match="database is locked"):
            queue.claim_tasks(db, owner="late", now=200.0, lease=60.0, limit=1)
        assert not done   # still behind the first shared holder
        raw.execute("COMMIT")
        waiter.join(60)
        assert done == ["queued"]
        assert queue.claim_tasks(db, owner="late", now=200.0, lease=60.0, limit=1) == []
    finally:
        raw.close()
        other.conn.close()
        db.conn.close()


def _explain_claim(db) -> str:
    """The plan of the claim's scan, on the backend of ``db`` (statistics fresh)."""
    db.execute("ANALYZE")
    if pg.is_url(getattr(db, "url", "")):
        due, args = queue._due_sql(owner="me", now=1000.0, limit=10, stage=None, wanted=(),
                                   lock=" FOR UPDATE OF t SKIP LOCKED")
        with transaction(db, concurrent=True) as conn:
            return "\n".join(r[0] for r in conn.execute("EXPLAIN " + due, args).fetchall())
    due, args = queue._due_sql(owner="me", now=1000.0, limit=10, stage=None, wanted=(),
                               sqlite=True)
    return "\n".join(str(r[3]) for r in db.execute("EXPLAIN QUERY PLAN " + due, args))


def test_the_claim_finds_expired_leases_without_reading_every_running_task(db_path):
    """Many running tasks hold valid leases, a few are a dead worker's: the claim's scan of
    running tasks seeks the expired leases through tasks_lease (status, lease_until) rather
    than reading every running task; and it takes those tasks, earliest ``next_at`` first."""
    db = open_db(db_path)
    try:
        batch = queue.create_batch(db, [], now=0.0, source="cli")
        rows = [(batch, f"r{i}", "{}", 0.0, "running", 100.0 + i, "alive", 10_000.0 + i)
                for i in range(4000)]
        rows += [(batch, f"d{i}", "{}", 0.0, "running", 60.0 - i, "dead", 10.0)
                 for i in range(3)]
        rows += [(batch, f"q{i}", "{}", 0.0, "queued", 5_000.0 + i, None, None)
                 for i in range(500)]
        with transaction(db) as conn:
            conn.executemany(
                "INSERT INTO tasks (batch_id, task_key, params, created_at, status, next_at,"
                " lease_owner, lease_until) VALUES (?, ?, ?, ?, ?, ?, ?, ?)", rows)
        plan = _explain_claim(db)
        assert "tasks_lease" in plan, plan
        claimed = queue.claim_tasks(db, owner="me", now=1000.0, lease=60.0, limit=2)
        assert sorted(t["task_key"] for t in claimed) == ["d1", "d2"]   # earliest next_at
        assert all(t["lease_owner"] == "me" for t in claimed)
        [last] = queue.claim_tasks(db, owner="me", now=1000.0, lease=60.0, limit=10)
        assert last["task_key"] == "d0"
        assert queue.claim_tasks(db, owner="me", now=1000.0, lease=60.0, limit=10) == []
    finally:
        db.conn.close()


@pytest.mark.backend("postgresql")
def test_a_metrics_scrape_counts_every_attempt_while_workers_record_them_at_once(pg_url):
    """/metrics reads attempts by id range (``AttemptTotals``: ids above the last scrape's
    highest). A worker whose attempt took id N and has not committed yet, while another worker
    commits id N+1, must not let a scrape move past N: the attempt would never be counted.
    The first worker is held mid-transaction (after its insert) by a trigger that waits for an
    advisory lock the test holds."""
    from bot.metrics import AttemptTotals
    import psycopg
    hold = 0x6F707374
    db = open_db(pg_url)
    stores = [open_db(pg_url, migrate=False) for _ in range(2)]
    gate = psycopg.connect(pg_url, autocommit=True)
    gate.execute("SELECT pg_advisory_lock(%s)", (hold,))
    db.execute("CREATE FUNCTION hold_attempt() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN"
               f" IF NEW.stage = 'held' THEN PERFORM pg_advisory_xact_lock_shared({hold});"
               " END IF; RETURN NEW; END $$")
    db.execute("CREATE TRIGGER hold_attempt AFTER INSERT ON attempts FOR EACH ROW"
               " EXECUTE FUNCTION hold_attempt()")
    batch = queue.create_batch(db, [{"task_key": "k", "params": {}}], now=100.0, source="cli")
    [task] = queue.tasks_of(db, batch)
    errors: list = []

    def record(store, stage):
        try:
            queue.record_attempt(store, task, stage=stage, started_at=100.0, ended_at=101.0,
                                 outcome="fail", error_class=stage)
        except BaseException as exc:  # noqa: BLE001 - re-raised below
            errors.append(exc)

    first = threading.Thread(target=record, args=(stores[0], "held"))
    second = threading.Thread(target=record, args=(stores[1], "coze"))
    totals = AttemptTotals()
    try:
        first.start()
        _wait_until(lambda: _advisory_waiters(pg_url) >= 1, "the first attempt to be held")
        second.start()
        # the second attempt either commits now (id N+1) or waits for the first
        _wait_until(lambda: not second.is_alive() or _advisory_waiters(pg_url) >= 2,
                    "the second attempt")
        totals.update(db)            # a scrape while the first is still open
        gate.execute("SELECT pg_advisory_unlock(%s)", (hold,))
        first.join(60)
        second.join(60)
        if errors:
            raise errors[0]
        totals.update(db)
        assert totals.by_class == {"held": 1, "coze": 1}
    finally:
        gate.close()
        for store in stores:
            store.conn.close()
        db.conn.close()


@pytest.mark.backend("postgresql")
def test_claims_start_queued_batches_in_id_order_so_two_claimers_cannot_deadlock(pg_url):
    """Two claimers each take tasks of the same two queued batches and start both. Another
    claimer (a second connection) has started the batch with the lower id and is about to start
    the higher: a claim must wait for it without holding the higher batch's row, or the two
    deadlock (the server then rolls one back: a failed claim). The higher-id batch is created
    first, so the table's physical order is the reverse of the id order."""
    db = open_db(pg_url)
    high = queue.create_batch(db, [{"task_key": "h", "params": {}}], now=100.0, source="cli",
                              batch_id="bz")
    low = queue.create_batch(db, [{"task_key": "l", "params": {}}], now=100.0, source="cli",
                             batch_id="ba")
    import psycopg
    other = psycopg.connect(pg_url, autocommit=True)
    other.execute("BEGIN")
    other.execute("SELECT pg_advisory_xact_lock_shared(%s)", (pg.WRITE_LOCK,))
    other.execute("UPDATE batches SET status = 'running' WHERE id = %s AND status = 'queued'",
                  (low,))
    got: list = []
    errors: list = []

    def claim():
        try:
            got.extend(queue.claim_tasks(db, owner="me", now=200.0, lease=60.0, limit=10))
        except BaseException as exc:  # noqa: BLE001 - re-raised below
            errors.append(exc)

    claimer = threading.Thread(target=claim)
    try:
        claimer.start()

        def waiting_on_a_row() -> bool:
            with psycopg.connect(pg_url, autocommit=True) as c:
                return c.execute("SELECT count(*) FROM pg_locks WHERE NOT granted AND"
                                 " locktype IN ('transactionid', 'tuple')").fetchone()[0] >= 1
        _wait_until(waiting_on_a_row, "the claim to wait for the other claimer")
        other.execute("SET LOCAL lock_timeout = '20s'")
        other.execute("UPDATE batches SET status = 'running' WHERE id = %s AND status = 'queued'",
                      (high,))
        other.execute("COMMIT")
        claimer.join(60)
        if errors:
            raise errors[0]
        assert sorted(t["task_key"] for t in got) == ["h", "l"]
        assert queue.batch_statuses(db, [low, high]) == {low: "running", high: "running"}
    finally:
        other.close()
        db.conn.close()

"""Concurrent writers on one store: claims, inbox dedup, the outbox, the QPS budget, finishing
batches. Each test runs on a SQLite file and on the test PostgreSQL server (``any_db_path``),
where the writers run in parallel (see :mod:`storage.pg`); the ``pg_url`` tests hold a lock in
an open transaction of a second connection and show who waits for it and who does not."""
from __future__ import annotations

import sqlite3
import threading
from collections import Counter

import pytest

from storage import budget, inbox, outbox, pg, queue
from storage.db import open_db, set_lock_wait, transaction
from tests.pg_server import fresh_database, server_url

THREADS = 4


@pytest.fixture
def pg_url(request):
    return fresh_database(server_url(request))


def _parallel(location, n, work):
    """Run ``work(db, i)`` on ``n`` threads, each with a store of its own, started together;
    return their results in thread order (re-raising the first failure)."""
    stores = [open_db(location, migrate=False) for _ in range(n)]
    results, errors = [None] * n, []
    start = threading.Barrier(n)

    def run(i):
        try:
            start.wait()
            results[i] = work(stores[i], i)
        except BaseException as exc:  # noqa: BLE001 - re-raised below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for store in stores:
        store.conn.close()
    if errors:
        raise errors[0]
    return results


def _batch(db, n, now=100.0):
    return queue.create_batch(db, [{"task_key": f"k{i}", "params": {}} for i in range(n)],
                              now=now, source="cli")


def _raw(url):
    """A second connection in an open transaction, as another process mid-write."""
    import psycopg
    raw = psycopg.connect(url, autocommit=True)
    raw.execute("BEGIN")
    return raw


# --- task claims -------------------------------------------------------------------------------

def test_concurrent_claimers_take_every_due_task_exactly_once(any_db_path):
    db = open_db(any_db_path)
    try:
        batch = _batch(db, 60)
        # a dead worker's tasks (lease run out) are due again, also exactly once
        dead = queue.claim_tasks(db, owner="dead", now=100.0, lease=5.0, limit=10)
        assert len(dead) == 10

        def claimer(store, i):
            got = []
            while True:
                rows = queue.claim_tasks(store, owner=f"w{i}", now=200.0, lease=600.0, limit=3)
                if not rows:
                    return got
                assert all(r["lease_owner"] == f"w{i}" and r["status"] == "running"
                           for r in rows)
                got += [r["id"] for r in rows]

        claimed = _parallel(any_db_path, THREADS, claimer)
        counts = Counter(i for got in claimed for i in got)
        assert [i for i, c in counts.items() if c > 1] == []
        assert sorted(counts) == [t["id"] for t in queue.tasks_of(db, batch)]
        owners = {t["id"]: t["lease_owner"] for t in queue.tasks_of(db, batch)}
        assert all(owners[i] == f"w{n}" for n, got in enumerate(claimed) for i in got)
        assert queue.get_batch(db, batch)["status"] == "running"
    finally:
        db.conn.close()


def test_a_claimer_holding_row_locks_does_not_block_another(pg_url):
    """Another claimer is mid-claim (its rows locked, not committed): a claim skips those
    rows and takes the rest at once; with a 1 ms lock wait it would fail if it waited. (The
    batch is already running: the first claims of a queued batch wait on its row to start it.)"""
    db = open_db(pg_url)
    raw = _raw(pg_url)
    try:
        batch = _batch(db, 7)
        [first] = queue.claim_tasks(db, owner="me", now=150.0, lease=600.0, limit=1)
        raw.execute("SELECT pg_advisory_xact_lock_shared(%s)", (pg.WRITE_LOCK,))
        theirs = queue._claim_skip_locked(pg.Transaction(raw), owner="other", now=200.0,
                                          lease=60.0, limit=2, stage=None, wanted=())
        assert len(theirs) == 2
        set_lock_wait(db, 0.001)
        mine = queue.claim_tasks(db, owner="me", now=200.0, lease=60.0, limit=10)
        assert {r["id"] for r in mine}.isdisjoint({r["id"] for r in theirs})
        assert len(mine) == 4
        raw.execute("ROLLBACK")   # the other claimer died before committing: its rows are due
        again = queue.claim_tasks(db, owner="me", now=200.0, lease=60.0, limit=10)
        assert sorted(r["id"] for r in again) == sorted(r["id"] for r in theirs)
        assert {t["lease_owner"] for t in queue.tasks_of(db, batch)} == {"me"}
    finally:
        raw.close()
        db.conn.close()


def test_rare_transactions_still_run_alone(pg_url):
    """While any writer holds the write lock shared (a claim in progress), a transaction that
    needs to run alone (cancelling a batch) waits for it, and fails as "database is locked"
    past its lock wait; a claim meanwhile does not wait."""
    db = open_db(pg_url)
    raw = _raw(pg_url)
    try:
        batch = _batch(db, 2)
        raw.execute("SELECT pg_advisory_xact_lock_shared(%s)", (pg.WRITE_LOCK,))
        set_lock_wait(db, 0.05)
        with pytest.raises(sqlite3.OperationalError, match="database is locked"):
            queue.set_batch_status(db, batch, "cancelled", now=200.0)
        assert len(queue.claim_tasks(db, owner="me", now=200.0, lease=60.0, limit=1)) == 1
        raw.execute("COMMIT")
        queue.set_batch_status(db, batch, "cancelled", now=200.0)
        assert queue.batch_counts(db, batch)["cancelled"] == 2
    finally:
        raw.close()
        db.conn.close()


def test_two_finishers_announce_a_batch_once(any_db_path):
    db = open_db(any_db_path)
    try:
        batches = []
        for n in range(8):
            batch = _batch(db, 1, now=100.0 + n)
            [task] = queue.claim_tasks(db, owner="w", now=200.0, lease=60.0, limit=1,
                                       batch_ids=[batch])
            queue.update_task(db, task["id"], owner="w", status="succeeded")
            batches.append(batch)
        finished = _parallel(any_db_path, THREADS,
                             lambda store, i: queue.finish_batches(store, now=300.0))
        counts = Counter(b for got in finished for b in got)
        assert counts == Counter({b: 1 for b in batches})
    finally:
        db.conn.close()


# --- the inbox -----------------------------------------------------------------------------------

def test_concurrent_deliveries_of_one_event_admit_exactly_one(any_db_path):
    db = open_db(any_db_path)
    try:
        keys = [f"msg-{n}" for n in range(10)]

        def deliver(store, i):
            return [inbox.record(store, key, event_type="im.message.receive_v1",
                                 payload={"from": i}, now=100.0 + i) for key in keys]

        admitted = _parallel(any_db_path, 6, deliver)
        for n, key in enumerate(keys):
            assert sum(got[n] for got in admitted) == 1, key
        assert inbox.pending(db) == len(keys)
    finally:
        db.conn.close()


def test_concurrent_inbox_claims_are_disjoint(any_db_path):
    db = open_db(any_db_path)
    try:
        for n in range(40):
            inbox.record(db, f"e{n}", event_type="t", payload={"n": n}, now=100.0 + n)

        def handler(store, i):
            got = []
            while rows := inbox.claim(store, owner=f"h{i}", now=500.0, lease=60.0, limit=4):
                assert [r["received_at"] for r in rows] == sorted(r["received_at"] for r in rows)
                got += [r["key"] for r in rows]
            return got

        claimed = _parallel(any_db_path, THREADS, handler)
        counts = Counter(k for got in claimed for k in got)
        assert sorted(counts.values()) == [1] * 40
        by_key = inbox.claim(db, owner="x", now=500.0, key="e3")
        assert by_key == []   # leased to a handler
        assert [r["key"] for r in inbox.claim(db, owner="x", now=1000.0, key="e3")] == ["e3"]
    finally:
        db.conn.close()


def test_an_inbox_claim_skips_rows_another_handler_holds(pg_url):
    db = open_db(pg_url)
    raw = _raw(pg_url)
    try:
        for n in range(3):
            inbox.record(db, f"e{n}", event_type="t", payload={}, now=100.0 + n)
        raw.execute("SELECT key FROM inbox WHERE key = 'e0' FOR UPDATE")
        set_lock_wait(db, 0.001)
        assert [r["key"] for r in inbox.claim(db, owner="me", now=200.0)] == ["e1", "e2"]
    finally:
        raw.close()
        db.conn.close()


# --- the outbox ----------------------------------------------------------------------------------

def test_concurrent_senders_claim_each_outbox_row_once_and_in_order_per_target(any_db_path):
    db = open_db(any_db_path)
    try:
        for n in range(30):
            outbox.enqueue(db, "send", f"chat-{n % 3}", {"n": n}, now=100.0)
        sent: list[tuple[str, int]] = []
        log = threading.Lock()

        def sender(store, i):
            got = []
            while rows := outbox.claim_due(store, owner=f"s{i}", now=200.0, limit=4):
                for row in rows:   # claimed rows of a target are the oldest of that target
                    with log:
                        sent.append((row["target"], row["id"]))
                    assert outbox.mark_sent(store, row["id"], now=200.0, owner=f"s{i}")
                    got.append(row["id"])
            return got

        claimed = _parallel(any_db_path, THREADS, sender)
        counts = Counter(r for got in claimed for r in got)
        assert sorted(counts.values()) == [1] * 30
        for target in ("chat-0", "chat-1", "chat-2"):
            ids = [r for t, r in sent if t == target]
            assert ids == sorted(ids), target
    finally:
        db.conn.close()


# --- the Coze QPS budget and breakers ---------------------------------------------------------

def test_concurrent_reservations_never_exceed_the_budget(any_db_path):
    """Six processes' worth of callers reserve slots of one account (no row yet) at the same
    instant: no slot is handed out twice, and consecutive slots are at least 1 / rate apart."""
    policy = budget.RatePolicy(rate=10.0, min_rate=1.0, recovery=60.0)
    key = budget.account_key("https://api.coze.cn", "token")
    db = open_db(any_db_path)
    try:
        def caller(store, i):
            return [s for n in range(8)
                    for s in budget.reserve(store, key, policy, now=1000.0,
                                            count=1 + (i + n) % 3).slots()]

        slots = sorted(s for got in _parallel(any_db_path, 6, caller) for s in got)
        gaps = [b - a for a, b in zip(slots, slots[1:])]
        assert min(gaps) >= 0.1 - 1e-9
        # slots within [1000, 1000 + t) never exceed the budget of rate * t (+ the one at 0)
        assert all(sum(1 for s in slots if s < 1000.0 + t) <= 10 * t + 1 for t in range(1, 12))
    finally:
        db.conn.close()


def test_budget_and_breaker_locks_are_per_key(pg_url):
    """A budget or breaker write waits only for writers of the same account or service."""
    from pipeline.breaker import Breaker, BreakerPolicy
    policy = budget.RatePolicy(rate=10.0, min_rate=1.0, recovery=60.0)
    db = open_db(pg_url)
    raw = _raw(pg_url)
    try:
        raw.execute("SELECT pg_advisory_xact_lock_shared(%s)", (pg.WRITE_LOCK,))
        raw.execute("SELECT pg_advisory_xact_lock(%s, %s)", pg.key_lock("budget:a"))
        raw.execute("SELECT pg_advisory_xact_lock(%s, %s)", pg.key_lock("breaker:coze"))
        set_lock_wait(db, 0.05)
        assert budget.reserve(db, "b", policy, now=1.0, count=2).count == 2
        with pytest.raises(sqlite3.OperationalError, match="database is locked"):
            budget.reserve(db, "a", policy, now=1.0, count=1)
        Breaker(db, "feishu", BreakerPolicy(), now=lambda: 1.0).record_failure("x")
        with pytest.raises(sqlite3.OperationalError, match="database is locked"):
            Breaker(db, "coze", BreakerPolicy(), now=lambda: 1.0).record_failure("x")
        raw.execute("COMMIT")
        assert budget.reserve(db, "a", policy, now=1.0, count=1).first == 1.0
    finally:
        raw.close()
        db.conn.close()


def test_key_locks_are_distinct_and_apart_from_the_write_lock():
    keys = [f"budget:{n}" for n in range(500)] + ["outbox", "coze-in-flight", "breaker:coze"]
    locks = {pg.key_lock(k) for k in keys}
    assert len(locks) == len(keys)
    assert all(cls == pg.KEY_LOCKS and -2**31 <= h < 2**31 for cls, h in locks)
    assert pg.key_lock("outbox") == pg.key_lock("outbox")   # the same in every process


def test_with_sqlite_every_transaction_still_runs_alone(tmp_path):
    """``concurrent`` and ``key`` mean nothing on SQLite: its one writer runs every block alone."""
    path = tmp_path / "s.db"
    one, two = open_db(path), open_db(path)
    try:
        set_lock_wait(two, 0.05)
        with transaction(one, concurrent=True, key="outbox"):
            one.execute("INSERT INTO kv (key, value, updated_at) VALUES ('a', '1', 1)")
            with pytest.raises(sqlite3.OperationalError, match="database is locked"):
                with transaction(two, concurrent=True, key="other"):
                    two.execute("INSERT INTO kv (key, value, updated_at) VALUES ('b', '1', 1)")
    finally:
        one.conn.close(), two.conn.close()


def test_outbox_writes_take_turns_and_hold_up_nothing_else(pg_url):
    """A sender mid-claim holds the outbox's key: another sender's mark waits for it (a retry
    committed under a claim's feet could let a newer message of the chat go first), while a
    task update, an inbox delivery and a budget reservation go ahead."""
    db = open_db(pg_url)
    raw = _raw(pg_url)
    try:
        uuid = outbox.enqueue(db, "send", "chat-1", {"n": 1}, now=100.0)
        [row] = outbox.claim_due(db, owner="s1", now=100.0)
        batch = _batch(db, 1)
        [task] = queue.claim_tasks(db, owner="w", now=200.0, lease=60.0, limit=1)
        raw.execute("SELECT pg_advisory_xact_lock_shared(%s)", (pg.WRITE_LOCK,))
        raw.execute("SELECT pg_advisory_xact_lock(%s, %s)", pg.key_lock(outbox.WRITES))
        set_lock_wait(db, 0.05)
        with pytest.raises(sqlite3.OperationalError, match="database is locked"):
            outbox.mark_retry(db, row["id"], now=101.0, next_at=200.0, error="x", owner="s1")
        with pytest.raises(sqlite3.OperationalError, match="database is locked"):
            outbox.enqueue(db, "send", "chat-2", {"n": 2}, now=101.0)
        assert queue.update_task(db, task["id"], owner="w", status="succeeded")
        assert inbox.record(db, "e1", event_type="t", payload={}, now=101.0)
        policy = budget.RatePolicy(rate=10.0, min_rate=1.0, recovery=60.0)
        assert budget.reserve(db, "acct", policy, now=101.0, count=1).count == 1
        raw.execute("COMMIT")
        assert outbox.mark_sent(db, row["id"], now=102.0, owner="s1")
        assert outbox.status_of(db, uuid) == "sent"
        assert queue.finish_batches(db, now=103.0) == [batch]
    finally:
        raw.close()
        db.conn.close()

"""Storage on real SQLite files and on a real PostgreSQL server (each test that takes ``db`` or
``db_path`` runs in both backend passes; see tests/conftest.py): migrations, queue claims and
leases, inbox dedup, outbox, kv."""
from __future__ import annotations

import multiprocessing

import pytest

from pipeline.breaker import Breaker, all_states, reset_all
from pipeline.config import BreakerPolicy
from storage import inbox, outbox, queue
from storage.db import Conflict, NotFound, apply_migrations, open_db, schema_version
from storage.migrations import MIGRATIONS


@pytest.mark.backend("sqlite", reason="a SQLite file's folders and WAL journal mode")
def test_open_creates_folders_uses_wal_and_migrates_once(tmp_path):
    path = tmp_path / "deep" / "dir" / "o.db"
    db = open_db(path)
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert schema_version(db) == len(MIGRATIONS)
    assert apply_migrations(db) == len(MIGRATIONS)  # idempotent
    assert {"tasks", "batches", "outbox", "inbox", "breakers", "alerts"} <= set(db.table_names())


def _open(path):
    db = open_db(path)
    return schema_version(db)


@pytest.mark.empty_database
def test_two_processes_migrating_at_once_agree(db_path):
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        versions = pool.map(_open, [db_path, db_path])
    assert versions == [len(MIGRATIONS)] * 2


def test_create_batch_is_all_or_nothing(db):
    with pytest.raises(ValueError, match="duplicate task_id: a"):
        queue.create_batch(db, [{"task_key": "a"}, {"task_key": "a"}], now=1, source="cli")
    assert db.execute("SELECT COUNT(*) FROM batches").fetchone()[0] == 0
    assert db.execute("SELECT COUNT(*) FROM tasks").fetchone()[0] == 0


def test_claim_respects_limit_lease_and_batch_status(db):
    b = queue.create_batch(db, [{"task_key": f"t{i}"} for i in range(5)], now=0, source="cli")
    got = queue.claim_tasks(db, owner="w1", now=10, lease=30, limit=3)
    assert [t["task_key"] for t in got] == ["t0", "t1", "t2"]
    assert queue.get_batch(db, b)["status"] == "running"
    # another worker gets only the rest, never a leased task
    got2 = queue.claim_tasks(db, owner="w2", now=11, lease=30, limit=10)
    assert [t["task_key"] for t in got2] == ["t3", "t4"]
    assert queue.claim_tasks(db, owner="w3", now=12, lease=30, limit=10) == []
    # w1's lease runs out: its tasks can be taken over
    again = queue.claim_tasks(db, owner="w3", now=41, lease=30, limit=10)
    assert {t["task_key"] for t in again} == {"t0", "t1", "t2"}
    # the old owner can no longer write
    assert not queue.update_task(db, got[0]["id"], owner="w1", status="succeeded")
    assert queue.update_task(db, got[0]["id"], owner="w3", status="succeeded")


def test_paused_batches_are_not_claimed_and_lost_leases_are_reported(db):
    b = queue.create_batch(db, [{"task_key": "a"}, {"task_key": "b"}], now=0, source="cli")
    queue.set_batch_status(db, b, "paused", now=1)
    assert queue.claim_tasks(db, owner="w", now=2, lease=10, limit=5) == []
    assert not queue.has_pending_work(db)
    queue.set_batch_status(db, b, "running", now=3, allowed_from=["paused"])
    [a, bb] = queue.claim_tasks(db, owner="w", now=4, lease=10, limit=5)
    assert queue.renew_leases(db, [a["id"], bb["id"]], owner="w", now=5, lease=10) == set()
    queue.claim_tasks(db, owner="x", now=100, lease=10, limit=1)  # x steals a
    assert queue.renew_leases(db, [a["id"], bb["id"]], owner="w", now=101, lease=10) == {a["id"]}


def test_set_batch_status_errors(db):
    with pytest.raises(NotFound):
        queue.set_batch_status(db, "nope", "paused", now=0)
    b = queue.create_batch(db, [{"task_key": "a"}], now=0, source="cli")
    with pytest.raises(Conflict):
        queue.set_batch_status(db, b, "running", now=0, allowed_from=["paused"])


def test_cancel_cancels_unfinished_tasks_only(db):
    b = queue.create_batch(db, [{"task_key": "a"}, {"task_key": "b"}], now=0, source="cli")
    [a, _] = queue.claim_tasks(db, owner="w", now=1, lease=10, limit=2)
    queue.update_task(db, a["id"], owner="w", status="succeeded")
    queue.set_batch_status(db, b, "cancelled", now=2)
    counts = queue.batch_counts(db, b)
    assert counts["succeeded"] == 1 and counts["cancelled"] == 1


def test_requeue_only_failed_and_clears_the_old_run(db):
    b = queue.create_batch(db, [{"task_key": "a"}, {"task_key": "b"}], now=0, source="cli")
    [a, bb] = queue.claim_tasks(db, owner="w", now=1, lease=10, limit=2)
    queue.update_task(db, a["id"], owner="w", status="failed", execute_id="e1")
    queue.update_task(db, bb["id"], owner="w", status="succeeded")
    assert queue.finish_batches(db, now=3) == [b]
    assert queue.requeue_tasks(db, [a["id"], bb["id"]], now=4) == 1
    row = queue.get_task(db, a["id"])
    assert row["status"] == "queued" and row["execute_id"] is None
    assert queue.get_batch(db, b)["status"] == "running"


def test_inbox_dedups_across_connections_and_claims_once(db_path):
    one, two = open_db(db_path), open_db(db_path)
    assert inbox.record(one, "msg:om_1", event_type="im.message.receive_v1", payload={},
                        now=1, event_id="e1")
    assert not inbox.record(two, "msg:om_1", event_type="im.message.receive_v1", payload={},
                            now=2, event_id="e2")
    assert len(inbox.claim(one, owner="a", now=3)) == 1
    assert inbox.claim(two, owner="b", now=3) == []
    inbox.finish(one, "msg:om_1", now=4)
    assert inbox.pending(two) == 0


def test_outbox_keeps_order_per_target_and_is_idempotent(db):
    u1 = outbox.enqueue(db, "send", "oc_1", {"text": "1"}, now=0, uuid="u1")
    assert outbox.enqueue(db, "send", "oc_1", {"text": "dup"}, now=0, uuid="u1") == u1
    outbox.enqueue(db, "send", "oc_1", {"text": "2"}, now=0, uuid="u2")
    outbox.enqueue(db, "send", "oc_2", {"text": "x"}, now=0, uuid="u3")
    rows = outbox.claim_due(db, owner="s", now=1)
    assert [r["uuid"] for r in rows] == ["u1", "u2", "u3"]
    assert rows[0]["payload"] == {"text": "1"}
    # u1 fails and is pushed back: u2 (same chat) must wait behind it, u3 need not
    outbox.mark_retry(db, rows[0]["id"], now=1, next_at=50, error="500")
    outbox.mark_sent(db, rows[2]["id"], now=1, result="om_x")
    db.execute("UPDATE outbox SET lease_until = NULL")
    again = outbox.claim_due(db, owner="s", now=2)
    assert [r["uuid"] for r in again] == []
    assert outbox.result_of(db, "u3") == "om_x"
    assert [r["uuid"] for r in outbox.claim_due(db, owner="s", now=51)] == ["u1", "u2"]
    with pytest.raises(ValueError):
        outbox.enqueue(db, "email", "x", {}, now=0)


def test_breaker_opens_half_opens_and_closes(db):
    now = [0.0]
    changes = []
    br = Breaker(db, "coze", BreakerPolicy(5, 60, 3), lambda: now[0],
                 on_change=lambda a, b: changes.append(b.state))
    for _ in range(4):
        br.record_failure("500")
    assert br.allow()
    br.record_failure("500")
    assert not br.allow() and br.state().state == "open"
    now[0] = 59
    assert not br.allow()
    now[0] = 60
    assert br.allow() and br.state().state == "half_open"
    br.record_success(); br.record_success()
    assert br.state().state == "half_open"
    br.record_success()
    assert br.state().state == "closed"
    assert changes == ["open", "half_open", "closed"]


def test_a_failure_in_half_open_reopens_and_manual_trip_waits_for_a_human(db):
    now = [0.0]
    br = Breaker(db, "coze", BreakerPolicy(1, 10, 1), lambda: now[0])
    br.record_failure("x")
    now[0] = 10
    assert br.allow()
    br.record_failure("again")
    assert br.state().state == "open" and br.state().opened_at == 10
    br.trip("auth: token invalid")
    now[0] = 10_000
    assert not br.allow() and br.retry_at() is None
    assert reset_all(db, now=now[0]) == 1
    assert br.allow() and all_states(db)[0].state == "closed"


def test_outbox_order_holds_across_two_senders(db):
    outbox.enqueue(db, "send", "oc_1", {"n": 1}, now=0, uuid="first")
    outbox.enqueue(db, "send", "oc_1", {"n": 2}, now=0, uuid="second")
    outbox.enqueue(db, "send", "oc_2", {"n": 3}, now=0, uuid="other")
    a = outbox.claim_due(db, owner="web", now=1, limit=1)
    assert [r["uuid"] for r in a] == ["first"]
    # while "first" is in flight with another sender, "second" must wait; other chats need not
    assert [r["uuid"] for r in outbox.claim_due(db, owner="worker", now=1)] == ["other"]
    outbox.mark_sent(db, a[0]["id"], now=2, result="om_1")
    assert [r["uuid"] for r in outbox.claim_due(db, owner="worker", now=2)] == ["second"]
    assert outbox.claim_due(db, owner="x", now=3, uuids=("nope",)) == []


def test_prune_drops_only_old_handled_rows(db):
    from storage.db import prune

    day = 86400
    inbox.record(db, "msg:old", event_type="im.message.receive_v1", payload={}, now=0)
    inbox.finish(db, "msg:old", now=1)
    inbox.record(db, "msg:old_unhandled", event_type="im.message.receive_v1", payload={}, now=0)
    inbox.record(db, "msg:new", event_type="im.message.receive_v1", payload={}, now=9 * day)
    inbox.finish(db, "msg:new", now=9 * day)
    outbox.enqueue(db, "send", "oc", {"text": "a"}, now=0, uuid="sent-old")
    outbox.enqueue(db, "send", "oc", {"text": "b"}, now=0, uuid="pending-old")
    [row, _] = outbox.claim_due(db, owner="s", now=1)
    outbox.mark_sent(db, row["id"], now=1, result="om")
    assert prune(db, now=10 * day) == {"inbox": 1, "outbox": 1}
    keys = {r[0] for r in db.execute("SELECT key FROM inbox")}
    assert keys == {"msg:old_unhandled", "msg:new"}
    assert [r[0] for r in db.execute("SELECT uuid FROM outbox")] == ["pending-old"]


def test_outbox_marks_and_lease_extensions_belong_to_the_row_holder(db):
    u = outbox.enqueue(db, "send", "oc_a", {"text": "x"}, now=0)
    [row] = outbox.claim_due(db, owner="s1", now=1, lease=10)
    # s1's lease runs out and s2 takes the row over
    [again] = outbox.claim_due(db, owner="s2", now=20, lease=10)
    assert again["id"] == row["id"]
    assert not outbox.extend_lease(db, row["id"], owner="s1", until=500)
    assert not outbox.mark_retry(db, row["id"], now=21, next_at=99, error="late", owner="s1")
    assert not outbox.mark_sent(db, row["id"], now=21, result="om_1", owner="s1")
    assert outbox.status_of(db, u) == "pending"
    got = db.execute("SELECT lease_owner, lease_until, attempts FROM outbox").fetchone()
    assert tuple(got) == ("s2", 30, 0)
    assert outbox.extend_lease(db, row["id"], owner="s2", until=500)
    assert outbox.extend_lease(db, row["id"], owner="s2", until=40)      # never shortens
    assert db.execute("SELECT lease_until FROM outbox").fetchone()[0] == 500
    assert outbox.claim_due(db, owner="s3", now=100) == []
    assert outbox.mark_sent(db, row["id"], now=101, result="om_1", owner="s2")
    assert outbox.result_of(db, u) == "om_1"
    assert not outbox.extend_lease(db, row["id"], owner="s2", until=900)  # sent: nothing held


def test_kv_put_in_commits_and_rolls_back_with_the_callers_transaction(db):
    from storage import kv
    from storage.db import transaction
    with pytest.raises(RuntimeError):
        with transaction(db) as conn:
            kv.put_in(conn, "cursor", "7", now=1)
            assert kv.get(conn, "cursor") == "7"               # visible inside
            raise RuntimeError("the rest of the transaction failed")
    assert kv.get(db, "cursor") is None
    with transaction(db) as conn:
        kv.put_in(conn, "cursor", "8", now=2)
    kv.put(db, "other", "x", now=3)
    assert (kv.get(db, "cursor"), kv.get(db, "other")) == ("8", "x")

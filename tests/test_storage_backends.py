"""The storage functions whose SQL differs most between SQLite and PostgreSQL, run on both
backends (``db_path``: a SQLite file in the SQLite pass, a database on the test PostgreSQL
server in the PostgreSQL pass; see tests/conftest.py), plus the one-place SQL translation, the
URL handling and doctor's check."""
from __future__ import annotations

import json

import pytest

from storage import alerts, budget, kv, metrics, pg, queue, reports
from storage.db import open_db, transaction


def _fail(db, task, *, error_class, now):
    [claimed] = queue.claim_tasks(db, owner="w", now=now, lease=30, limit=1,
                                  batch_ids=[task["batch_id"]])
    assert claimed["id"] == task["id"]
    assert queue.update_task(db, task["id"], owner="w", status="failed", finished_at=now,
                             error_class=error_class, error_message=f"boom {task['task_key']}")


def test_task_sets_by_id_list_status_and_null_matching_class(db):
    b = queue.create_batch(db, [{"task_key": k} for k in "abcd"], now=0, source="cli")
    tasks = queue.tasks_of(db, b)
    ids = [t["id"] for t in tasks]
    _fail(db, tasks[0], error_class="timeout", now=1)
    _fail(db, tasks[1], error_class=None, now=2)
    assert queue.ids_with_status(db, ids, ["failed"]) == ids[:2]
    assert queue.ids_with_status(db, [ids[2], 99999], ["failed", "queued"]) == [ids[2]]
    assert queue.count_with_status(db, ids, ["failed"]) == 2
    assert queue.count_with_status(db, ids, ["failed"], negate=True) == 2
    # None matches a missing class (SQLite ``IS ?``), a class matches only itself
    assert queue.failed_examples(db, b, None, limit=5) == [("b", "boom b")]
    assert queue.failed_examples(db, b, "timeout", limit=5) == [("a", "boom a")]
    assert queue.finished_since(db, 0) == (2, 2)
    assert queue.finished_since(db, 2) == (1, 1)
    assert queue.ignore_failed(db, [ids[0], ids[2]]) == 1
    assert queue.count_with_status(db, ids, ["ignored"]) == 1


def test_batches_created_at_the_same_second_come_newest_first(db):
    first = queue.create_batch(db, [{"task_key": "x"}], now=5, source="canary")
    second = queue.create_batch(db, [{"task_key": "y"}], now=5, source="canary")
    assert queue.latest_batch(db)["id"] == second
    assert [b["id"] for b in queue.list_batches(db)] == [second, first]
    assert queue.latest_batch_from(db, "canary")["id"] == second
    assert queue.latest_batch_id_with_status(db, "queued") == second
    assert queue.latest_batch_from(db, "chat") is None


def test_report_and_metric_aggregates_are_numbers(db):
    b = queue.create_batch(db, [{"task_key": "t"}], now=0, source="cli")
    [task] = queue.tasks_of(db, b)
    queue.record_attempt(db, task, stage="coze", started_at=10, ended_at=14, outcome="success")
    queue.record_attempt(db, task, stage="coze", started_at=20, ended_at=19, outcome="retry")
    queue.record_attempt(db, task, stage="gate", started_at=30, ended_at=31,
                         outcome="resubmit")
    assert dict(reports.seconds_by_stage(db, 0, 100)) == {"coze": 4, "gate": 1}
    assert reports.gate_counts(db, 0, 100) == (1, 0)
    hi = metrics.last_attempt_id(db)
    [row] = metrics.stage_durations(db, 0, hi, [1.0, 5.0])
    assert tuple(row) == ("coze", 0, 1, 4, 1)
    assert json.dumps(list(row))   # plain ints and floats, not Decimal


def test_held_alerts_by_json_field(db):
    for key, held in (("a", "k1"), ("b", "k2"), ("c", "k1")):
        alerts.save(db, {"key": key, "tier": "p2", "status": "open", "count": 1,
                         "first_at": 1, "last_at": 1, "details": {"held_by": held}})
    with transaction(db) as conn:
        assert list(alerts.held_by_in(conn, "k1")) == ["a", "c"]


def test_slow_down_keeps_the_later_pause(db):
    policy = budget.RatePolicy(rate=2.0, min_rate=0.5, recovery=60.0)
    key = budget.account_key("https://api.coze.cn", "token")
    budget.slow_down(db, key, policy, now=100, seconds=30)
    budget.slow_down(db, key, policy, now=101, seconds=5)     # earlier end: the pause stays
    row = db.execute("SELECT paused_until, reduced_rate FROM budgets").fetchone()
    assert row[0] == 130 and row[1] == 0.5


def test_kv_writes_overwrite_and_roll_back(db):
    kv.put(db, "a", "1", now=1)
    kv.put(db, "a", "2", now=2)
    with pytest.raises(RuntimeError):
        with transaction(db) as conn:
            kv.put_in(conn, "a", "3", now=3)
            raise RuntimeError("rolled back")
    assert kv.get(db, "a") == "2"


@pytest.mark.parametrize("sqlite_sql, pg_sql", [
    ("INSERT OR IGNORE INTO t (a, b) VALUES (?, ?)",
     "INSERT INTO t (a, b) VALUES (%s, %s) ON CONFLICT DO NOTHING"),
    ("SELECT SUM(MAX(0, a - b)), MAX(id), MIN(x, ?) FROM t",
     "SELECT SUM(GREATEST(0, a - b)), MAX(id), LEAST(x, %s) FROM t"),
    ("SELECT COALESCE(SUM(s = 'f'), 0), SUM(d <= 1.5), SUM(d) FROM t",
     "SELECT COALESCE(SUM(CASE WHEN s = 'f' THEN 1 ELSE 0 END), 0),"
     " SUM(CASE WHEN d <= 1.5 THEN 1 ELSE 0 END), SUM(d) FROM t"),
    ("SELECT 1 FROM t WHERE a IS ? AND b IS NOT ? AND c IS NULL",
     "SELECT 1 FROM t WHERE a IS NOT DISTINCT FROM %s AND b IS DISTINCT FROM %s AND c IS NULL"),
    ("SELECT id FROM t WHERE id IN (SELECT value FROM json_each(?))"
     " AND s IN (SELECT value FROM json_each(?))",
     "SELECT id FROM t WHERE id IN (SELECT value::bigint FROM jsonb_array_elements_text(%s::jsonb))"
     " AND s IN (SELECT value FROM jsonb_array_elements_text(%s::jsonb))"),
    ("SELECT k FROM a WHERE json_extract(details, '$.held_by') = ?",
     "SELECT k FROM a WHERE (details::jsonb ->> 'held_by') = %s"),
    ("SELECT '?', '50%' FROM t WHERE a = ?", "SELECT '?', '50%%' FROM t WHERE a = %s"),
])
def test_translation(sqlite_sql, pg_sql):
    assert pg.translate(sqlite_sql) == pg_sql


def test_translation_refuses_unbalanced_sql():
    with pytest.raises(ValueError, match="unbalanced"):
        pg.translate("SELECT MAX(a, (b) FROM t")


def test_ddl_translation():
    assert pg.translate_ddl("CREATE TABLE x (id INTEGER PRIMARY KEY AUTOINCREMENT, t REAL)") == (
        "CREATE TABLE x (id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,"
        " t DOUBLE PRECISION)")
    assert "rowid BIGINT GENERATED ALWAYS AS IDENTITY" in pg.translate_ddl(
        "CREATE TABLE batches (\n id TEXT PRIMARY KEY\n)")


def test_settings_keep_a_postgres_url_and_doctor_hides_its_password(tmp_path):
    from bot.settings import load_settings
    url = "postgresql://ops:s3cret@127.0.0.1:1/opsbot"
    settings = load_settings({"OPSBOT_DB": url})
    assert settings.db_path == url
    path = str(tmp_path / "o.db")
    assert str(load_settings({"OPSBOT_DB": path}).db_path) == path
    assert pg.redacted(f"cannot reach {url}") == "cannot reach postgresql://ops:***@127.0.0.1:1/opsbot"


def test_an_unreachable_server_is_a_store_error_with_its_reason_and_without_the_password():
    import sqlite3
    with pytest.raises(sqlite3.OperationalError) as caught:
        open_db("postgresql://ops:s3cret@127.0.0.1:1/opsbot")
    assert "s3cret" not in str(caught.value)
    assert "postgresql: connection failed" in str(caught.value)


def test_a_writer_waits_for_the_write_lock_then_fails_as_locked(db_path):
    """Two connections: while one holds a write transaction, the other's write waits up to its
    lock wait and then fails as SQLite's busy timeout does ("database is locked")."""
    import sqlite3
    from storage.db import set_lock_wait
    one, two = open_db(db_path), open_db(db_path)
    try:
        set_lock_wait(two, 0.2)
        with transaction(one):
            one.execute("INSERT INTO kv (key, value, updated_at) VALUES ('a', '1', 1)")
            with pytest.raises(sqlite3.OperationalError, match="database is locked"):
                kv.put(two, "b", "2", now=2)
        kv.put(two, "b", "2", now=2)
        assert (kv.get(two, "a"), kv.get(two, "b")) == ("1", "2")
    finally:
        one.conn.close(), two.conn.close()


def test_workers_rows_and_a_dead_owners_tasks_by_stage(db):
    from storage import workers
    workers.register(db, id="h:1:a", hostname="h", pid=1, pid_ns="ns", proc_start=5,
                     stages=["synthesis", "coze"], now=10)
    workers.register(db, id="h:2:b", hostname="h", pid=2, pid_ns=None, proc_start=None,
                     stages=["coze"], now=10)
    workers.heartbeat(db, "h:1:a", now=50)
    workers.stopped(db, "h:2:b", now=20)
    assert [w["id"] for w in workers.live(db, now=60, within=15)] == ["h:1:a"]
    assert workers.get(db, ["h:1:a"])["h:1:a"]["stages"] == "coze,synthesis"
    b = queue.create_batch(db, [{"task_key": "t"}], now=0, source="cli")
    [task] = queue.claim_tasks(db, owner="h:1:a", now=1, lease=30, limit=5, stage="coze")
    assert queue.claim_tasks(db, owner="h:3:c", now=2, lease=30, limit=5, stage="coze") == []
    assert queue.running_owners(db) == ["h:1:a"]
    assert queue.has_pending_work(db, [b], stages=["coze"])
    assert not queue.has_pending_work(db, [b], stages=["synthesis"])
    assert queue.expire_leases_of(db, ["h:1:a"]) == 1
    [again] = queue.claim_tasks(db, owner="h:3:c", now=3, lease=30, limit=5, stage="coze")
    assert again["id"] == task["id"]
    workers.register(db, id="h:3:c", hostname="h", pid=3, pid_ns=None, proc_start=None,
                     stages=["coze"], now=10)
    # silent for over a week: forgotten, unless it holds a running task (h:3:c)
    assert workers.prune(db, now=60 + 8 * 86400) == 2
    assert list(workers.get(db, ["h:1:a", "h:2:b", "h:3:c"])) == ["h:3:c"]


def test_a_closed_store_says_so(db_path):
    from storage.db import is_closed
    store = open_db(db_path)
    assert not is_closed(store)
    store.conn.close()
    assert is_closed(store)

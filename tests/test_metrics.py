"""Prometheus text from a real store: every line parses, and the numbers are the store's."""
from __future__ import annotations

import re

import pytest

from bot.metrics import WEBHOOK_LATENCY, WEBHOOK_REQUESTS, render_metrics
from pipeline.breaker import Breaker
from pipeline.config import BreakerPolicy
from storage import outbox, queue
from storage.db import transaction
from tests.helpers import StatementLog

LINE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{([a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\.)*"'
                  r'(,[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\.)*")*)?\})? '
                  r'(-?[0-9.e+-]+|\+Inf|-Inf|NaN)$')
LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def parse(text: str) -> dict[tuple[str, frozenset], float]:
    """Every line is a comment or ``name{labels} value``; returns the samples."""
    assert text.endswith("\n")
    samples = {}
    for line in text.splitlines():
        if line.startswith("# HELP ") or line.startswith("# TYPE "):
            continue
        m = LINE.match(line)
        assert m, f"unparsable line: {line!r}"
        labels = frozenset(LABEL.findall(m.group(3) or ""))
        samples[(m.group(1), labels)] = float(m.group(m.lastindex))
    return samples


def test_metrics_reflect_the_store(db):
    b = queue.create_batch(db, [{"task_key": f"k{i}"} for i in range(5)], now=0, source="cli")
    tasks = queue.tasks_of(db, b)
    with transaction(db) as conn:
        conn.execute("UPDATE tasks SET status = 'succeeded' WHERE id IN (?, ?)",
                     [tasks[0]["id"], tasks[1]["id"]])
        conn.execute("UPDATE tasks SET status = 'failed' WHERE id = ?", [tasks[2]["id"]])
        conn.execute("INSERT INTO kv (key, value, updated_at) VALUES"
                     " ('report:last_sent_at', '1750000000.5', 0)")
    for stage, secs, outcome, ec in [("coze", 3, "success", None), ("coze", 45, "success", None),
                                     ("synthesis", 0.5, "success", None),
                                     ("coze", 1, "retry", 'plugin "timeout"')]:
        queue.record_attempt(db, tasks[0], stage=stage, started_at=100, ended_at=100 + secs,
                             outcome=outcome, error_class=ec)
    Breaker(db, "coze", BreakerPolicy(), lambda: 5.0).trip("auth")
    Breaker(db, "feishu", BreakerPolicy(), lambda: 5.0).reset()
    outbox.enqueue(db, "send", "oc_x", {"text": "hi"}, now=0)
    s = parse(render_metrics(db, extra={"opsbot_worker_up": 1}))
    assert s[("opsbot_tasks", frozenset({("state", "queued")}))] == 2
    assert s[("opsbot_tasks", frozenset({("state", "succeeded")}))] == 2
    assert s[("opsbot_tasks", frozenset({("state", "cancelled")}))] == 0
    assert s[("opsbot_attempts_total", frozenset({("error_class", "none")}))] == 3
    assert s[("opsbot_attempts_total", frozenset({("error_class", 'plugin \\"timeout\\"')}))] == 1
    coze = lambda le: s[("opsbot_stage_seconds_bucket", frozenset({("stage", "coze"),
                                                                  ("le", le)}))]
    assert (coze("1"), coze("5"), coze("30"), coze("60"), coze("+Inf")) == (0, 1, 1, 2, 2)
    assert s[("opsbot_stage_seconds_sum", frozenset({("stage", "coze")}))] == 48
    assert s[("opsbot_stage_seconds_count", frozenset({("stage", "synthesis")}))] == 1
    assert s[("opsbot_breaker_state", frozenset({("service", "coze")}))] == 2
    assert s[("opsbot_breaker_state", frozenset({("service", "feishu")}))] == 0
    assert s[("opsbot_outbox_depth", frozenset())] == 1
    assert s[("opsbot_inbox_pending", frozenset())] == 0
    assert s[("opsbot_last_report_timestamp", frozenset())] == 1750000000.5
    assert s[("opsbot_worker_up", frozenset())] == 1


def test_webhook_latency_histogram_is_rendered(db):
    before = parse(render_metrics(db))
    count = before[("opsbot_webhook_seconds_count", frozenset())]
    WEBHOOK_LATENCY.observe(0.02)
    WEBHOOK_LATENCY.observe(3.0)
    s = parse(render_metrics(db))
    assert s[("opsbot_webhook_seconds_count", frozenset())] == count + 2
    le = lambda v: s[("opsbot_webhook_seconds_bucket", frozenset({("le", v)}))] - \
        before[("opsbot_webhook_seconds_bucket", frozenset({("le", v)}))]
    assert (le("0.01"), le("0.025"), le("2.5"), le("5"), le("+Inf")) == (0, 1, 1, 2, 2)


def test_webhook_requests_counter_is_rendered(db):
    key = ("opsbot_webhook_requests_total", frozenset({("status", "401")}))
    before = parse(render_metrics(db)).get(key, 0)
    WEBHOOK_REQUESTS.labels(status="401").inc()
    WEBHOOK_REQUESTS.labels(status="401").inc()
    s = parse(render_metrics(db))
    assert s[key] == before + 2
    assert "# TYPE opsbot_webhook_requests_total counter" in render_metrics(db)
    assert not any(name.endswith("_created") for name, _ in s)   # per process: meaningless


def test_bad_extra_names_are_refused(db):
    with pytest.raises(ValueError):
        render_metrics(db, extra={"bad name": 1})


def test_the_web_app_measures_webhook_latency(db_path):
    from bot.app import create_app
    from bot.settings import Settings

    app = create_app(Settings(db_path=db_path), dispatch=False)
    client = app.test_client()
    before = parse(client.get("/metrics").get_data(as_text=True))
    assert client.post("/webhook/event", data=b"{broken").status_code == 400
    after = parse(client.get("/metrics").get_data(as_text=True))
    count = ("opsbot_webhook_seconds_count", frozenset())
    bad = ("opsbot_webhook_requests_total", frozenset({("status", "400")}))
    assert after[count] == before[count] + 1
    assert after[bad] == before.get(bad, 0) + 1


def _attempts(db, n, *, start=0):
    b = queue.create_batch(db, [{"task_key": f"a{start}"}], now=0, source="cli")
    [task] = queue.tasks_of(db, b)
    rows = [(task["id"], b, "coze" if i % 2 else "synthesis", float(i), float(i) + i % 700,
             "success" if i % 5 else "retry", None if i % 5 else "timeout")
            for i in range(start, start + n)]
    with transaction(db) as conn:
        conn.executemany("INSERT INTO attempts (task_id, batch_id, stage, started_at, ended_at,"
                         " outcome, error_class) VALUES (?, ?, ?, ?, ?, ?, ?)", rows)


def test_incremental_attempt_totals_equal_a_full_read(db):
    from bot.metrics import AttemptTotals
    totals = AttemptTotals()
    _attempts(db, 500)
    render_metrics(db, totals=totals)
    _attempts(db, 300, start=500)
    log = StatementLog(db)
    incremental = render_metrics(log, totals=totals)
    assert incremental == render_metrics(db)       # a fresh full read
    attempt_reads = [(s, p) for s, p in log.statements if "FROM attempts" in s
                     and "MAX(id)" not in s]
    assert attempt_reads and all("id > ?" in s and p[0] == 500 for s, p in attempt_reads)
    with transaction(db) as conn:                  # emptied: start over, no stale numbers
        conn.execute("DELETE FROM attempts")
    assert render_metrics(db, totals=totals) == render_metrics(db)


def test_a_scrape_does_not_wait_for_the_request_lock(db_path):
    import threading

    from bot.app import create_app
    from bot.settings import Settings

    app = create_app(Settings(db_path=db_path), dispatch=False)
    state = app.extensions["opsbot"]
    client = app.test_client()
    assert client.get("/metrics").status_code == 200
    got = []
    with state.lock:   # a webhook request in progress in another thread
        t = threading.Thread(target=lambda: got.append(client.get("/metrics").status_code))
        t.start()
        t.join(5)
        assert got == [200]

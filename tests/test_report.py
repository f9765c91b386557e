"""The daily report from a seeded history, the report CLI, and the scheduler's decisions."""
from __future__ import annotations

import io
import json
import math
import random
from datetime import date, datetime, time, timedelta
from zoneinfo import ZoneInfo

import pytest

from bot.chat.cards import size
from bot.chat.mdtext import escape
from bot.alerting.report import compute_report, day_bounds, report_card, report_text
from bot.ops.report_cli import run_report
from bot.alerting.scheduler import Scheduler, due_report_date
from bot.settings import AlertSettings, FeishuSettings, Settings
from pipeline.clock import FakeClock
from storage import queue
from storage.db import open_db, transaction
from tests.fake_feishu import FakeFeishu

TZ = ZoneInfo("Asia/Shanghai")
DAY = date(2025, 6, 10)
NODES = ["llm_1", "plugin_video", "code_3", None]
CLASSES = ["plugin_timeout", "rate_limited", "server", "bad_request"]


def seed(db, day: date, n: int, rng: random.Random, prefix: str) -> list[dict]:
    """``n`` tasks finishing on ``day`` with attempts; returns what was written."""
    start, _ = day_bounds(day, TZ)
    bid = queue.create_batch(db, [{"task_key": f"{prefix}{i}"} for i in range(n)], now=start,
                             source="cli", batch_id=f"b-{prefix}")
    written = []
    with transaction(db) as conn:
        for task in conn.execute("SELECT id FROM tasks WHERE batch_id = ?", [bid]).fetchall():
            tid = task[0]
            t0 = start + rng.uniform(0, 86_000)
            coze = rng.uniform(20, 400)
            synth = rng.uniform(5, 60)
            status = rng.choices(["succeeded", "failed", "ignored", "cancelled"], [70, 20, 5, 5])[0]
            attempts = []
            for _ in range(rng.randint(0, 2)):   # retries / resubmits before the end
                attempts.append(("coze", t0, t0 + 1, rng.choice(["retry", "resubmit"]),
                                 rng.choice(CLASSES), rng.choice(NODES)))
            if status == "succeeded":
                attempts.append(("coze", t0, t0 + coze, "success", None, None))
                attempts.append(("synthesis", t0 + coze, t0 + coze + synth, "success", None, None))
            elif status in ("failed", "ignored"):
                attempts.append(("coze", t0, t0 + coze, "fail", rng.choice(CLASSES),
                                 rng.choice(NODES)))
            end = t0 + coze + (synth if status == "succeeded" else 0)
            end = min(end, start + 86_399)
            conn.execute("UPDATE tasks SET status = ?, finished_at = ? WHERE id = ?",
                         [status, end, tid])
            for stage, s, e, outcome, ec, node in attempts:
                conn.execute("INSERT INTO attempts (task_id, batch_id, stage, started_at, ended_at,"
                             " outcome, error_class, node) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                             [tid, bid, stage, s, e, outcome, ec, node])
            written.append({"status": status, "end": end, "attempts": attempts})
    return written


def expected(written: list[dict], day: date) -> dict:
    """The report's numbers, computed here from what the seed wrote."""
    start, end = day_bounds(day, TZ)
    fin = [w for w in written if start <= w["end"] < end]
    runs = [w for w in fin if w["status"] != "cancelled"]
    ok = [w for w in runs if w["status"] == "succeeded"]
    atts = [a for w in written for a in w["attempts"]]
    fails = [a for a in atts if a[3] != "success" and start <= a[1] < end]
    lat = {}
    for stage in ("coze", "synthesis"):
        vals = sorted(a[2] - a[1] for a in atts if a[0] == stage and a[3] == "success"
                      and start <= a[2] < end)
        lat[stage] = {"count": len(vals), "avg": sum(vals) / len(vals) if vals else None,
                      "p95": vals[math.ceil(len(vals) * 0.95) - 1] if vals else None}
    nodes: dict[str, int] = {}
    for a in fails:
        name = a[5] or a[4] or "unknown"
        nodes[name] = nodes.get(name, 0) + 1
    top = sorted(nodes.items(), key=lambda kv: (-kv[1], kv[0]))[:3]
    return {"runs": len(runs), "success_rate": len(ok) / len(runs) if runs else None,
            "retries": sum(1 for a in fails if a[3] in ("retry", "resubmit")),
            "failures": len(fails), "latency": lat,
            "top_nodes": [{"name": k, "count": v} for k, v in top]}


def test_report_numbers_match_the_seeded_history(db):
    rng = random.Random(7)
    today = seed(db, DAY, 300, rng, "t")
    before = seed(db, DAY - timedelta(days=1), 200, rng, "y")
    report = compute_report(db, DAY, TZ)
    want, prev = expected(today, DAY), expected(before, DAY - timedelta(days=1))
    assert report["runs"] == want["runs"] and report["runs"] > 200
    assert report["success_rate"] == pytest.approx(want["success_rate"], abs=1e-12)
    assert report["retries"] == want["retries"] and report["failures"] == want["failures"]
    for stage in ("coze", "synthesis"):
        got, exp = report["latency"][stage], want["latency"][stage]
        assert got["count"] == exp["count"] > 0
        assert got["avg"] == pytest.approx(exp["avg"]) and got["p95"] == pytest.approx(exp["p95"])
    assert report["top_nodes"] == want["top_nodes"] and len(report["top_nodes"]) == 3
    assert report["trend"]["runs"] == want["runs"] - prev["runs"]
    assert report["trend"]["success_rate"] == pytest.approx(want["success_rate"]
                                                            - prev["success_rate"])
    assert report["trend"]["retries"] == want["retries"] - prev["retries"]
    assert sum(h["succeeded"] + h["failed"] for h in report["hourly"]) == want["runs"]
    assert sum(e["count"] for e in report["errors"]) == want["failures"]


def test_an_empty_day_has_no_rates_and_the_card_still_renders(db):
    report = compute_report(db, DAY, TZ)
    assert report["runs"] == 0 and report["success_rate"] is None
    assert report["latency"]["coze"]["p95"] is None
    assert "成功率** -" in json.dumps(report_card(report), ensure_ascii=False)


def test_report_card_has_a_chart_and_fits(db):
    seed(db, DAY, 200, random.Random(1), "t")
    report = compute_report(db, DAY, TZ)
    card = report_card(report, "zh")
    charts = [e for e in card["body"]["elements"] if e["tag"] == "chart"]
    assert charts and charts[0]["chart_spec"]["type"] == "bar"
    values = charts[0]["chart_spec"]["data"]["values"]
    assert len(values) == 48 and sum(v["count"] for v in values) == report["runs"]
    assert card["schema"] == "2.0" and size(card) < 30_000
    assert "Daily report 2025-06-10" in report_text(report, "en")


def test_node_names_and_error_classes_are_neutralised_on_the_card(db):
    start, _ = day_bounds(DAY, TZ)
    bid = queue.create_batch(db, [{"task_key": "k"}], now=start, source="cli")
    with transaction(db) as conn:
        tid = conn.execute("SELECT id FROM tasks").fetchone()[0]
        for node, ec in (("<at id=all></at>", "x"), (None, "[click](https://evil.example)")):
            conn.execute("INSERT INTO attempts (task_id, batch_id, stage, started_at, ended_at,"
                         " outcome, error_class, node) VALUES (?, ?, 'coze', ?, ?, 'fail', ?, ?)",
                         [tid, bid, start + 60, start + 61, ec, node])
    report = compute_report(db, DAY, TZ)
    text = "\n".join(e["content"] for e in report_card(report)["body"]["elements"]
                     if e["tag"] == "markdown")
    assert "<at" not in text and "](" not in text
    assert escape("<at id=all></at>") in text and escape("[click]") in text
    assert "<at id=all></at>" in report_text(report)   # the terminal shows them as they are


def test_each_stage_share_of_the_time_and_the_quality_gate_counts(db):
    rng = random.Random(3)
    written = seed(db, DAY, 120, rng, "t")
    start, end = day_bounds(DAY, TZ)
    bid = queue.create_batch(db, [{"task_key": "g"}], now=start, source="cli")
    tid = db.execute("SELECT id FROM tasks WHERE task_key = 'g'").fetchone()[0]
    task = {"id": tid, "batch_id": bid, "params": "{}"}
    gate = [(start + 100, start + 104, "resubmit"), (start + 200, start + 201, "success"),
            (start + 300, start + 302.5, "fail"), (start - 50, start - 40, "resubmit")]
    for s, e, outcome in gate:
        queue.record_attempt(db, task, stage="gate", started_at=s, ended_at=e, outcome=outcome)
    report = compute_report(db, DAY, TZ)
    seconds: dict[str, float] = {"gate": 4 + 1 + 2.5}
    for w in written:
        for stage, s, e, *_ in w["attempts"]:
            if start <= e < end:
                seconds[stage] = seconds.get(stage, 0.0) + (e - s)
    total = sum(seconds.values())
    share = report["stage_share"]
    assert list(share) == sorted(seconds, key=lambda k: -seconds[k])   # largest first
    for stage, secs in seconds.items():
        assert share[stage]["seconds"] == pytest.approx(secs)
        assert share[stage]["share"] == pytest.approx(secs / total)
    assert sum(v["share"] for v in share.values()) == pytest.approx(1.0)
    assert report["quality"] == {"resubmits": 1, "failed": 1}   # the day before is not counted
    text = report_text(report, "en")
    assert "Time by stage: coze " in text and " · gate " in text
    assert "Quality gate: 1 run(s) resubmitted, 1 failed" in text
    zh = json.dumps(report_card(report, "zh"), ensure_ascii=False)
    assert "各阶段耗时占比" in zh and "质量检查" in zh


def test_an_empty_day_shows_no_share_line(db):
    report = compute_report(db, DAY, TZ)
    assert report["stage_share"] == {} and report["quality"] == {"resubmits": 0, "failed": 0}
    assert "Time by stage" not in report_text(report, "en")


# --- the CLI ---------------------------------------------------------------------------------

def cli_settings(tmp_path, **feishu) -> Settings:
    return Settings(db_path=tmp_path / "opsbot.db", feishu=FeishuSettings(**feishu))


def test_cli_prints_yesterday_by_default(tmp_path):
    db = open_db(tmp_path / "opsbot.db")
    seed(db, DAY, 20, random.Random(2), "t")
    db.conn.close()
    clock = FakeClock(datetime(2025, 6, 11, 8, 0, tzinfo=TZ).timestamp())
    out, err = io.StringIO(), io.StringIO()
    assert run_report(cli_settings(tmp_path), date=None, send=False, clock=clock, out=out,
                      err=err) == 0
    assert "日报 2025-06-10" in out.getvalue() and err.getvalue() == ""


@pytest.mark.parametrize("bad", ["2025-13-01", "yesterday", "2025/06/10", "", "0001-01-01",
                                 "9999-12-31"])
def test_cli_bad_date_exits_2_with_a_clear_message(tmp_path, bad):
    err = io.StringIO()
    assert run_report(cli_settings(tmp_path), date=bad, send=False, out=io.StringIO(),
                      err=err) == 2
    assert "--date must" in err.getvalue() and "Traceback" not in err.getvalue()


def test_cli_send_without_feishu_configured_exits_1(tmp_path):
    err = io.StringIO()
    assert run_report(cli_settings(tmp_path), date="2025-06-10", send=True, out=io.StringIO(),
                      err=err) == 1
    assert "FEISHU_APP_ID" in err.getvalue() and "FEISHU_ALERT_CHAT_ID" in err.getvalue()


def test_cli_send_posts_the_card_with_the_chart(tmp_path):
    with FakeFeishu() as fake:
        settings = Settings(db_path=tmp_path / "opsbot.db",
                            feishu=fake.settings(alert_chat_id="oc_alerts"))
        assert run_report(settings, date="2025-06-10", send=True, out=io.StringIO(),
                          err=io.StringIO()) == 0
        assert len(fake.messages) == 1
        msg = fake.messages[0]
        assert msg["chat_id"] == "oc_alerts" and msg["msg_type"] == "interactive"
        assert any(e["tag"] == "chart" for e in msg["content"]["body"]["elements"])
    db = open_db(tmp_path / "opsbot.db")
    assert db.execute("SELECT value FROM kv WHERE key = 'report:last_sent_at'").fetchone()


def test_cli_send_delivers_only_its_own_report(tmp_path):
    """Other due rows (an alert for another chat, a Bitable write) are the worker's."""
    from storage import outbox
    db = open_db(tmp_path / "opsbot.db")
    outbox.enqueue(db, "send", "oc_other", {"text": "an alert"}, now=0, uuid="al-1")
    outbox.enqueue(db, "bitable_update", "app/tbl", {"record_id": "r", "fields": {}}, now=0,
                   uuid="bt-1")
    with FakeFeishu() as fake:
        settings = Settings(db_path=tmp_path / "opsbot.db",
                            feishu=fake.settings(alert_chat_id="oc_alerts"))
        assert run_report(settings, date="2025-06-10", send=True, out=io.StringIO(),
                          err=io.StringIO()) == 0
        assert [m["chat_id"] for m in fake.messages] == ["oc_alerts"]
    assert outbox.status_of(db, "al-1") == "pending" and outbox.status_of(db, "bt-1") == "pending"
    assert db.execute("SELECT lease_owner FROM outbox WHERE uuid IN ('al-1', 'bt-1')"
                      ).fetchall() == [(None,), (None,)]


def test_cli_send_failure_exits_1_and_says_why(tmp_path):
    with FakeFeishu() as fake:
        fake.fail("send", code=230002, msg="Bot is not in the chat")
        settings = Settings(db_path=tmp_path / "opsbot.db",
                            feishu=fake.settings(alert_chat_id="oc_alerts"))
        err = io.StringIO()
        assert run_report(settings, date="2025-06-10", send=True, out=io.StringIO(),
                          err=err) == 1
        assert "230002" in err.getvalue() and fake.messages == []


# --- the scheduler ---------------------------------------------------------------------------

def at(y, m, d, hh, mm, tz=TZ):
    return datetime(y, m, d, hh, mm, tzinfo=tz)


@pytest.mark.parametrize("now, last, want", [
    (at(2025, 6, 11, 8, 59), date(2025, 6, 9), None),               # not yet 09:00
    (at(2025, 6, 11, 9, 0), date(2025, 6, 9), date(2025, 6, 10)),   # 09:00: yesterday's
    (at(2025, 6, 11, 9, 0), date(2025, 6, 10), None),               # already sent
    (at(2025, 6, 11, 23, 59), date(2025, 6, 10), None),
    (at(2025, 6, 12, 0, 0), date(2025, 6, 10), None),                # midnight: not yet
    (at(2025, 6, 11, 14, 30), date(2025, 6, 9), date(2025, 6, 10)),  # down at 09:00: late, once
    (at(2025, 6, 12, 8, 0), date(2025, 6, 9), date(2025, 6, 10)),    # down all of 11th
    (at(2025, 6, 20, 10, 0), date(2025, 6, 9), date(2025, 6, 19)),   # a week off: latest only
    (at(2025, 6, 11, 8, 0), None, None),                             # fresh store waits
    (at(2025, 6, 11, 9, 5), None, date(2025, 6, 10)),
])
def test_due_report_date(now, last, want):
    assert due_report_date(now, last, time(9, 0)) == want


def scheduler_for(db, clock, tz="Asia/Shanghai", chat="oc_alerts"):
    settings = Settings(timezone=tz, feishu=FeishuSettings(alert_chat_id=chat),
                        alerts=AlertSettings(report_time="09:00"))
    return Scheduler(db, settings, clock)


def report_rows(db):
    return db.execute("SELECT uuid, target FROM outbox WHERE ref LIKE 'report:%' ORDER BY id"
                      ).fetchall()


@pytest.mark.parametrize("tz", ["Asia/Shanghai", "America/Los_Angeles", "UTC"])
def test_scheduler_sends_once_at_nine_local_time(db, tz):
    zone = ZoneInfo(tz)
    clock = FakeClock(datetime(2025, 6, 11, 8, 59, 50, tzinfo=zone).timestamp())
    sched = scheduler_for(db, clock, tz)
    sched.db.execute("INSERT INTO kv (key, value, updated_at) VALUES ('report:last_sent',"
                     " '2025-06-09', 0)")
    assert sched.tick()["report"] is None
    clock.advance(10)
    assert sched.tick()["report"] == "2025-06-10"
    for _ in range(5):
        clock.advance(3600)
        assert sched.tick()["report"] is None
    assert report_rows(db) == [("report-2025-06-10", "oc_alerts")]


def test_scheduler_catches_up_a_missed_report_once_after_a_restart(db, tmp_path):
    clock = FakeClock(at(2025, 6, 11, 13, 0).timestamp())
    db.execute("INSERT INTO kv (key, value, updated_at) VALUES ('report:last_sent', '2025-06-09',"
               " 0)")
    assert scheduler_for(db, clock).tick()["report"] == "2025-06-10"
    again = open_db(tmp_path / "opsbot.db")   # a new process on the same store
    assert scheduler_for(again, clock).tick()["report"] is None
    assert len(report_rows(db)) == 1


def test_scheduler_without_alert_chat_records_the_day_and_sends_nothing(db):
    clock = FakeClock(at(2025, 6, 11, 9, 1).timestamp())
    sched = scheduler_for(db, clock, chat="")
    db.execute("INSERT INTO kv (key, value, updated_at) VALUES ('report:last_sent', '2025-06-09',"
               " 0)")
    assert sched.tick()["report"] == "2025-06-10"
    assert report_rows(db) == [] and sched.last_sent() == date(2025, 6, 10)


def test_scheduler_runs_the_latency_check_and_flush():
    calls = []

    class Router:
        def flush(self):
            calls.append("flush")

        def check_latency(self, now):
            calls.append("latency")
            return 0

    db = open_db(":memory:")
    clock = FakeClock(at(2025, 6, 11, 8, 0).timestamp())
    sched = Scheduler(db, Settings(), clock, router=Router(), latency_every=30)
    sched.tick()
    clock.advance(5)
    sched.tick()
    clock.advance(30)
    sched.tick()
    assert calls == ["flush", "latency", "flush", "flush", "latency"]

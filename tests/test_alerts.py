"""The alert router on a real SQLite file: scripted notifier calls -> exact outbox rows and cards.

Where delivery matters the real outbox sender and lark-oapi client talk to the fake Feishu server.
"""
from __future__ import annotations

import html
import json
import threading

import pytest

from bot.alerting import cards as alert_cards
from bot.alerting.router import AlertRouter, load_alert
from bot.chat.cards import button_values, size
from bot.feishu.client import FeishuClient
from storage.outbox import reply_uuid
from bot.feishu.sender import OutboxSender
from bot.settings import AlertSettings, FeishuSettings, Settings
from pipeline.classifier import Decision
from pipeline.clock import FakeClock
from pipeline.errors import RunFailed
from storage import queue
from storage.db import transaction
from tests.fake_feishu import FakeFeishu
from tests.helpers import checked_answer

ALERT_CHAT = "oc_alerts"
MEDIUM = Decision("fail", 0.0, "plugin_timeout", "MEDIUM", "matched rule plugin_timeout: "
                  "resubmitted 1 time(s) already")
FATAL = Decision("fatal", 0.0, "auth", "HIGH", "matched rule auth: stop the batch")


def make_settings(**alerts) -> Settings:
    return Settings(feishu=FeishuSettings(alert_chat_id=ALERT_CHAT, admin_ids=("ou_admin",),
                                          oncall_ids=("ou_oncall",)),
                    alerts=AlertSettings(**alerts))


@pytest.fixture
def clock():
    return FakeClock(1_750_000_000.0)


@pytest.fixture
def settings():
    return make_settings()


@pytest.fixture
def router(db, settings, clock):
    return AlertRouter(db, settings, clock)


def batch(db, n=3, *, batch_id="b1", **kw) -> str:
    return queue.create_batch(db, [{"task_key": f"k{i}"} for i in range(n)], now=0,
                              source="chat", batch_id=batch_id, **kw)


def fail(db, router, task_id, decision=MEDIUM, *, stage="coze", message="Access plugin server "
         "url timed out", code="720701002") -> dict:
    """Mark a task failed the way the worker does, then tell the router."""
    with transaction(db) as conn:
        conn.execute("UPDATE tasks SET status = 'failed', stage = ?, error_class = ?,"
                     " error_code = ?, error_message = ?, finished_at = ?,"
                     " debug_url = 'https://coze.cn/debug/1' WHERE id = ?",
                     [stage, decision.error_class, code, message, router.clock.now(), task_id])
    task = queue.get_task(db, task_id)
    router.task_finished(task, decision, RunFailed(code, message))
    return task


def succeed(db, router, task_id) -> None:
    with transaction(db) as conn:
        conn.execute("UPDATE tasks SET status = 'succeeded', finished_at = ? WHERE id = ?",
                     [router.clock.now(), task_id])
    router.task_finished(queue.get_task(db, task_id), None, None)


def rows(db, kind=None):
    sql = "SELECT * FROM outbox" + (" WHERE kind = ?" if kind else "") + " ORDER BY id"
    out = list(db.query(sql, [kind] if kind else []))
    for r in out:
        r["payload"] = json.loads(r["payload"])
    return out


def buttons(card) -> list[dict]:
    return button_values(card)


def text_of(card) -> str:
    return json.dumps(card, ensure_ascii=False)


# --- tiers -----------------------------------------------------------------------------------

def test_scripted_sequence_gives_exactly_the_expected_cards(db, router, clock):
    b = batch(db, 3)
    t1, t2, _ = (t["id"] for t in queue.tasks_of(db, b))
    router.task_retrying(queue.get_task(db, t1), Decision("retry", 1, "server", "LOW", "HTTP 500"),
                         RuntimeError("500"))
    assert rows(db) == []  # LOW: counted only
    assert router.stats["LOW"] == 1

    fail(db, router, t1)
    sends = rows(db, "send")
    assert len(sends) == 1
    medium = sends[0]
    assert medium["target"] == ALERT_CHAT and medium["ref"] == f"{b}:coze:plugin_timeout"
    card = medium["payload"]["card"]
    assert card["schema"] == "2.0" and card["config"]["update_multi"] is True
    assert card["header"]["template"] == "orange"
    assert card["header"]["title"]["content"].startswith("[MEDIUM]")
    body = text_of(card)
    for part in ("coze", "720701002", "k0", b, "https://coze.cn/debug/1"):
        assert part in body
    assert "<at id=" not in body
    key = f"{b}:coze:plugin_timeout"
    assert buttons(card) == [{"action": "retry", "task_id": t1, "key": key},
                             {"action": "ignore", "task_id": t1, "key": key},
                             {"action": "silence", "key": key, "seconds": 3600}]

    clock.advance(1)
    router.batch_blocked(b, FATAL, RunFailed("4100", "token invalid"))
    high = rows(db, "send")[1]
    card = high["payload"]["card"]
    assert card["header"]["template"] == "red"
    assert "<at id=ou_oncall></at>" in text_of(card)
    assert buttons(card) == [{"action": "resume", "batch_id": b, "key": f"{b}:coze:auth"},
                             {"action": "cancel", "batch_id": b, "key": f"{b}:coze:auth"}]

    router.breaker_changed("coze", "closed", "open", "manual: auth: token invalid")
    assert len(rows(db, "send")) == 2  # a fatal trip is covered by the HIGH card

    router.breaker_changed("coze", "closed", "open", "5000: server error")
    critical = rows(db, "send")[2]["payload"]["card"]
    assert critical["header"]["template"] == "carmine"
    assert "<at id=ou_oncall></at> <at id=ou_admin></at>" in text_of(critical)
    assert b in text_of(critical)   # what is blocked
    assert [s["payload"]["card"]["header"]["title"]["content"].split("]")[0] + "]"
            for s in rows(db, "send")] == ["[MEDIUM]", "[HIGH]", "[CRITICAL]"]


def test_with_nobody_configured_critical_mentions_nobody_and_says_so(db, clock):
    """Before: <at id=all> whenever nobody was configured; Feishu refuses the whole card unless
    the group owner allows mentioning everyone, so the most important card never arrived."""
    router = AlertRouter(db, Settings(feishu=FeishuSettings(alert_chat_id=ALERT_CHAT)), clock)
    router.breaker_changed("coze", "closed", "open", "5000: server error")
    text = text_of(rows(db, "send")[0]["payload"]["card"])
    assert "<at" not in text
    assert "FEISHU_ONCALL_IDS" in text and "没有配置要提醒的人" in text


def test_critical_mentions_everyone_only_when_configured_to(db, clock):
    settings = Settings(feishu=FeishuSettings(alert_chat_id=ALERT_CHAT, admin_ids=("ou_admin",)),
                        alerts=AlertSettings(mention_all=True))
    router = AlertRouter(db, settings, clock)
    router.breaker_changed("coze", "closed", "open", "5000: server error")
    text = text_of(rows(db, "send")[0]["payload"]["card"])
    assert "<at id=all></at>" in text and "ou_admin" not in text


def test_english_cards(db, clock):
    router = AlertRouter(db, make_settings().replace(language="en"), clock)
    b = batch(db, 1)
    fail(db, router, queue.tasks_of(db, b)[0]["id"])
    card = rows(db, "send")[0]["payload"]["card"]
    assert "Task failed" in card["header"]["title"]["content"]
    assert [b_["behaviors"][0]["value"]["action"] for b_ in _button_nodes(card)] == \
        ["retry", "ignore", "silence"]
    assert [b_["text"]["content"] for b_ in _button_nodes(card)] == ["Retry", "Ignore",
                                                                     "Silence 1h"]


def _button_nodes(card):
    return [c["elements"][0] for el in card["body"]["elements"] if el.get("tag") == "column_set"
            for c in el["columns"]]


def test_no_alert_chat_stores_the_alert_and_sends_nothing(db, clock):
    router = AlertRouter(db, Settings(), clock)
    b = batch(db, 1)
    fail(db, router, queue.tasks_of(db, b)[0]["id"])
    assert rows(db) == []
    alert = load_alert(db, f"{b}:coze:plugin_timeout")
    assert alert["status"] == "open" and alert["message_uuid"] is None


# --- grouping --------------------------------------------------------------------------------

def test_fifty_identical_failures_make_one_card_and_coalesced_patches(db, router, clock):
    b = batch(db, 50)
    for t in queue.tasks_of(db, b):
        fail(db, router, t["id"])
    assert len(rows(db, "send")) == 1
    patches = rows(db, "patch")
    assert len(patches) == 1  # one pending patch per card, carrying the latest state
    assert patches[0]["target"] == rows(db, "send")[0]["uuid"]
    assert "× 50" in text_of(patches[0]["payload"]["card"])
    alert = load_alert(db, f"{b}:coze:plugin_timeout")
    assert alert["count"] == 50 and len(alert["details"]["task_ids"]) == 50


def test_grouped_storm_over_real_sender_is_one_message_and_about_one_patch_per_second(
        db, clock):
    # (the failure-rate alert is kept out of the way: it has its own tests)
    router = AlertRouter(db, make_settings(failure_rate_min_tasks=1000), clock)
    b = batch(db, 50)
    with FakeFeishu() as fake:
        sender = OutboxSender(db, FeishuClient(fake.settings()), clock=clock, owner="t")
        for t in queue.tasks_of(db, b):   # 50 failures over 5 seconds
            fail(db, router, t["id"])
            sender.deliver_due()
            clock.advance(0.1)
        clock.advance(2)
        sender.deliver_due()
        assert len(fake.messages) == 1
        assert 3 <= len(fake.patches) <= 6
        times = sorted(r["sent_at"] for r in rows(db, "patch"))
        assert all(b_ - a >= 0.999 for a, b_ in zip(times, times[1:]))
        final = fake.messages[0]["content"]  # the fake applies patches to the message
        assert "× 50" in json.dumps(final, ensure_ascii=False)


def test_outside_the_group_window_a_new_card_is_sent(db, clock):
    router = AlertRouter(db, make_settings(group_window=60), clock)
    b = batch(db, 2)
    t1, t2 = (t["id"] for t in queue.tasks_of(db, b))
    fail(db, router, t1)
    clock.advance(61)
    fail(db, router, t2)
    assert len(rows(db, "send")) == 2
    assert load_alert(db, f"{b}:coze:plugin_timeout")["count"] == 1


def test_outside_the_group_window_the_first_card_is_closed_not_left_open(db, clock):
    router = AlertRouter(db, make_settings(group_window=60), clock)
    b = batch(db, 2)
    t1, t2 = (t["id"] for t in queue.tasks_of(db, b))
    fail(db, router, t1)
    first = load_alert(db, f"{b}:coze:plugin_timeout")["message_uuid"]
    clock.advance(61)
    fail(db, router, t2)
    second = load_alert(db, f"{b}:coze:plugin_timeout")["message_uuid"]
    assert second != first
    [patch] = [r for r in rows(db, "patch") if r["target"] == first]
    card = patch["payload"]["card"]
    text = json.dumps(card, ensure_ascii=False)
    assert card["header"]["template"] == "green" and '"button"' not in text
    assert "新的告警卡片" in text
    assert [r for r in rows(db, "patch") if r["target"] == second] == []


def test_different_keys_are_different_cards(db, router):
    b = batch(db, 3)
    t1, t2, t3 = (t["id"] for t in queue.tasks_of(db, b))
    fail(db, router, t1)
    fail(db, router, t2, Decision("fail", 0, "bad_request", "MEDIUM", "not retryable"))
    fail(db, router, t3, stage="synthesis")
    assert sorted(r["ref"] for r in rows(db, "send")) == sorted([
        f"{b}:coze:plugin_timeout", f"{b}:coze:bad_request", f"{b}:synthesis:plugin_timeout"])


# --- silence ---------------------------------------------------------------------------------

def silence(db, key, until):
    with transaction(db) as conn:
        conn.execute("INSERT INTO silences (key, until, created_by, created_at) VALUES (?, ?, ?, ?)",
                     [key, until, "ou_admin", 0])


def test_a_silenced_batch_prefix_suppresses_sends_and_counts(db, router, clock):
    b = batch(db, 3)
    silence(db, b, clock.now() + 3600)
    for t in queue.tasks_of(db, b):
        fail(db, router, t["id"])
    assert rows(db) == []
    alert = load_alert(db, f"{b}:coze:plugin_timeout")
    assert alert["count"] == 3 and alert["details"]["suppressed"] == 3
    assert router.stats["silenced"] == 3


def test_a_silence_does_not_cover_other_keys_or_expired_ones(db, router, clock):
    batch(db, 2, batch_id="b1")
    b2 = batch(db, 1, batch_id="b10")   # "b1" must not silence "b10"
    silence(db, "b1", clock.now() + 3600)
    silence(db, "b10:coze:auth", clock.now() - 1)
    fail(db, router, queue.tasks_of(db, b2)[0]["id"])
    assert len(rows(db, "send")) == 1


def test_silencing_an_existing_card_patches_it_to_say_so(db, router, clock):
    b = batch(db, 2)
    t1, t2 = (t["id"] for t in queue.tasks_of(db, b))
    fail(db, router, t1)
    silence(db, f"{b}:coze:plugin_timeout", clock.now() + 3600)
    fail(db, router, t2)
    assert len(rows(db, "send")) == 1
    patch = text_of(rows(db, "patch")[-1]["payload"]["card"])
    assert "已静默" in patch and "1 次未通知" in patch


# --- resolve ---------------------------------------------------------------------------------

def test_a_retried_task_that_succeeds_resolves_its_card_and_sends_one_notice(db, router, clock):
    b = batch(db, 1)
    tid = queue.tasks_of(db, b)[0]["id"]
    fail(db, router, tid)
    card_uuid = rows(db, "send")[0]["uuid"]
    queue.requeue_tasks(db, [tid], now=clock.now())
    clock.advance(30)
    succeed(db, router, tid)
    alert = load_alert(db, f"{b}:coze:plugin_timeout")
    assert alert["status"] == "resolved" and alert["resolved_at"] == clock.now()
    patch = rows(db, "patch")[-1]
    assert patch["target"] == card_uuid
    assert patch["payload"]["card"]["header"]["template"] == "green"
    assert buttons(patch["payload"]["card"]) == []
    notices = [r for r in rows(db, "send") if "text" in r["payload"]]
    assert len(notices) == 1 and notices[0]["payload"]["text"].startswith("✅ 已恢复")
    succeed(db, router, tid)  # again: nothing new
    assert len([r for r in rows(db, "send") if "text" in r["payload"]]) == 1


def test_a_grouped_card_resolves_only_when_all_its_tasks_are_done(db, router, clock):
    b = batch(db, 2)
    t1, t2 = (t["id"] for t in queue.tasks_of(db, b))
    fail(db, router, t1)
    fail(db, router, t2)
    queue.requeue_tasks(db, [t1], now=clock.now())
    succeed(db, router, t1)
    assert load_alert(db, f"{b}:coze:plugin_timeout")["status"] == "open"
    queue.requeue_tasks(db, [t2], now=clock.now())
    succeed(db, router, t2)
    assert load_alert(db, f"{b}:coze:plugin_timeout")["status"] == "resolved"


def test_breaker_closing_resolves_the_critical_card(db, router, clock):
    router.breaker_changed("coze", "closed", "open", "5000: server error")
    clock.advance(90)
    router.breaker_changed("coze", "half_open", "closed", None)
    alert = load_alert(db, "breaker:coze")
    assert alert["status"] == "resolved"
    assert rows(db, "patch")[-1]["payload"]["card"]["header"]["template"] == "green"
    assert len([r for r in rows(db, "send") if "text" in r["payload"]]) == 1


def test_failure_rate_over_threshold_raises_critical_then_resolves(db, clock):
    router = AlertRouter(db, make_settings(failure_rate_threshold=0.5, failure_rate_min_tasks=4,
                                           failure_rate_window=600), clock)
    b = batch(db, 10)
    ids = [t["id"] for t in queue.tasks_of(db, b)]
    succeed(db, router, ids[0])
    for tid in ids[1:4]:
        clock.advance(2)
        fail(db, router, tid)
    assert load_alert(db, "failure_rate") is not None   # 3 of 4 failed: 75 % > 50 %
    crit = [r for r in rows(db, "send") if r["ref"] == "failure_rate"]
    assert len(crit) == 1
    assert "<at id=ou_oncall></at>" in text_of(crit[0]["payload"]["card"])
    assert "75%" in text_of(crit[0]["payload"]["card"])
    for tid in ids[4:7]:
        clock.advance(2)
        succeed(db, router, tid)   # 3 of 7 failed: 43 %
    assert load_alert(db, "failure_rate")["status"] == "resolved"


def test_failure_rate_needs_the_minimum_number_of_tasks(db, clock):
    router = AlertRouter(db, make_settings(failure_rate_min_tasks=10), clock)
    b = batch(db, 5)
    for t in queue.tasks_of(db, b):
        clock.advance(2)
        fail(db, router, t["id"])
    assert load_alert(db, "failure_rate") is None


# --- latency ---------------------------------------------------------------------------------

def test_latency_check_flags_each_slow_task_once(db, clock):
    router = AlertRouter(db, make_settings(latency_threshold=600), clock)
    b = batch(db, 3)
    ids = [t["id"] for t in queue.tasks_of(db, b)]
    with transaction(db) as conn:
        conn.execute("UPDATE tasks SET status = 'running', started_at = ? WHERE id IN (?, ?)",
                     [clock.now() - 700, ids[0], ids[1]])
        conn.execute("UPDATE tasks SET status = 'running', started_at = ? WHERE id = ?",
                     [clock.now() - 100, ids[2]])
    assert router.check_latency() == 2
    assert router.check_latency() == 0
    alert = load_alert(db, f"{b}:latency:slow")
    assert alert["tier"] == "MEDIUM" and alert["count"] == 2
    assert len(rows(db, "send")) == 1
    clock.advance(600)
    assert router.check_latency() == 1   # the third one is slow now
    assert load_alert(db, f"{b}:latency:slow")["count"] == 3


# --- batch cards -----------------------------------------------------------------------------

def test_progress_patches_the_run_reply_throttled_then_summary(db, router, clock):
    b = batch(db, 4, chat_id="oc_ops", command_message_id="om_run1")
    ids = [t["id"] for t in queue.tasks_of(db, b)]
    queue.set_batch_status(db, b, "running", now=clock.now())
    succeed(db, router, ids[0])
    router.batch_progress(b)
    clock.advance(1)
    succeed(db, router, ids[1])
    router.batch_progress(b)          # within 5 s: held back
    patches = rows(db, "patch")
    assert len(patches) == 1 and patches[0]["target"] == reply_uuid("om_run1")
    assert "**1/4**" in text_of(patches[0]["payload"]["card"])
    clock.advance(5)
    router.flush()
    assert "**2/4**" in text_of(rows(db, "patch")[-1]["payload"]["card"])
    fail(db, router, ids[2])
    fail(db, router, ids[3], Decision("fail", 0, "bad_request", "MEDIUM", "not retryable"),
         message="invalid parameter topic")
    queue.finish_batches(db, now=clock.now())
    router.batch_finished(b)
    replies = rows(db, "reply")
    assert len(replies) == 1 and replies[0]["target"] == "om_run1"
    summary = replies[0]["payload"]["card"]
    body = html.unescape(text_of(summary))     # Coze's texts are escaped on the card
    assert "plugin_timeout" in body and "bad_request" in body and "invalid parameter" in body
    assert "处理建议" in body
    assert buttons(summary) == [{"action": "retry_batch", "batch_id": b}]
    router.batch_finished(b)          # the same finish again: same uuid, nothing new
    assert len(rows(db, "reply")) == 1


def test_a_batch_without_a_command_message_gets_its_own_progress_card(db, router, clock):
    b = batch(db, 2, chat_id="oc_ops")
    router.batch_progress(b)
    sends = [r for r in rows(db, "send") if r["target"] == "oc_ops"]
    assert len(sends) == 1
    assert queue.get_batch(db, b)["progress_message_id"] == sends[0]["uuid"]
    clock.advance(10)
    router.batch_progress(b)
    assert rows(db, "patch")[-1]["target"] == sends[0]["uuid"]


def test_a_cli_batch_has_no_progress_card(db, router):
    b = queue.create_batch(db, [{"task_key": "x"}], now=0, source="cli")
    router.batch_progress(b)
    router.batch_finished(b)
    assert rows(db) == []


# --- size ------------------------------------------------------------------------------------

def test_cards_for_a_ten_thousand_task_batch_stay_under_30_kb(db, router, clock):
    n = 10_000
    queue.create_batch(db, [{"task_key": f"任务-{'x' * 40}-{i}"} for i in range(n)], now=0,
                       source="chat", batch_id="big", chat_id="oc_ops",
                       command_message_id="om_big")
    classes = ["plugin_timeout", "bad_request", "server", "network", "synthesis", "unknown"] + \
        [f"class{i}" for i in range(30)]
    with transaction(db) as conn:
        conn.execute("UPDATE tasks SET status = 'failed', error_class = 'c' || (id % 36),"
                     " error_message = ? , finished_at = 1", ["错误" * 300])
    batch_row = queue.get_batch(db, "big")
    from bot.alerting.router import failure_groups, failures_by_class
    summary = alert_cards.summary_card(batch_row, queue.batch_counts(db, "big"),
                                       failure_groups(db, "big"), "zh", clock.now())
    progress = alert_cards.progress_card(batch_row, queue.batch_counts(db, "big"),
                                         failures_by_class(db, "big"), "zh", clock.now())
    assert size(summary) < 30_000 and size(progress) < 30_000
    assert "另外" in text_of(summary)   # "and N more"
    assert classes  # (classes only shape the data above)
    for t in queue.tasks_of(db, "big")[:2000]:   # a grouped alert over thousands of tasks
        router.task_finished(t, MEDIUM, RunFailed("720701002", "x" * 2000))
    alert = load_alert(db, "big:coze:plugin_timeout")
    card = alert_cards.alert_card(alert, "zh", router.settings.tz)
    assert alert["count"] == 2000 and size(card) < 30_000
    assert "等另外 1980 个" in text_of(card)


# --- with the real worker against the Coze simulator ----------------------------------------

def _drain_with(db, router, sim, tmp_path):
    import asyncio
    import dataclasses

    from pipeline.coze import CozeClient
    from pipeline.ratelimit import RateLimiter
    from pipeline.worker import Worker
    from tests.test_worker import FAST

    async def go():
        async with CozeClient(sim.base_url, sim.token, limiter=RateLimiter(500, burst=50)) as coze:
            worker = Worker(db, dataclasses.replace(FAST, output_dir=str(tmp_path)), coze, "wf1",
                            notifier=router)
            await asyncio.wait_for(worker.run(drain=True), 30)
            worker.synth.close()
    asyncio.run(go())


def test_worker_plugin_timeout_gives_one_medium_card_and_retry_resolves_it(db, tmp_path):
    import asyncio

    from bot.alerting.actions import handle_alert_action
    from pipeline.clock import Clock
    from pipeline.standins.simulator import CozeSimulator, Script

    router = AlertRouter(db, make_settings(failure_rate_min_tasks=1000), Clock())
    sim = CozeSimulator(default_duration=lambda key: 0.02)
    loop_sim = asyncio.new_event_loop()   # the simulator serves from its own thread
    loop_sim.run_until_complete(sim.start())
    thread = threading.Thread(target=loop_sim.run_forever, daemon=True)
    thread.start()
    try:
        sim.script("bad", Script(fail_first_n_runs=2))   # plugin timeout twice, then fine
        b = queue.create_batch(db, [{"task_key": k} for k in ("ok1", "bad", "ok2")], now=0,
                               source="cli", batch_id="bw")
        _drain_with(db, router, sim, tmp_path)
        cards = [r for r in rows(db, "send") if "card" in r["payload"]]
        assert [c["ref"] for c in cards] == ["bw:coze:plugin_timeout"]
        bad = next(t for t in queue.tasks_of(db, b) if t["task_key"] == "bad")
        assert bad["status"] == "failed"
        answer = checked_answer(handle_alert_action(
            db, router.settings, {"action": "retry", "task_id": bad["id"],
                                  "key": "bw:coze:plugin_timeout"}, "ou_admin", Clock()))
        assert answer["toast"]["type"] == "success"
        _drain_with(db, router, sim, tmp_path)
        assert queue.get_task(db, bad["id"])["status"] == "succeeded"
        assert load_alert(db, "bw:coze:plugin_timeout")["status"] == "resolved"
        assert len([r for r in rows(db, "send") if "text" in r["payload"]]) == 1
    finally:
        asyncio.run_coroutine_threadsafe(sim.stop(), loop_sim).result(10)
        loop_sim.call_soon_threadsafe(loop_sim.stop)
        thread.join(5)

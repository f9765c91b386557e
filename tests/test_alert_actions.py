"""Buttons: each action does what it says; a second press changes nothing and says so."""
from __future__ import annotations

import json

import pytest

from bot.alert_actions import handle_alert_action
from bot.alerts import AlertRouter, load_alert
from pipeline.breaker import Breaker, all_states
from pipeline.config import BreakerPolicy
from pipeline.clock import FakeClock
from storage import queue
from storage.db import transaction
from tests.test_alerts import FATAL, batch, fail, make_settings, rows

ADMIN = "ou_admin"


@pytest.fixture
def clock():
    return FakeClock(1_750_000_000.0)


@pytest.fixture
def settings():
    return make_settings()


@pytest.fixture
def router(db, settings, clock):
    return AlertRouter(db, settings, clock)


def press(db, settings, clock, value):
    answer = handle_alert_action(db, settings, value, ADMIN, clock)
    if "card" in answer:
        assert answer["card"]["type"] == "raw"
        assert answer["card"]["data"]["schema"] == "2.0"
    return answer


def snapshot(db):
    return {t: db.execute(f"SELECT * FROM {t} ORDER BY rowid").fetchall()
            for t in ("tasks", "batches", "alerts", "silences", "breakers", "outbox")}


def test_retry_requeues_the_failed_task_once(db, settings, clock, router):
    b = batch(db, 1)
    tid = queue.tasks_of(db, b)[0]["id"]
    fail(db, router, tid)
    key = f"{b}:coze:plugin_timeout"
    first = press(db, settings, clock, {"action": "retry", "task_id": tid, "key": key})
    assert first["toast"]["type"] == "success"
    assert queue.get_task(db, tid)["status"] == "queued"
    card = json.dumps(first["card"]["data"], ensure_ascii=False)
    assert "<at id=ou_admin></at>" in card and "重试了 1 个任务" in card
    before = snapshot(db)
    second = press(db, settings, clock, {"action": "retry", "task_id": tid, "key": key})
    assert second["toast"]["type"] == "info"
    assert "queued" in second["toast"]["content"]   # "task k0 is queued now; nothing to retry"
    assert snapshot(db) == before


def test_retry_on_an_old_card_for_a_task_that_moved_on_does_nothing(db, settings, clock, router):
    b = batch(db, 1)
    tid = queue.tasks_of(db, b)[0]["id"]
    with transaction(db) as conn:
        conn.execute("UPDATE tasks SET status = 'succeeded' WHERE id = ?", [tid])
    before = snapshot(db)
    answer = press(db, settings, clock, {"action": "retry", "task_id": tid})
    assert answer["toast"]["type"] == "info" and "succeeded" in answer["toast"]["content"]
    assert snapshot(db) == before


def test_a_pending_patch_does_not_revert_the_card_a_button_answered(db, settings, clock, router):
    """A grouped card has a coalesced patch pending; Ignore answers with the grey card; the
    pending patch must deliver that card too, not the open one with buttons."""
    from storage import outbox
    b = batch(db, 3)
    ids = [t["id"] for t in queue.tasks_of(db, b)]
    fail(db, router, ids[0])
    with transaction(db) as conn:
        conn.execute("UPDATE outbox SET status = 'sent', result = 'om_alert' WHERE kind = 'send'")
    clock.advance(0.2)
    fail(db, router, ids[1])
    key = f"{b}:coze:plugin_timeout"
    assert len(rows(db, "patch")) == 1
    answer = press(db, settings, clock, {"action": "ignore", "task_id": ids[0], "key": key})
    assert answer["card"]["data"]["header"]["template"] == "grey"
    delivered = outbox.claim_due(db, owner="w", now=clock.now() + 5)
    assert [r["kind"] for r in delivered] == ["patch"]
    assert delivered[0]["payload"]["card"] == answer["card"]["data"]


def test_a_press_with_no_pending_patch_enqueues_none(db, settings, clock, router):
    b = batch(db, 1)
    tid = queue.tasks_of(db, b)[0]["id"]
    fail(db, router, tid)
    press(db, settings, clock, {"action": "ignore", "task_id": tid,
                                "key": f"{b}:coze:plugin_timeout"})
    assert rows(db, "patch") == []


def test_retry_batch_requeues_every_failed_task(db, settings, clock, router):
    b = batch(db, 3)
    for t in queue.tasks_of(db, b)[:2]:
        fail(db, router, t["id"])
    answer = press(db, settings, clock, {"action": "retry_batch", "batch_id": b})
    assert answer["toast"]["type"] == "success" and "2" in answer["toast"]["content"]
    assert queue.batch_counts(db, b)["failed"] == 0
    assert answer["card"]["data"]["header"]["title"]["content"].startswith("批次进度")
    before = snapshot(db)
    assert press(db, settings, clock, {"action": "retry_batch", "batch_id": b})["toast"]["type"] \
        == "info"
    assert snapshot(db) == before


def test_ignore_marks_the_tasks_and_the_alert(db, settings, clock, router):
    b = batch(db, 2)
    ids = [t["id"] for t in queue.tasks_of(db, b)]
    for tid in ids:
        fail(db, router, tid)
    key = f"{b}:coze:plugin_timeout"
    answer = press(db, settings, clock, {"action": "ignore", "task_id": ids[0], "key": key})
    assert answer["toast"]["type"] == "success"
    assert [queue.get_task(db, i)["status"] for i in ids] == ["ignored", "ignored"]
    assert load_alert(db, key)["status"] == "ignored"
    assert answer["card"]["data"]["header"]["template"] == "grey"
    before = snapshot(db)
    assert press(db, settings, clock, {"action": "ignore", "task_id": ids[0],
                                       "key": key})["toast"]["type"] == "info"
    assert snapshot(db) == before


def test_silence_silences_the_key_and_later_failures_send_nothing(db, settings, clock, router):
    b = batch(db, 3)
    ids = [t["id"] for t in queue.tasks_of(db, b)]
    fail(db, router, ids[0])
    key = f"{b}:coze:plugin_timeout"
    clock.advance(100)
    answer = press(db, settings, clock, {"action": "silence", "key": key, "seconds": 7200})
    assert answer["toast"]["type"] == "success"
    assert db.execute("SELECT until FROM silences WHERE key = ?", [key]).fetchone()[0] == \
        clock.now() + 7200
    assert "已静默" in json.dumps(answer["card"]["data"], ensure_ascii=False)
    before = snapshot(db)
    assert press(db, settings, clock, {"action": "silence", "key": key,
                                       "seconds": 7200})["toast"]["type"] == "info"
    assert snapshot(db) == before
    sends = len(rows(db, "send"))
    clock.advance(3700)  # past the group window, still silenced: counted, not sent
    fail(db, router, ids[1])
    assert len(rows(db, "send")) == sends
    assert load_alert(db, key)["details"]["suppressed"] == 1
    clock.advance(3600)  # the silence is over: the next failure is announced
    fail(db, router, ids[2])
    assert len(rows(db, "send")) == sends + 1


def test_resume_unblocks_the_batch_closes_breakers_and_resolves_the_card(db, settings, clock,
                                                                        router):
    b = batch(db, 2)
    queue.set_batch_status(db, b, "running", now=clock.now())
    Breaker(db, "coze", BreakerPolicy(), clock.now).trip("auth: token invalid")
    queue.block_open_batches(db, now=clock.now(), reason="auth")
    router.batch_blocked(b, FATAL, RuntimeError("token invalid"))
    key = f"{b}:coze:auth"
    answer = press(db, settings, clock, {"action": "resume", "batch_id": b, "key": key})
    assert answer["toast"]["type"] == "success"
    assert queue.get_batch(db, b)["status"] == "running"
    assert [s.state for s in all_states(db)] == ["closed"]
    assert load_alert(db, key)["status"] == "resolved"
    assert answer["card"]["data"]["header"]["template"] == "green"
    notices = [r for r in rows(db, "send") if "text" in r["payload"]]
    assert len(notices) == 1
    before = snapshot(db)
    second = press(db, settings, clock, {"action": "resume", "batch_id": b, "key": key})
    assert second["toast"]["type"] == "info" and "running" in second["toast"]["content"]
    assert snapshot(db) == before


def test_cancel_cancels_once(db, settings, clock, router):
    b = batch(db, 2)
    fail(db, router, queue.tasks_of(db, b)[0]["id"])
    answer = press(db, settings, clock, {"action": "cancel", "batch_id": b})
    assert answer["toast"]["type"] == "success"
    assert queue.get_batch(db, b)["status"] == "cancelled"
    assert queue.batch_counts(db, b)["cancelled"] == 1
    assert load_alert(db, f"{b}:coze:plugin_timeout")["status"] == "ignored"
    before = snapshot(db)
    assert press(db, settings, clock, {"action": "cancel", "batch_id": b})["toast"]["type"] \
        == "info"
    assert snapshot(db) == before


@pytest.mark.parametrize("value", [
    {}, {"action": "explode"}, {"action": "retry"}, {"action": "retry", "task_id": "abc"},
    {"action": "retry", "task_id": 999}, {"action": "resume"},
    {"action": "cancel", "batch_id": "nope"}, {"action": "silence"},
    {"action": "silence", "key": "k", "seconds": "soon"},
])
def test_bad_values_answer_an_error_toast_and_change_nothing(db, settings, clock, value):
    batch(db, 1)
    before = snapshot(db)
    answer = handle_alert_action(db, settings, value, ADMIN, clock)
    assert answer["toast"]["type"] == "error"
    assert "card" not in answer
    assert snapshot(db) == before


def test_english_toasts(db, clock, router):
    settings = make_settings().replace(language="en")
    b = batch(db, 1)
    answer = handle_alert_action(db, settings, {"action": "retry_batch", "batch_id": b}, ADMIN,
                                 clock)
    assert answer["toast"]["content"] == "No failed task to retry"

"""Buttons: each action does what it says; a second press changes nothing and says so."""
from __future__ import annotations

import json

import pytest

from bot.alerting.actions import handle_alert_action
from bot.alerting.router import load_alert
from pipeline.breaker import Breaker, all_states
from pipeline.config import BreakerPolicy
from storage import queue
from storage.db import transaction
from tests.helpers import checked_answer
# the clock, settings and router fixtures are shared with the alert router's tests
from tests.test_alerts import (FATAL, batch, clock, fail, make_settings,  # noqa: F401
                               router, rows, settings)

ADMIN = "ou_admin"




def press(db, settings, clock, value):
    answer = checked_answer(handle_alert_action(db, settings, value, ADMIN, clock))
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
    assert "排队中" in second["toast"]["content"]   # "task k0 is queued now; nothing to retry"
    assert snapshot(db) == before


def test_retry_on_an_old_card_for_a_task_that_moved_on_does_nothing(db, settings, clock, router):
    b = batch(db, 1)
    tid = queue.tasks_of(db, b)[0]["id"]
    with transaction(db) as conn:
        conn.execute("UPDATE tasks SET status = 'succeeded' WHERE id = ?", [tid])
    before = snapshot(db)
    answer = press(db, settings, clock, {"action": "retry", "task_id": tid})
    assert answer["toast"]["type"] == "info" and "成功" in answer["toast"]["content"]
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
    assert second["toast"]["type"] == "info" and "运行中" in second["toast"]["content"]
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


def test_unknown_ids_are_named_in_chinese_not_in_english(db, settings, clock):
    batch(db, 1)
    answer = handle_alert_action(db, settings, {"action": "retry", "task_id": 999}, ADMIN, clock)
    assert answer["toast"]["content"] == "找不到任务 999"
    answer = handle_alert_action(db, settings, {"action": "cancel", "batch_id": "nope"}, ADMIN,
                                 clock)
    assert answer["toast"]["content"] == "找不到批次 nope"


def test_english_toasts(db, clock, router):
    settings = make_settings().replace(language="en")
    b = batch(db, 1)
    answer = handle_alert_action(db, settings, {"action": "retry_batch", "batch_id": b}, ADMIN,
                                 clock)
    assert answer["toast"]["content"] == "No failed task to retry"


# --- chat commands do what the buttons do ------------------------------------------------------

def say(db, settings, clock, text):
    from bot.chat.commands import parse
    from bot.chat.handlers import Context, execute
    ctx = Context(db, settings, None, clock, sender=ADMIN, chat_id="oc", message_id="om_cmd")
    return execute(ctx, parse(text))


def _blocked(db, clock, router, n=1, batch_id="b1"):
    b = batch(db, n, batch_id=batch_id)
    Breaker(db, "coze", BreakerPolicy(), clock.now).trip("auth: token invalid")
    queue.block_open_batches(db, now=clock.now(), reason="auth")
    router.batch_blocked(b, FATAL, RuntimeError("token invalid"))
    return b, f"{b}:coze:auth"


@pytest.mark.parametrize("text", ["恢复 b1", "resume b1", "resume"])
def test_chat_resume_resolves_the_high_card_like_the_button(db, settings, clock, router, text):
    b, key = _blocked(db, clock, router)
    card = say(db, settings, clock, text)
    assert card["header"]["template"] == "green"
    assert queue.get_batch(db, b)["status"] == "running"
    assert [s.state for s in all_states(db)] == ["closed"]
    alert = load_alert(db, key)
    assert alert["status"] == "resolved"
    assert alert["details"]["actions"][-1]["by"] == ADMIN
    notices = [r for r in rows(db, "send") if "text" in r["payload"]]
    assert len(notices) == 1
    # the HIGH card's Resume button now just says so
    answer = press(db, settings, clock, {"action": "resume", "batch_id": b, "key": key})
    assert answer["toast"]["type"] == "info"


@pytest.mark.parametrize("text", ["取消 b1", "cancel b1"])
def test_chat_cancel_ignores_the_batch_alerts_and_patches_their_cards(db, settings, clock, router,
                                                                     text):
    b = batch(db, 2)
    fail(db, router, queue.tasks_of(db, b)[0]["id"])
    key = f"{b}:coze:plugin_timeout"
    say(db, settings, clock, text)
    assert queue.get_batch(db, b)["status"] == "cancelled"
    assert load_alert(db, key)["status"] == "ignored"
    [patch] = rows(db, "patch")
    assert patch["target"] == load_alert(db, key)["message_uuid"]
    assert patch["payload"]["card"]["header"]["template"] == "grey"


@pytest.mark.parametrize("how", ["button", "command"])
def test_resuming_a_paused_batch_leaves_a_fatal_breaker_open(db, settings, clock, router, how):
    b = batch(db, 1)
    queue.set_batch_status(db, b, "paused", now=clock.now())
    Breaker(db, "coze", BreakerPolicy(), clock.now).trip("auth: token invalid")
    if how == "button":
        answer = press(db, settings, clock, {"action": "resume", "batch_id": b})
        text = answer["toast"]["content"]
    else:
        text = json.dumps(say(db, settings, clock, f"resume {b}"), ensure_ascii=False)
    assert queue.get_batch(db, b)["status"] == "running"
    assert [s.state for s in all_states(db)] == ["open"]
    assert "已暂停 → 运行中" in text and "熔断器" not in text


@pytest.mark.parametrize("text", ["resume", "resume b2", "恢复"])
def test_resume_with_a_manual_breaker_and_nothing_blocked_resets_the_breaker(db, settings, clock,
                                                                            router, text):
    """Batch A blocked by a bad token was cancelled; the new batch B stays queued behind the
    tripped breaker until someone says resume: that must reset it, not refuse."""
    a, _ = _blocked(db, clock, router)
    say(db, settings, clock, f"cancel {a}")
    b = batch(db, 1, batch_id="b2")
    card = say(db, settings, clock, text)
    assert [s.state for s in all_states(db)] == ["closed"]
    shown = json.dumps(card, ensure_ascii=False)
    assert card["header"]["template"] == "green" and "熔断器已重置（coze）" in shown
    assert queue.get_batch(db, b)["status"] == "queued"


def test_resume_with_nothing_to_resume_says_so(db, settings, clock):
    batch(db, 1)
    card = say(db, settings, clock, "resume")
    assert "无需恢复" in json.dumps(card, ensure_ascii=False)
    assert card["header"]["template"] == "blue"


def test_resume_of_a_queued_batch_while_another_is_blocked_is_refused(db, settings, clock,
                                                                      router):
    _blocked(db, clock, router)
    batch(db, 1, batch_id="b2")  # created after the block: queued
    card = say(db, settings, clock, "resume b2")
    assert "排队中" in json.dumps(card, ensure_ascii=False)
    assert [s.state for s in all_states(db)] == ["open"]

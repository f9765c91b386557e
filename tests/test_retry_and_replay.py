"""One retry path for the chat and the buttons (both resolve the alert); `replay` of dead rows."""
from __future__ import annotations

import json

import pytest

from bot.chat import handlers
from bot.alerting.actions import handle_alert_action
from bot.alerting.router import load_alert
from bot.chat.commands import Command, parse
from bot.metrics import render_metrics
from storage import outbox, queue
from storage.db import transaction
from tests.helpers import ADMIN, USER, message_event
# the clock, settings and router fixtures are shared with the alert router's tests
from tests.test_alerts import batch, clock, fail, router, settings  # noqa: F401


def say(db, settings, clock, text, sender=ADMIN):
    payload = message_event(text, sender=sender)
    return handlers.handle_message(db, settings, None, clock, payload)


def card_text(card):
    return json.dumps(card, ensure_ascii=False)


def alert_sends(db):
    return [json.loads(r[0]) for r in db.execute(
        "SELECT payload FROM outbox WHERE kind = 'send' ORDER BY id")]


@pytest.mark.parametrize("how", ["chat", "chat_batch", "button", "button_batch"])
def test_retry_from_chat_or_button_requeues_and_resolves_the_alert(db, settings, clock, router,
                                                                   how):
    b = batch(db, 1)
    tid = queue.tasks_of(db, b)[0]["id"]
    fail(db, router, tid)
    key = f"{b}:coze:plugin_timeout"
    assert load_alert(db, key)["status"] == "open"
    if how == "chat":
        answer = card_text(say(db, settings, clock, "retry k0"))
    elif how == "chat_batch":
        answer = card_text(say(db, settings, clock, f"retry batch {b}"))
    elif how == "button":
        answer = card_text(handle_alert_action(
            db, settings, {"action": "retry", "task_id": tid, "key": key}, ADMIN, clock))
    else:
        answer = card_text(handle_alert_action(
            db, settings, {"action": "retry_batch", "batch_id": b}, ADMIN, clock))
    assert "已重新排队 1 个任务" in answer
    assert queue.get_task(db, tid)["status"] == "queued"
    alert = load_alert(db, key)
    assert alert["status"] == "resolved"
    assert alert["details"]["actions"][-1]["by"] == ADMIN
    notices = [p["text"] for p in alert_sends(db) if "text" in p]
    assert len(notices) == 1 and "已恢复" in notices[0]


def test_retrying_part_of_an_alert_notes_it_and_keeps_it_open(db, settings, clock, router):
    b = batch(db, 2)
    ids = [t["id"] for t in queue.tasks_of(db, b)]
    for tid in ids:
        fail(db, router, tid)
    key = f"{b}:coze:plugin_timeout"
    say(db, settings, clock, "retry k0")
    alert = load_alert(db, key)
    assert alert["status"] == "open" and "重试了 1 个任务" in card_text(alert["details"])
    say(db, settings, clock, "retry k1")
    assert load_alert(db, key)["status"] == "resolved"


def test_a_retried_task_that_fails_again_gets_a_new_card(db, settings, clock, router):
    b = batch(db, 1)
    tid = queue.tasks_of(db, b)[0]["id"]
    fail(db, router, tid)
    say(db, settings, clock, "retry k0")
    with transaction(db) as conn:
        conn.execute("UPDATE tasks SET status = 'running' WHERE id = ?", [tid])
    clock.advance(120)                       # the new run failed two minutes later
    fail(db, router, tid)
    cards = [p for p in alert_sends(db) if "card" in p]
    assert len(cards) == 2 and load_alert(db, f"{b}:coze:plugin_timeout")["status"] == "open"


def test_a_second_retry_changes_nothing(db, settings, clock, router):
    b = batch(db, 1)
    tid = queue.tasks_of(db, b)[0]["id"]
    fail(db, router, tid)
    say(db, settings, clock, "retry k0")
    before = db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0]
    again = card_text(say(db, settings, clock, "retry k0"))
    assert "无需重试" in again
    assert db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0] == before + 1   # the reply


# --- replay -----------------------------------------------------------------------------------

@pytest.mark.parametrize("text, rows", [
    ("replay", ()), ("重发", ()), ("/replay 3", (3,)), ("replay 3,4 4 5", (3, 4, 5)),
    ("重发 12，13", (12, 13)),
])
def test_replay_parses(text, rows):
    assert parse(text) == Command("replay", rows=rows)
    assert parse(parse(text).to_text()) == parse(text)


@pytest.mark.parametrize("text", ["replay abc", "replay -1", "replay 1.5", "replay #3",
                                  "replay " + " ".join(map(str, range(101))),
                                  "replay 1234567890123"])
def test_replay_refuses_what_is_not_a_row_id(text):
    assert parse(text).code in ("bad_id", "unexpected")


def dead_row(db, clock, text="hi"):
    uid = outbox.enqueue(db, "send", "oc_x", {"text": text}, now=clock.now())
    row_id = db.execute("SELECT id FROM outbox WHERE uuid = ?", [uid]).fetchone()[0]
    outbox.mark_dead(db, row_id, now=clock.now(), error="Bot is not in the chat")
    return row_id


def test_status_and_metrics_count_dead_rows_and_replay_puts_them_back(db, settings, clock):
    a, b = dead_row(db, clock, "a"), dead_row(db, clock, "b")
    status = card_text(say(db, settings, clock, "status"))
    assert "2 条消息未能送达" in status and "replay" in status
    assert "\nopsbot_outbox_dead 2\n" in render_metrics(db)
    answer = card_text(say(db, settings, clock, f"重发 {a}"))
    assert "已重新排队 1 条消息" in answer and str(a) in answer
    assert outbox.dead_count(db) == 1
    assert "\nopsbot_outbox_dead 1\n" in render_metrics(db)
    assert "没有发送失败的消息" in card_text(say(db, settings, clock, f"replay {a}"))
    say(db, settings, clock, "replay")
    assert outbox.dead_count(db) == 0
    assert "未能送达" not in card_text(say(db, settings, clock, "status"))
    assert b


def test_replay_is_for_admins_only(db, settings, clock):
    row_id = dead_row(db, clock)
    answer = card_text(say(db, settings, clock, "replay", sender=USER))
    assert "没有权限" in answer and outbox.dead_count(db) == 1
    assert row_id


def test_help_lists_replay_with_what_it_means_for_duplicates(db, settings, clock):
    text = card_text(say(db, settings, clock, "help"))
    assert "`replay` / `重发`" in text and "新的 uuid" in text

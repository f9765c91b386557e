"""Issue 8: what the strict Feishu stand-in found, each over the real sender and lark-oapi client.

Every test here failed before its fix: the card was refused by the stand-in (as by Feishu), a
toast showed markdown, or a locked card's PATCH was dropped.
"""
from __future__ import annotations

import json

import pytest

from bot.alerting.router import AlertRouter, load_alert, resolve_alert
from bot.alerting.canary import Canary
from bot.feishu.client import FeishuClient
from bot.feishu.sender import OutboxSender
from bot.settings import AlertSettings, FeishuSettings, Settings
from pipeline.clock import FakeClock
from pipeline.fallback import Switch
from storage import outbox, queue
from storage.db import transaction
from tests.fake_feishu import FakeFeishu
from tests.test_alerts import FATAL, MEDIUM, batch, fail

CHAT = "oc_alerts"


def make_settings(**alerts) -> Settings:
    return Settings(feishu=FeishuSettings(alert_chat_id=CHAT, admin_ids=("ou_admin",),
                                          oncall_ids=("ou_oncall",)),
                    alerts=AlertSettings(failure_rate_min_tasks=1000, **alerts))


@pytest.fixture
def clock():
    return FakeClock(1_750_000_000.0)


@pytest.fixture
def fake():
    with FakeFeishu() as server:
        yield server


def deliver(db, fake, clock, passes: int = 4) -> None:
    sender = OutboxSender(db, FeishuClient(fake.settings()), clock=clock, owner="t",
                          rng=lambda: 1.0)
    for _ in range(passes):
        sender.deliver_due()
        clock.advance(5.0)


def dead_rows(db) -> list:
    return list(db.query("SELECT kind, last_error FROM outbox WHERE status = 'dead'"))


def patched_cards(fake) -> list[str]:
    return [json.dumps(p["content"], ensure_ascii=False) for p in fake.patches]


# --- notes the bot writes itself mention nobody ------------------------------------------------

def test_canary_resolved_patch_is_accepted(db, fake, clock):
    """Before: the resolved card carried <at id=opsbot>, which is no user: refused, so the HIGH
    card kept its red header and live buttons."""
    settings = make_settings(canary_interval=60)
    router = AlertRouter(db, settings, clock)
    canary = Canary(db, settings, clock, router)
    first = canary.tick()
    _finish(db, first, "failed")
    canary.tick()
    deliver(db, fake, clock)
    assert load_alert(db, "canary")["status"] == "open" and len(fake.messages) >= 1
    clock.advance(60)
    second = canary.tick()
    _finish(db, second, "succeeded")
    canary.tick()
    deliver(db, fake, clock)
    assert load_alert(db, "canary")["status"] == "resolved"
    assert dead_rows(db) == []
    resolved = patched_cards(fake)[-1]
    assert '"template": "green"' in resolved and "<at" not in resolved and "opsbot" in resolved


def test_fallback_switch_back_patch_is_accepted(db, fake, clock):
    router = AlertRouter(db, make_settings(), clock)
    router.workflow_switched(Switch(True, "wf_main", "wf_backup", "4 of the last 5 failed"))
    deliver(db, fake, clock)
    router.workflow_switched(Switch(False, "wf_main", "wf_backup", "cool-down over"))
    deliver(db, fake, clock)
    assert dead_rows(db) == [] and load_alert(db, "workflow:fallback")["status"] == "resolved"
    assert "<at" not in patched_cards(fake)[-1]


def test_superseded_card_patch_is_accepted(db, fake, clock):
    router = AlertRouter(db, make_settings(group_window=60), clock)
    b = batch(db, 2)
    ids = [t["id"] for t in queue.tasks_of(db, b)]
    fail(db, router, ids[0])
    deliver(db, fake, clock)
    clock.advance(120)
    fail(db, router, ids[1])
    deliver(db, fake, clock)
    assert dead_rows(db) == []
    assert len(fake.messages) == 2
    old = fake.messages[0]["content"]
    assert old["header"]["template"] == "green" and "behaviors" not in json.dumps(old)


def _finish(db, batch_id: str, status: str) -> None:
    with transaction(db) as conn:
        conn.execute("UPDATE tasks SET status = ?, finished_at = 1, error_message = ?"
                     " WHERE batch_id = ?", [status, "boom" if status == "failed" else None,
                                             batch_id])
        conn.execute("UPDATE batches SET status = 'done' WHERE id = ?", [batch_id])


# --- <at id=all> only when configured ----------------------------------------------------------

def test_critical_card_with_nobody_configured_is_delivered(db, fake, clock):
    """Before: CRITICAL with nobody configured mentioned <at id=all>: refused unless the group
    owner allowed it, so the most important card was the one that failed."""
    router = AlertRouter(db, Settings(feishu=FeishuSettings(alert_chat_id=CHAT)), clock)
    router.breaker_changed("coze", "closed", "open", "5000: server error")
    deliver(db, fake, clock)
    assert dead_rows(db) == [] and len(fake.messages) == 1
    assert "FEISHU_ONCALL_IDS" in json.dumps(fake.messages[0]["content"], ensure_ascii=False)


def test_mention_all_is_refused_where_the_owner_did_not_allow_it(db, fake, clock):
    settings = Settings(feishu=FeishuSettings(alert_chat_id=CHAT),
                        alerts=AlertSettings(mention_all=True))
    router = AlertRouter(db, settings, clock)
    router.breaker_changed("coze", "closed", "open", "5000: server error")
    deliver(db, fake, clock)
    assert fake.take_refusals()[0]["code"] == 230099        # Feishu's answer, as configured
    # the card still arrives: without the mention, saying it was refused
    assert dead_rows(db) == [] and len(fake.messages) == 1
    text = json.dumps(fake.messages[0]["content"], ensure_ascii=False)
    assert "<at" not in text and "FEISHU_ONCALL_IDS" in text
    fake.allow_mention_all(CHAT)
    router.breaker_changed("coze", "open", "closed", None)
    router.breaker_changed("coze", "closed", "open", "5000: server error again")
    deliver(db, fake, clock)
    assert "<at id=all></at>" in json.dumps(fake.messages[-1]["content"])


# --- toasts are plain text ---------------------------------------------------------------------

def test_toasts_show_text_as_typed(db, clock):
    """Before: toasts carried backticks around keys and entities for < > [ ]."""
    from bot.alerting.actions import handle_alert_action
    from tests.helpers import checked_answer
    router = AlertRouter(db, make_settings(), clock)
    key = "b1:coze:plugin_timeout"
    b = queue.create_batch(db, [{"task_key": "<at id=all> [x](y) `k`"}], now=0, source="chat",
                           batch_id="b1")
    [task] = queue.tasks_of(db, b)
    fail(db, router, task["id"])
    answer = handle_alert_action(db, router.settings, {"action": "silence", "key": key},
                                 "ou_admin", clock)
    assert answer["toast"]["content"].startswith("已静默 b1:coze:plugin_timeout 至")
    checked_answer(answer)
    with transaction(db) as conn:
        conn.execute("UPDATE tasks SET status = 'succeeded' WHERE id = ?", [task["id"]])
    answer = handle_alert_action(db, router.settings, {"action": "retry", "task_id": task["id"],
                                                       "key": key}, "ou_admin", clock)
    assert "<at id=all> [x](y) `k`" in answer["toast"]["content"]   # as typed, no entities
    assert "&#" not in answer["toast"]["content"]


# --- a locked card's PATCH is retried shortly, not dropped --------------------------------------

def test_patch_of_a_locked_card_is_retried_not_dropped(db, fake, clock):
    router = AlertRouter(db, make_settings(), clock)
    b = batch(db, 2)
    ids = [t["id"] for t in queue.tasks_of(db, b)]
    fail(db, router, ids[0])
    deliver(db, fake, clock, passes=1)
    fake.lock_card(times=2)   # someone is pressing a button on it
    fail(db, router, ids[1])
    sender = OutboxSender(db, FeishuClient(fake.settings()), clock=clock, owner="t",
                          rng=lambda: 1.0)
    waits = []
    for _ in range(3):
        sender.deliver_due()
        row = db.execute("SELECT status, next_at FROM outbox WHERE kind = 'patch'"
                         " ORDER BY id DESC LIMIT 1").fetchone()
        waits.append(row[1] - clock.now())
        clock.advance(max(row[1] - clock.now(), 0) + 0.01)
    assert dead_rows(db) == []
    assert len(fake.patches) == 1 and "× 2" in patched_cards(fake)[0]
    assert 0 < waits[0] <= 1.0 and 0 < waits[1] <= 2.0        # shortly, not a long backoff


def test_a_refused_card_is_still_dead_not_retried(db, fake, clock):
    outbox.enqueue(db, "send", CHAT, {"card": {"schema": "2.0", "body": {"elements": [
        {"tag": "note", "elements": []}]}}}, now=clock.now(), uuid="u-bad")
    deliver(db, fake, clock, passes=2)
    assert [r["kind"] for r in dead_rows(db)] == ["send"]
    assert len(fake.take_refusals()) == 1


# --- the report renders as intended ------------------------------------------------------------

def test_report_headings_do_not_run_into_lists():
    """Before: "**Errors by class**" right after the top-nodes list was read by CommonMark as
    part of that list's last item."""
    from markdown_it import MarkdownIt
    from bot.alerting.report import report_lines
    report = {"runs": 3, "succeeded": 2, "failed": 1, "ignored": 0, "cancelled": 0,
              "success_rate": 2 / 3, "retries": 1, "failures": 2,
              "latency": {s: {"avg": 1.0, "p95": 2.0, "count": 3} for s in ("coze", "synthesis")},
              "top_nodes": [{"name": "n1", "count": 2}, {"name": "n2", "count": 1}],
              "errors": [{"name": "plugin_timeout", "count": 2}],
              "trend": {"runs": 1, "success_rate": None, "retries": 0, "failures": 1}}
    tokens = MarkdownIt("commonmark").parse("\n".join(report_lines(report, "en")))
    depth, top_level_paragraphs, lists = 0, [], 0
    for i, tok in enumerate(tokens):
        if tok.type in ("bullet_list_open", "ordered_list_open"):
            lists += depth == 0
            depth += 1
        elif tok.type in ("bullet_list_close", "ordered_list_close"):
            depth -= 1
        elif tok.type == "inline" and depth == 0:
            top_level_paragraphs.append(tok.content)
    assert lists == 3   # the figures, the top nodes, the errors
    assert top_level_paragraphs[:2] == ["**Top failing nodes**", "**Errors by class**"]
    assert top_level_paragraphs[2].startswith("**Vs the day before**")

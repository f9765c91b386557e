"""One cause, one card: MEDIUM alerts of a cause a HIGH alert stands for fold into its card."""
from __future__ import annotations

import json

from bot.alerting.router import AlertRouter, load_alert, resolve_batch_unblocked
from bot.alerting.canary import Canary
from pipeline.errors import RunFailed
from storage import queue
from storage.db import transaction
from tests.test_alerts import FATAL, batch, clock, fail, rows, succeed  # noqa: F401
from tests.test_card_defects import deliver, make_settings
from tests.fake_feishu import FakeFeishu

KEY = "b1:coze:plugin_timeout"


def card_text(row) -> str:
    return json.dumps(row["payload"]["card"], ensure_ascii=False)


def test_medium_cards_of_a_blocked_batch_fold_into_its_high_card(db, clock):
    router = AlertRouter(db, make_settings(), clock)
    b = batch(db, 4)
    ids = [t["id"] for t in queue.tasks_of(db, b)]
    router.batch_blocked(b, FATAL, RunFailed("4100", "token invalid"))
    high = f"{b}:coze:auth"
    assert [r["ref"] for r in rows(db, "send")] == [high]
    fail(db, router, ids[0])
    clock.advance(2)
    fail(db, router, ids[1])
    assert [r["ref"] for r in rows(db, "send")] == [high]          # no MEDIUM card beside it
    medium = load_alert(db, KEY)
    assert medium["details"]["held_by"] == high and medium["message_uuid"] is None
    assert medium["count"] == 2
    holder = load_alert(db, high)
    assert holder["details"]["held"] == {KEY: {"count": 2, "tier": "MEDIUM"}}
    patched = card_text([r for r in rows(db, "patch") if r["ref"] == high][-1])
    assert "2 条已并入此卡片" in patched and KEY in patched
    assert router.stats["held"] == 2


def test_when_the_high_alert_resolves_held_alerts_are_sent_on_their_own(db, clock):
    router = AlertRouter(db, make_settings(), clock)
    b = batch(db, 3)
    ids = [t["id"] for t in queue.tasks_of(db, b)]
    router.batch_blocked(b, FATAL, RunFailed("4100", "token invalid"))
    fail(db, router, ids[0])
    clock.advance(5)
    resolve_batch_unblocked(db, router.settings, b, now=clock.now(), by="ou_admin")
    sends = [r for r in rows(db, "send") if "card" in r["payload"]]
    assert [r["ref"] for r in sends] == [f"{b}:coze:auth", KEY]
    released = load_alert(db, KEY)
    assert "held_by" not in released["details"] and released["message_uuid"] == sends[-1]["uuid"]
    assert "重试" in card_text(sends[-1])            # its Retry / Ignore buttons, live
    holder = load_alert(db, f"{b}:coze:auth")
    assert holder["status"] == "resolved" and holder["details"]["released"] == 1
    high_patch = [r for r in rows(db, "patch") if r["ref"] == f"{b}:coze:auth"][-1]
    assert "仍未解决，已各自单独发出" in card_text(high_patch)
    fail(db, router, ids[1])                  # no holder any more: counted on its own card
    assert len([r for r in rows(db, "send") if r["ref"] == KEY]) == 1


def test_a_held_alert_whose_tasks_succeed_resolves_quietly_and_leaves_the_count(db, clock):
    router = AlertRouter(db, make_settings(), clock)
    b = batch(db, 2)
    ids = [t["id"] for t in queue.tasks_of(db, b)]
    router.batch_blocked(b, FATAL, RunFailed("4100", "token invalid"))
    fail(db, router, ids[0])
    succeed(db, router, ids[0])
    assert load_alert(db, KEY)["status"] == "resolved"
    assert [r for r in rows(db, "send") if "text" in r["payload"]] == []   # no notice
    assert load_alert(db, f"{b}:coze:auth")["details"]["held"] == {}
    high_patch = [r for r in rows(db, "patch") if r["ref"] == f"{b}:coze:auth"][-1]
    assert "并入" not in card_text(high_patch)


def test_other_batches_are_not_held(db, clock):
    router = AlertRouter(db, make_settings(), clock)
    b1 = batch(db, 1, batch_id="b1")
    b2 = batch(db, 1, batch_id="b2")
    router.batch_blocked(b1, FATAL, RunFailed("4100", "token invalid"))
    fail(db, router, queue.tasks_of(db, b2)[0]["id"])
    assert [r["ref"] for r in rows(db, "send")] == ["b1:coze:auth", "b2:coze:plugin_timeout"]


def test_a_failing_canary_gives_one_card_and_its_recovery_closes_what_it_held(db, clock):
    settings = make_settings(canary_interval=60)
    router = AlertRouter(db, settings, clock)
    canary = Canary(db, settings, clock, router)
    first = canary.tick()
    [task] = queue.tasks_of(db, first)
    fail(db, router, task["id"])               # the worker reports the canary task's failure
    canary.tick()                              # the canary check raises the HIGH alert
    cards = [r for r in rows(db, "send") if "card" in r["payload"]]
    assert [r["ref"] for r in cards] == ["canary"]
    assert "1 条已并入此卡片" in card_text(cards[0])
    with FakeFeishu() as fake:                 # and Feishu takes the card
        deliver(db, fake, clock)
        assert len(fake.messages) == 1
    with transaction(db) as conn:
        conn.execute("UPDATE batches SET status = 'done' WHERE id = ?", [first])
    clock.advance(60)
    second = canary.tick()
    [task2] = queue.tasks_of(db, second)
    with transaction(db) as conn:
        conn.execute("UPDATE tasks SET status = 'succeeded', finished_at = ? WHERE id = ?",
                     [clock.now(), task2["id"]])
    canary.tick()
    assert load_alert(db, "canary")["status"] == "resolved"
    held_key = f"{first}:coze:plugin_timeout"
    assert load_alert(db, held_key)["status"] == "resolved"
    assert [r["ref"] for r in rows(db, "send") if "card" in r["payload"]] == ["canary"]

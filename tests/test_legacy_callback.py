"""Legacy card callbacks (``card.action.trigger_v1`` at ``/webhook/card``): acted on, answered
with the toast alone (their answer format carries JSON 1.0 cards; ours are 2.0), and the pressed
card updated by an API PATCH through the outbox. Real web app, real sender, real lark-oapi
against the fake Feishu."""
from __future__ import annotations

import json
import time

import pytest

from bot.alerting.router import AlertRouter
from bot.app import create_app
from bot.feishu.client import FeishuClient
from bot.web.legacy_callbacks import LEGACY_KV_KEY, legacy_answer
from bot.feishu.sender import OutboxSender
from bot.settings import Secret, Settings
from pipeline.clock import FakeClock
from storage import kv, queue
from tests.fake_feishu import FakeFeishu
from tests.helpers import (ADMIN, ENCRYPT_KEY, TOKEN, card_action_event, legacy_card_action,
                           sign_legacy, signed_event)
from tests.test_alerts import batch, fail

ALERT_CHAT = "oc_alerts"


@pytest.fixture
def fake():
    with FakeFeishu() as server:
        yield server


@pytest.fixture
def clock():
    return FakeClock(time.time())   # signed requests carry the real time


@pytest.fixture
def settings(fake, db_path):
    return Settings(feishu=fake.settings(verification_token=Secret(TOKEN),
                                         encrypt_key=Secret(ENCRYPT_KEY), admin_ids=(ADMIN,),
                                         alert_chat_id=ALERT_CHAT, oncall_ids=(ADMIN,)),
                    db_path=db_path)


@pytest.fixture
def sender(db, settings, clock):
    return OutboxSender(db, FeishuClient(settings.feishu), clock=clock, owner="test-sender")


@pytest.fixture
def web(settings, db, clock):
    return create_app(settings, db=db, clock=clock, dispatch=False).test_client()


def alert_card_sent(db, settings, clock, sender, fake):
    """A MEDIUM alert card for one failed task, delivered to the fake; (task id, key, msg id)."""
    router = AlertRouter(db, settings, clock)
    b = batch(db, 1)
    tid = queue.tasks_of(db, b)[0]["id"]
    fail(db, router, tid)
    router.flush()
    sender.deliver_due()
    [message] = fake.wait_for_messages(1)
    return tid, f"{b}:coze:plugin_timeout", message["message_id"]


def press_legacy(web, value, message_id):
    body = json.dumps(legacy_card_action(value, message_id=message_id)).encode()
    return web.post("/webhook/card", data=body, headers=sign_legacy(body, TOKEN))


def test_legacy_press_answers_the_toast_and_patches_the_card(web, db, settings, clock, sender,
                                                             fake):
    tid, key, message_id = alert_card_sent(db, settings, clock, sender, fake)
    resp = press_legacy(web, {"action": "ignore", "task_id": tid, "key": key}, message_id)
    assert resp.status_code == 200
    assert set(resp.json) == {"toast"}           # no 2.0 card in a 1.0-shaped answer
    assert resp.json["toast"]["type"] == "success" and resp.json["toast"]["content"]
    assert queue.get_task(db, tid)["status"] == "ignored"
    [patch] = db.execute("SELECT target, payload FROM outbox WHERE kind = 'patch'").fetchall()
    send_uuid = db.execute("SELECT uuid FROM outbox WHERE kind = 'send'").fetchone()[0]
    assert patch[0] == send_uuid                 # in line with the router's own patches
    card = json.loads(patch[1])["card"]
    assert card["schema"] == "2.0" and card["header"]["template"] == "grey"
    sender.deliver_due()
    [delivered] = fake.wait_for_patches(1)
    assert delivered["message_id"] == message_id and delivered["content"] == card
    seen = kv.get_json(db, LEGACY_KV_KEY)
    assert seen["count"] == 1 and seen["last_at"] == clock.now()


def test_new_callback_still_gets_toast_and_card(web, db, settings, clock, sender, fake):
    tid, key, message_id = alert_card_sent(db, settings, clock, sender, fake)
    body, headers = signed_event(card_action_event({"action": "ignore", "task_id": tid,
                                                    "key": key}, message_id=message_id))
    resp = web.post("/webhook/event", data=body, headers=headers)
    assert set(resp.json) == {"toast", "card"} and resp.json["card"]["type"] == "raw"
    assert db.execute("SELECT COUNT(*) FROM outbox WHERE kind = 'patch'").fetchone()[0] == 0
    assert kv.get(db, LEGACY_KV_KEY) is None


def test_legacy_press_of_a_card_we_did_not_send_patches_the_message_id(web, db, settings,
                                                                       clock, sender, fake):
    tid, key, _ = alert_card_sent(db, settings, clock, sender, fake)
    db.execute("UPDATE outbox SET result = NULL")   # e.g. its send row was pruned
    resp = press_legacy(web, {"action": "ignore", "task_id": tid, "key": key}, "om_elsewhere")
    assert set(resp.json) == {"toast"}
    [target] = db.execute("SELECT target FROM outbox WHERE kind = 'patch'").fetchone()
    assert target == "om_elsewhere"


def test_legacy_status_press_refreshes_the_card_by_patch(web, db):
    # status is read-only but answers with the batch card as it is now: the legacy answer cannot
    # carry it, so it goes out as one PATCH of the pressed message
    b = batch(db, 1)
    resp = press_legacy(web, {"action": "status", "batch_id": b}, "om_card")
    assert set(resp.json) == {"toast"} and resp.json["toast"]["type"] == "success"
    rows = db.execute("SELECT kind, target FROM outbox").fetchall()
    assert [tuple(r) for r in rows] == [("patch", "om_card")]
    assert kv.get_json(db, LEGACY_KV_KEY)["count"] == 1


def test_refused_legacy_press_counts_nothing(web, db):
    body = json.dumps(legacy_card_action({"action": "status", "batch_id": "b1"})).encode()
    resp = web.post("/webhook/card", data=body, headers=sign_legacy(body, "wrong"))
    assert resp.status_code == 401
    assert kv.get(db, LEGACY_KV_KEY) is None


@pytest.mark.parametrize("answer, reply, card", [
    ({"toast": {"type": "info", "content": "x"}}, {"toast": {"type": "info", "content": "x"}},
     None),
    ({"toast": {"type": "info", "content": "x"}, "card": {"type": "raw", "data": {"a": 1}}},
     {"toast": {"type": "info", "content": "x"}}, {"a": 1}),
    ({"card": {"type": "template", "data": {"template_id": "t"}}}, {}, None),
    ({"card": {"type": "raw", "data": "not a card"}}, {}, None),
    ({}, {}, None),
])
def test_legacy_answer_splits_toast_and_card(answer, reply, card):
    assert legacy_answer(answer) == (reply, card)

"""The web app end to end: Flask test client -> intake -> inbox -> dispatcher -> fake Feishu."""
from __future__ import annotations

import json
import time

import pytest

from bot.app import create_app
from bot.feishu.client import FeishuClient
from bot.settings import Secret, Settings
from storage import queue
from tests.fake_feishu import FakeFeishu
from tests.helpers import (ADMIN, ENCRYPT_KEY, TOKEN, USER, card_action_event, checked_answer,
                           encrypt, message_event, sign, signed_event, table_counts,
                           url_verification)

APP, TABLE = "app_tok", "tbl_1"


@pytest.fixture
def fake():
    with FakeFeishu() as server:
        yield server


@pytest.fixture
def settings(fake, db_path):
    return Settings(feishu=fake.settings(verification_token=Secret(TOKEN),
                                         encrypt_key=Secret(ENCRYPT_KEY), admin_ids=(ADMIN,),
                                         bitable_app_token=APP, bitable_table_id=TABLE),
                    db_path=db_path, max_body_bytes=50_000, web_dispatch=True)


@pytest.fixture
def client(settings, db):
    app = create_app(settings, db=db, feishu_client=FeishuClient(settings.feishu))
    return app.test_client()


def post(client, payload, path="/webhook/event"):
    body, headers = signed_event(payload)
    return client.post(path, data=body, headers=headers)


def settle(db, timeout=5.0):
    """Wait until the dispatcher has handled every inbox row and sent every message.

    Bitable write-backs stay pending: the web process leaves them to the worker.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        busy = db.execute("SELECT (SELECT COUNT(*) FROM inbox WHERE status = 'new')"
                          " + (SELECT COUNT(*) FROM outbox WHERE status = 'pending'"
                          "    AND kind != 'bitable_update')").fetchone()[0]
        if not busy:
            return
        time.sleep(0.02)
    raise AssertionError("dispatcher did not settle")


def replies(fake):
    return [m for m in fake.messages if m["reply_to"]]


def card_text(card):
    return json.dumps(card, ensure_ascii=False)


def test_healthz_and_metrics(client):
    assert client.get("/healthz").json == {"ok": True}
    text = client.get("/metrics").get_data(as_text=True)
    assert "opsbot_inbox_pending 0" in text and "opsbot_outbox_depth 0" in text


def test_url_verification_plain_and_encrypted(client):
    plain = client.post("/webhook/event", json=url_verification(challenge="c1"))
    enc = client.post("/webhook/event",
                      json={"encrypt": encrypt(json.dumps(url_verification(challenge="c2")),
                                               ENCRYPT_KEY)})
    assert (plain.status_code, plain.json) == (200, {"challenge": "c1"})
    assert (enc.status_code, enc.json) == (200, {"challenge": "c2"})


def _bad_sig():
    body, headers = signed_event(message_event("run"))
    headers["X-Lark-Signature"] = headers["X-Lark-Signature"][::-1]
    return body, headers


def _signed_body(body: bytes):
    return body, sign(body, ENCRYPT_KEY)


def _bad_padding_body():
    import base64
    raw = base64.b64decode(encrypt("{}", ENCRYPT_KEY))
    return json.dumps({"encrypt": base64.b64encode(raw[:-1] + bytes([raw[-1] ^ 1])).decode()}) \
        .encode()


CASES = {
    "bad_signature": (_bad_sig, 401),
    "missing_headers": (lambda: (signed_event(message_event("run"))[0], {}), 401),
    "bad_token": (lambda: signed_event(message_event("run", token="nope")), 401),
    "broken_json": (lambda: _signed_body(b'{"encrypt": '), 400),
    "broken_base64": (lambda: _signed_body(b'{"encrypt": "%%%"}'), 400),
    "wrong_padding": (lambda: _signed_body(_bad_padding_body()), 400),
    "unknown_schema": (lambda: signed_event({"schema": "3.0", "header": {"token": TOKEN}}), 400),
    "plaintext_with_key": (lambda: _signed_body(json.dumps(message_event("run")).encode()), 400),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_rejections(client, db, fake, case):
    build, status = CASES[case]
    before = table_counts(db)
    body, headers = build()
    resp = client.post("/webhook/event", data=body, headers=headers)
    assert resp.status_code == status
    assert resp.json["error"]
    assert table_counts(db) == before
    assert fake.messages == []


def test_oversized_refused_by_content_length_before_reading(client, db):
    import io
    reads = []

    class Exploding(io.BytesIO):
        def read(self, *a):
            reads.append(a)
            raise AssertionError("body was read")
        readline = read

    resp = client.post("/webhook/event", environ_overrides={
        "wsgi.input": Exploding(b""), "CONTENT_LENGTH": "10000000",
        "CONTENT_TYPE": "application/json"})
    assert reads == []
    assert resp.status_code == 413 and resp.json["error"] == "too_large"
    assert table_counts(db)["inbox"] == 0


def test_oversized_without_length(client, db):
    body, headers = signed_event(message_event("x" * 60_000))
    resp = client.post("/webhook/event", data=body, headers=headers)
    assert resp.status_code == 413 and table_counts(db)["inbox"] == 0


def test_unknown_event_type_200_nothing_stored(client, db):
    ev = message_event("help")
    ev["header"]["event_type"] = "contact.user.created_v3"
    resp = post(client, ev)
    assert (resp.status_code, resp.json) == (200, {})
    assert table_counts(db) == {k: 0 for k in table_counts(db)}


def test_help_sends_exactly_one_help_card(client, db, fake):
    resp = post(client, message_event("help", message_id="om_help"))
    assert resp.status_code == 200
    settle(db)
    msgs = fake.wait_for_messages(1)
    assert len(msgs) == 1 and msgs[0]["reply_to"] == "om_help"
    assert msgs[0]["msg_type"] == "interactive"
    assert "run" in card_text(msgs[0]["content"]) and "帮助" in card_text(msgs[0]["content"])


def test_redelivery_new_event_id_one_row_one_reply(client, db, fake):
    first = post(client, message_event("status", message_id="om_dup", event_id="e1"))
    settle(db)
    second = post(client, message_event("status", message_id="om_dup", event_id="e2"))
    settle(db)
    assert first.status_code == second.status_code == 200
    assert table_counts(db)["inbox"] == 1
    assert len(fake.requests_to("/reply")) == 1 and len(replies(fake)) == 1


def test_non_admin_run_is_refused_politely(client, db, fake):
    fake.seed_records(APP, TABLE, [{"task_id": "t1", "状态": "待处理"}])
    post(client, message_event("run", sender=USER, message_id="om_nope"))
    settle(db)
    [msg] = fake.wait_for_messages(1)
    text = card_text(msg["content"])
    assert ADMIN in text and "<at" not in text and "管理员" in text  # named, not @-mentioned
    assert table_counts(db)["batches"] == 0 and fake.requests_to("/records/search") == []


def test_admin_run_creates_batch_from_pending_rows(client, db, fake):
    fake.seed_records(APP, TABLE, [
        {"task_id": "t1", "状态": "待处理", "topic": "cats"},
        {"task_id": "t2", "状态": "待处理", "topic": "dogs"},
        {"task_id": "t3", "状态": "已完成", "topic": "old"},
        {"task_id": "t4", "状态": "待处理", "topic": "skip me"},
    ])
    post(client, message_event("run --exclude t4", message_id="om_run"))
    settle(db)
    [msg] = fake.wait_for_messages(1)
    [batch] = queue.list_batches(db)
    tasks = queue.tasks_of(db, batch["id"])
    assert sorted(t["task_key"] for t in tasks) == ["t1", "t2"]
    assert json.loads(tasks[0]["params"]) == {"topic": "cats"}
    assert (batch["source"], batch["created_by"], batch["command_message_id"]) == \
        ("chat", ADMIN, "om_run")
    text = card_text(msg["content"])
    assert "**2**" in text and batch["id"] in text


def test_admin_run_feishu_failure_explains(client, db, fake):
    fake.fail("search", status=400, code=1254045, times=1)
    post(client, message_event("run", message_id="om_fail"))
    settle(db)
    [msg] = fake.wait_for_messages(1)
    assert "1254045" in card_text(msg["content"]) and table_counts(db)["batches"] == 0


def test_card_action_answers_synchronously(client, db):
    bid = queue.create_batch(db, [{"task_key": "a"}], now=1.0, source="chat")
    resp = post(client, card_action_event({"action": "cancel", "batch_id": bid}))
    assert resp.status_code == 200 and checked_answer(resp.json)["toast"]["type"] == "success"
    assert queue.get_batch(db, bid)["status"] == "cancelled"


def test_card_action_non_admin_changes_nothing(client, db):
    bid = queue.create_batch(db, [{"task_key": "a"}], now=1.0, source="chat")
    before = table_counts(db)
    resp = post(client, card_action_event({"action": "cancel", "batch_id": bid}, operator=USER))
    assert checked_answer(resp.json)["toast"]["type"] == "error"
    assert queue.get_batch(db, bid)["status"] == "queued" and table_counts(db) == before

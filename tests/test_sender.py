"""OutboxSender: real SQLite outbox, real lark-oapi client, fake Feishu server, fake clock."""
from __future__ import annotations

import logging
import threading
import time

import pytest

from bot.feishu.client import FeishuClient
from bot.feishu.sender import OutboxSender
from tests.fake_feishu import FakeFeishu
from pipeline.clock import FakeClock
from storage import outbox

CHAT = "oc_ops"


def card(title: str) -> dict:
    return {"schema": "2.0", "config": {"update_multi": True},
            "header": {"title": {"tag": "plain_text", "content": title}},
            "body": {"elements": [{"tag": "markdown", "content": title}]}}


@pytest.fixture
def fake():
    with FakeFeishu() as server:
        yield server


@pytest.fixture
def clock():
    return FakeClock()


@pytest.fixture
def sender(db, fake, clock):
    client = FeishuClient(fake.settings(), timeout=2.0)
    # rng=1.0: no jitter, so backoff is exactly 1, 2, 4, ... seconds
    return OutboxSender(db, client, clock=clock, owner="sender-1", rng=lambda: 1.0)


def enqueue(db, clock, kind, target, payload, **kw):
    return outbox.enqueue(db, kind, target, payload, now=clock.now(), **kw)


def row(db, uuid):
    return next(db.query("SELECT * FROM outbox WHERE uuid = ?", [uuid]))


def titles(fake):
    return [m["content"]["header"]["title"]["content"] for m in fake.messages]


def sends(fake):
    return fake.requests_to("/im/v1/messages", "POST")


def test_send_card_and_text_marks_sent_with_message_id(db, fake, clock, sender):
    a = enqueue(db, clock, "send", CHAT, {"card": card("A")})
    b = enqueue(db, clock, "send", CHAT, {"text": "纯文本"})
    assert sender.deliver_due() == 2
    first, second = fake.messages
    assert (first["uuid"], first["msg_type"], first["chat_id"]) == (a, "interactive", CHAT)
    assert (second["uuid"], second["content"]) == (b, {"text": "纯文本"})
    assert row(db, a)["status"] == "sent" and row(db, a)["result"] == first["message_id"]
    assert row(db, b)["result"] == second["message_id"]
    assert sender.deliver_due() == 0
    assert len(sends(fake)) == 2


def test_reply_goes_to_the_message(db, fake, clock, sender):
    root = enqueue(db, clock, "send", CHAT, {"text": "root"})
    sender.deliver_due()
    root_id = row(db, root)["result"]
    r = enqueue(db, clock, "reply", root_id, {"card": card("reply")})
    t = enqueue(db, clock, "reply", root_id, {"text": "收到"})
    assert sender.deliver_due() == 2
    assert [m["reply_to"] for m in fake.messages] == [None, root_id, root_id]
    assert [m["uuid"] for m in fake.messages] == [root, r, t]
    assert fake.messages[2]["content"] == {"text": "收到"}


def test_500_500_200_delivers_once_in_order(db, fake, clock, sender):
    fake.fail("send", status=500, times=2)
    a = enqueue(db, clock, "send", CHAT, {"card": card("A")})
    b = enqueue(db, clock, "send", CHAT, {"card": card("B")})
    start = clock.now()
    assert sender.deliver_due() == 0
    assert fake.messages == [] and len(sends(fake)) == 1  # B waits behind A
    assert row(db, a)["next_at"] == start + 1.0 and row(db, b)["next_at"] == start + 1.0
    clock.advance(1.0)
    assert sender.deliver_due() == 0
    assert row(db, a)["next_at"] == clock.now() + 2.0 and "500" in row(db, a)["last_error"]
    clock.advance(1.0)
    assert sender.deliver_due() == 0 and len(sends(fake)) == 2  # not due yet
    clock.advance(1.0)
    assert sender.deliver_due() == 2
    assert titles(fake) == ["A", "B"]
    assert [s["json"]["uuid"] for s in sends(fake)] == [a, a, a, b]
    assert row(db, a)["attempts"] == 3 and row(db, a)["status"] == "sent"


def test_429_reset_is_respected(db, fake, clock, sender):
    fake.fail("send", code=99991400, status=429, headers={"x-ogw-ratelimit-reset": "30"})
    a = enqueue(db, clock, "send", CHAT, {"card": card("A")})
    b = enqueue(db, clock, "send", CHAT, {"card": card("B")})
    start = clock.now()
    assert sender.deliver_due() == 0
    assert row(db, a)["next_at"] == start + 30 and row(db, b)["next_at"] == start + 30
    clock.advance(29.5)
    assert sender.deliver_due() == 0
    assert len(sends(fake)) == 1 and fake.messages == []
    clock.advance(0.5)
    assert sender.deliver_due() == 2
    assert titles(fake) == ["A", "B"]


def test_chat_rate_limit_error_backs_off(db, fake, clock, sender):
    fake.fail("send", code=230020, msg="rate limited")
    a = enqueue(db, clock, "send", CHAT, {"text": "x"})
    assert sender.deliver_due() == 0
    assert row(db, a)["status"] == "pending" and row(db, a)["next_at"] > clock.now()
    clock.advance(1)
    assert sender.deliver_due() == 1


def test_backoff_is_capped_and_jittered(db, fake, clock):
    client = FeishuClient(fake.settings())
    s = OutboxSender(db, client, clock=clock, owner="x", max_backoff=300, rng=lambda: 0.0)
    assert s.backoff(0) == 0.5
    assert s.backoff(3) == 4.0
    assert s.backoff(30) == 150.0          # cap 300, jitter down to half
    assert s.backoff(1, retry_after=60) == 60
    s.rng = lambda: 1.0
    assert s.backoff(100) == 300.0


def test_permanent_error_marks_dead_and_next_rows_go(db, fake, clock, sender, caplog):
    fake.fail("send", code=230002, msg="Bot is not in the chat")
    a = enqueue(db, clock, "send", CHAT, {"card": card("A")})
    b = enqueue(db, clock, "send", CHAT, {"card": card("B")})
    c = enqueue(db, clock, "send", "oc_other", {"card": card("C")})
    with caplog.at_level(logging.ERROR, logger="opsbot.sender"):
        assert sender.deliver_due() == 2
    assert row(db, a)["status"] == "dead" and "230002" in row(db, a)["last_error"]
    assert row(db, b)["status"] == "sent" and row(db, c)["status"] == "sent"
    assert titles(fake) == ["B", "C"]
    [record] = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert record.feishu_code == 230002 and record.outbox_uuids == [a]
    assert fake.app_secret not in caplog.text


def test_malformed_payload_is_dead(db, fake, clock, sender):
    bad = enqueue(db, clock, "send", CHAT, {"nothing": 1})
    good = enqueue(db, clock, "send", CHAT, {"text": "ok"})
    assert sender.deliver_due() == 1
    assert row(db, bad)["status"] == "dead" and "KeyError" in row(db, bad)["last_error"]
    assert row(db, good)["status"] == "sent"
    assert [m["uuid"] for m in fake.messages] == [good]


def test_patch_waits_for_its_send(db, fake, clock, sender):
    fake.fail("send", status=500)
    s = enqueue(db, clock, "send", CHAT, {"card": card("v1")})
    p = enqueue(db, clock, "patch", s, {"card": card("v2")})
    assert sender.deliver_due() == 0
    assert fake.patches == [] and fake.messages == []
    assert row(db, p)["status"] == "pending" and row(db, p)["next_at"] > clock.now()
    clock.advance(2.0)
    assert sender.deliver_due() == 2
    [msg] = fake.messages
    [patch] = fake.patches
    assert patch["message_id"] == msg["message_id"] == row(db, s)["result"]
    assert patch["content"]["header"]["title"]["content"] == "v2"
    assert row(db, p)["result"] == msg["message_id"]


def test_patch_in_same_pass_and_by_message_id(db, fake, clock, sender):
    s = enqueue(db, clock, "send", CHAT, {"card": card("v1")})
    enqueue(db, clock, "patch", s, {"card": card("v2")})
    assert sender.deliver_due() == 2
    message_id = row(db, s)["result"]
    enqueue(db, clock, "patch", message_id, {"card": card("v3")})
    assert sender.deliver_due() == 1
    assert [p["content"]["header"]["title"]["content"] for p in fake.patches] == ["v2", "v3"]
    assert titles(fake) == ["v3"]


def test_patch_of_dead_send_is_dead(db, fake, clock, sender):
    fake.fail("send", code=230025, msg="card too big")
    s = enqueue(db, clock, "send", CHAT, {"card": card("huge")})
    p = enqueue(db, clock, "patch", s, {"card": card("v2")})
    unknown = enqueue(db, clock, "patch", "no-such-uuid", {"card": card("v2")})
    assert sender.deliver_due() == 0
    assert [row(db, u)["status"] for u in (s, p, unknown)] == ["dead"] * 3
    assert fake.requests_to("/im/v1/messages/", "PATCH") == []


def test_five_messages_per_second_per_chat(db, fake, clock, sender):
    ids = [enqueue(db, clock, "send", CHAT, {"text": str(i)}) for i in range(7)]
    other = enqueue(db, clock, "send", "oc_other", {"text": "other"})
    assert sender.deliver_due() == 6
    assert [m["content"]["text"] for m in fake.messages] == ["0", "1", "2", "3", "4", "other"]
    assert row(db, ids[5])["next_at"] == clock.now() + 1.0
    clock.advance(0.5)
    assert sender.deliver_due() == 0
    clock.advance(0.5)
    assert sender.deliver_due() == 2
    assert [m["content"]["text"] for m in fake.messages][-2:] == ["5", "6"]
    assert row(db, other)["status"] == "sent"


def test_bitable_updates_are_coalesced(db, fake, clock, sender):
    table = "app1/tbl1"
    ids = fake.seed_records("app1", "tbl1", [{"状态": "待处理", "n": i} for i in range(600)])
    enqueue(db, clock, "bitable_update", table,
            {"record_id": ids[0], "fields": {"状态": "运行中", "开始": 1}})
    for rid in ids:
        enqueue(db, clock, "bitable_update", table, {"record_id": rid, "fields": {"批次": "b1"}})
    enqueue(db, clock, "bitable_update", table,
            {"record_id": ids[0], "fields": {"状态": "完成", "耗时": 3.5}})
    assert sender.deliver_due() == 602
    assert [len(c["records"]) for c in fake.batch_updates] == [500, 100]
    first = fake.batch_updates[0]["records"][0]
    assert first == {"record_id": ids[0],
                     "fields": {"状态": "完成", "开始": 1, "批次": "b1", "耗时": 3.5}}
    stored = fake.records("app1", "tbl1")
    assert stored[ids[0]] == {"状态": "完成", "n": 0, "开始": 1, "批次": "b1", "耗时": 3.5}
    assert stored[ids[599]] == {"状态": "待处理", "n": 599, "批次": "b1"}
    assert outbox.depth(db) == 0


def test_bitable_retryable_failure_holds_later_writes(db, fake, clock, sender):
    fake.fail("batch_update", code=1254291, msg="write conflict")
    for i in range(501):
        enqueue(db, clock, "bitable_update", "app1/tbl1",
                {"record_id": f"rec{i}", "fields": {"n": i}})
    other = enqueue(db, clock, "bitable_update", "app1/tbl2",
                    {"record_id": "recX", "fields": {"n": 1}})
    assert sender.deliver_due() == 1
    assert [c["table_id"] for c in fake.batch_updates] == ["tbl2"]
    assert row(db, other)["status"] == "sent"
    assert outbox.depth(db) == 501
    clock.advance(1.0)
    assert sender.deliver_due() == 501
    assert [len(c["records"]) for c in fake.batch_updates] == [1, 500, 1]


def test_bitable_bad_rows_are_dead_good_rows_written(db, fake, clock, sender):
    bad = enqueue(db, clock, "bitable_update", "app1/tbl1", {"fields": {"n": 1}})
    bad_target = enqueue(db, clock, "bitable_update", "no-slash", {"record_id": "r", "fields": {}})
    good = enqueue(db, clock, "bitable_update", "app1/tbl1", {"record_id": "r1", "fields": {}})
    assert sender.deliver_due() == 1
    assert [row(db, u)["status"] for u in (bad, bad_target, good)] == ["dead", "dead", "sent"]
    assert len(fake.batch_updates) == 1


def test_row_of_a_dead_sender_is_resent_with_same_uuid_once(db, fake, clock, sender):
    u = enqueue(db, clock, "send", CHAT, {"card": card("A")})
    # Another sender claims the row, performs the call, and dies before mark_sent.
    [claimed] = outbox.claim_due(db, owner="dead-sender", now=clock.now(), lease=60)
    first_id = FeishuClient(fake.settings()).send_card(CHAT, claimed["payload"]["card"], u)
    assert sender.deliver_due() == 0  # the lease still holds
    clock.advance(61)
    assert sender.deliver_due() == 1
    assert len(sends(fake)) == 2 and [s["json"]["uuid"] for s in sends(fake)] == [u, u]
    assert len(fake.messages) == 1
    assert row(db, u)["result"] == first_id and row(db, u)["status"] == "sent"


def test_network_error_is_retried(db, fake, clock, sender):
    fake.fail("send", drop=True)
    u = enqueue(db, clock, "send", CHAT, {"text": "x"})
    assert sender.deliver_due() == 0
    assert "connection failed" in row(db, u)["last_error"]
    clock.advance(1)
    assert sender.deliver_due() == 1
    assert len(fake.messages) == 1


def test_run_forever_delivers_and_stops(db_path, fake, clock):
    from storage.db import open_db
    thread_db = open_db(db_path)
    sender = OutboxSender(thread_db, FeishuClient(fake.settings()), clock=clock, owner="loop")
    stop = threading.Event()
    thread = threading.Thread(target=sender.run_forever, args=(stop, 0.05))
    thread.start()
    writer = open_db(db_path)
    try:
        outbox.enqueue(writer, "send", CHAT, {"text": "hi"}, now=clock.now())
        assert fake.wait_for_messages(1, timeout=5)[0]["content"] == {"text": "hi"}
        deadline = time.monotonic() + 5
        while outbox.depth(writer) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert outbox.depth(writer) == 0
    finally:
        stop.set()
        thread.join(5)
        writer.conn.close()
        thread_db.conn.close()
    assert not thread.is_alive()
    assert len(fake.messages) == 1


def mention_card(title: str, who: str) -> dict:
    c = card(title)
    c["body"]["elements"].append({"tag": "markdown", "content": f"on call: <at id={who}></at>"})
    return c


def test_a_card_refused_for_a_mention_goes_again_without_mentions(db, fake, clock, sender,
                                                                 caplog):
    fake.add_users("ou_alice")
    u = enqueue(db, clock, "send", CHAT, {"card": mention_card("HIGH", "ou_nobody")})
    with caplog.at_level(logging.WARNING, logger="opsbot.sender"):
        assert sender.deliver_due() == 1
    refused = fake.take_refusals()
    assert len(refused) == 1 and "100290" in refused[0]["msg"]
    (message,) = fake.messages
    assert message["uuid"] == u
    text = json_text(message["content"])
    assert "<at" not in text and "ou&#95;nobody" in text
    assert "mention" in text or "提醒" in text
    assert row(db, u)["status"] == "sent" and row(db, u)["result"] == message["message_id"]
    assert any("refused a mention" in r.getMessage() for r in caplog.records)
    # a later PATCH with the same bad mention is rescued the same way, not dead
    p = enqueue(db, clock, "patch", u, {"card": mention_card("resolved", "ou_nobody")})
    assert sender.deliver_due() == 1
    assert len(fake.take_refusals()) == 1
    assert row(db, p)["status"] == "sent"
    assert "<at" not in json_text(fake.messages[0]["content"])
    # a good mention is left alone
    g = enqueue(db, clock, "send", CHAT, {"card": mention_card("ok", "ou_alice")})
    assert sender.deliver_due() == 1
    assert "<at id=ou_alice></at>" in json_text(fake.messages[-1]["content"])
    assert row(db, g)["status"] == "sent"


def test_a_card_refused_for_its_structure_is_still_dead(db, fake, clock, sender):
    bad = card("x")
    bad["body"]["elements"].append({"tag": "note", "elements": []})
    u = enqueue(db, clock, "send", CHAT, {"card": bad})
    assert sender.deliver_due() == 0
    assert len(fake.take_refusals()) == 1
    assert row(db, u)["status"] == "dead" and fake.messages == []


def json_text(content) -> str:
    import json
    return json.dumps(content, ensure_ascii=False)


def test_the_fake_refuses_patches_feishu_refuses(db, clock):
    from bot.errors import FeishuError
    now = [1_750_000_000.0]
    with FakeFeishu(clock=lambda: now[0]) as fake:
        client = FeishuClient(fake.settings(), timeout=2.0)
        text_id = client.send_text(CHAT, "plain", "u-text")
        private = card("not shared")
        del private["config"]["update_multi"]
        private_id = client.send_card(CHAT, private, "u-private")
        shared_id = client.send_card(CHAT, card("shared"), "u-shared")
        unshared = card("new")
        del unshared["config"]["update_multi"]
        for message_id, new in ((text_id, card("x")), (private_id, card("x")),
                                (shared_id, unshared)):
            with pytest.raises(FeishuError) as err:
                client.patch_card(message_id, new)
            assert err.value.code == 230001 and not err.value.retryable
        client.patch_card(shared_id, card("13 days later"))      # a shared card: fine
        now[0] += 14 * 86400 + 1
        with pytest.raises(FeishuError) as err:
            client.patch_card(shared_id, card("too late"))
        assert err.value.code == 230001 and "14 days" in err.value.msg
        refused = fake.take_refusals()
        assert [r["message_id"] for r in refused] == [text_id, private_id, shared_id, shared_id]
        assert [p["content"]["header"]["title"]["content"] for p in fake.patches] == \
            ["13 days later"]

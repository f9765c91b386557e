"""The outbox keeps its promise only inside Feishu's one-hour uuid window, and says so.

Real SQLite outbox, the real lark-oapi client against the fake Feishu server (which, like
Feishu, dedupes a uuid for one hour only, on the same injected clock), the real sender.
"""
from __future__ import annotations

import pytest

from bot.feishu.client import FeishuClient
from bot.feishu.sender import OutboxSender
from pipeline.clock import FakeClock
from storage import outbox
from tests.test_sender import card
from tests.fake_feishu import FakeFeishu

CHAT = "oc_ops"
HOUR = 3600.0
FAKE: list = []


@pytest.fixture
def clock():
    return FakeClock()


@pytest.fixture
def fake(clock):
    with FakeFeishu(clock=clock) as server:
        FAKE[:] = [server]
        yield server


@pytest.fixture
def sender(db, fake, clock):
    client = FeishuClient(fake.settings(), timeout=2.0)
    return OutboxSender(db, client, clock=clock, owner="s1", rng=lambda: 1.0)


def row(db, uuid):
    return next(db.query("SELECT * FROM outbox WHERE uuid = ?", [uuid]))


def sends(fake):
    return fake.requests_to("/im/v1/messages", "POST")


def run_until(db, sender, clock, *, seconds, uuid=None):
    """Deliver, then jump to the next due time, until ``seconds`` of fake time have passed.
    Returns the fake times at which a request reached the fake server."""
    end = clock.now() + seconds
    attempted = []
    while clock.now() < end:
        before = len(FAKE[0].requests)
        sender.deliver_due()
        if len(FAKE[0].requests) > before:
            attempted.append(clock.now())
        due = outbox.next_due(db)
        if due is None:
            break
        clock.advance(max(0.5, min(due, end) - clock.now()))
    return attempted


def test_a_failing_send_is_retried_only_inside_the_uuid_window_then_dead(db, fake, clock, sender):
    fake.fail("send", status=500, times=1000)
    uid = outbox.enqueue(db, "send", CHAT, {"text": "hello"}, now=clock.now())
    first = clock.now()
    attempted = run_until(db, sender, clock, seconds=3 * HOUR, uuid=uid)
    r = row(db, uid)
    assert r["status"] == "dead" and "uuid window" in r["last_error"]
    assert r["first_attempt_at"] == first
    assert len(attempted) >= 10                                    # it did keep trying...
    assert max(attempted) < first + HOUR - 60                      # ...but never past the window
    assert outbox.dead_count(db) == 1 and outbox.depth(db) == 0


def test_the_window_starts_at_the_first_attempt_not_at_creation(db, fake, clock, sender):
    """A row that waited an hour behind another (order per chat) still gets its own hour."""
    fake.fail("send", status=500, times=1000)
    a = outbox.enqueue(db, "send", CHAT, {"text": "first"}, now=clock.now())
    b = outbox.enqueue(db, "send", CHAT, {"text": "second"}, now=clock.now())
    run_until(db, sender, clock, seconds=HOUR + 5, uuid=a)
    assert row(db, a)["status"] == "dead"
    assert row(db, b)["first_attempt_at"] is not None               # tried once A was dead
    assert row(db, b)["status"] == "pending"                        # and not given up on
    fake.reset()
    clock.advance(row(db, b)["next_at"] - clock.now())               # its next retry is due
    sender.deliver_due()
    assert row(db, b)["status"] == "sent"
    assert [m["content"]["text"] for m in fake.messages] == ["second"]


def test_a_dead_row_never_blocks_the_rows_behind_it(db, fake, clock, sender):
    fake.fail("send", code=230002, msg="Bot is not in the chat")   # permanent: dead at once
    a = outbox.enqueue(db, "send", CHAT, {"text": "a"}, now=clock.now())
    b = outbox.enqueue(db, "send", CHAT, {"text": "b"}, now=clock.now())
    c = outbox.enqueue(db, "send", CHAT, {"text": "c"}, now=clock.now())
    sender.deliver_due()
    assert [row(db, u)["status"] for u in (a, b, c)] == ["dead", "sent", "sent"]
    assert [m["content"]["text"] for m in fake.messages] == ["b", "c"]


def test_a_retry_after_longer_than_what_is_left_of_the_window_is_dead_now(db, fake, clock,
                                                                          sender):
    uid = outbox.enqueue(db, "send", CHAT, {"text": "x"}, now=clock.now())
    fake.fail("send", status=500)
    sender.deliver_due()
    clock.advance(HOUR - 600)
    fake.fail("send", code=99991400, status=429, headers={"x-ogw-ratelimit-reset": "900"})
    sender.deliver_due()
    r = row(db, uid)
    assert r["status"] == "dead" and r["attempts"] == 2


def test_the_last_retry_is_moved_inside_the_window(db, fake, clock, sender):
    sender.max_backoff = 3000.0
    uid = outbox.enqueue(db, "send", CHAT, {"text": "x"}, now=clock.now())
    start = clock.now()
    fake.fail("send", status=500)
    sender.deliver_due()
    clock.advance(HOUR - 200)
    outbox.mark_retry(db, row(db, uid)["id"], now=clock.now(), next_at=clock.now(),
                      error="x")
    with db.conn:
        db.conn.execute("UPDATE outbox SET attempts = 12 WHERE uuid = ?", [uid])  # long backoff
    fake.fail("send", status=500)
    sender.deliver_due()
    next_at = row(db, uid)["next_at"]
    assert clock.now() < next_at < start + HOUR - 60


def test_patches_and_table_writes_are_not_bound_by_the_window(db, fake, clock, sender):
    fake.fail("patch", status=500, times=1000)
    sent = outbox.enqueue(db, "send", CHAT, {"card": card("1")}, now=clock.now())
    sender.deliver_due()
    p = outbox.enqueue(db, "patch", sent, {"card": card("1")}, now=clock.now())
    run_until(db, sender, clock, seconds=3 * HOUR, uuid=p)
    assert row(db, p)["status"] == "pending"                        # idempotent: keeps trying


def test_replay_sends_a_dead_row_under_a_new_uuid_and_patches_still_find_it(db, fake, clock,
                                                                            sender):
    fake.fail("send", status=500, times=1000)
    uid = outbox.enqueue(db, "send", CHAT, {"card": card("1")}, now=clock.now())
    run_until(db, sender, clock, seconds=2 * HOUR, uuid=uid)
    patch = outbox.enqueue(db, "patch", uid, {"card": card("2")}, now=clock.now())
    sender.deliver_due()
    assert row(db, patch)["status"] == "dead"                       # its card was never sent
    fake.reset()
    replayed = outbox.replay(db, now=clock.now())
    assert [r["uuid"] for r in replayed] == [uid, patch]
    assert outbox.dead_count(db) == 0
    new_uuid = row(db, uid)["send_uuid"]
    assert new_uuid and new_uuid != uid and row(db, patch)["send_uuid"] is None
    sender.deliver_due()
    clock.advance(5)
    sender.deliver_due()
    assert [m["uuid"] for m in fake.messages] == [new_uuid]
    assert row(db, uid)["status"] == "sent" and row(db, patch)["status"] == "sent"
    assert fake.requests_to("/im/v1/messages/" + row(db, uid)["result"], "PATCH")


def test_replay_of_given_rows_only_and_of_nothing(db, fake, clock, sender):
    fake.fail("send", code=230002, times=2)
    a = outbox.enqueue(db, "send", CHAT, {"text": "a"}, now=clock.now())
    b = outbox.enqueue(db, "send", "oc_other", {"text": "b"}, now=clock.now())
    sender.deliver_due()
    assert outbox.replay(db, [], now=clock.now()) == []
    assert outbox.replay(db, [999], now=clock.now()) == []
    assert [r["uuid"] for r in outbox.replay(db, [row(db, b)["id"]], now=clock.now())] == [b]
    assert row(db, a)["status"] == "dead" and row(db, b)["status"] == "pending"
    assert outbox.replay(db, [row(db, b)["id"]], now=clock.now()) == []   # not dead: untouched


def test_the_fake_like_feishu_forgets_a_uuid_after_an_hour(db, fake, clock, sender):
    """Why the window matters: the same uuid an hour later is a second message."""
    client = FeishuClient(fake.settings(), timeout=2.0)
    client.send_text(CHAT, "once", "u-1")
    client.send_text(CHAT, "once", "u-1")
    assert len(fake.messages) == 1
    clock.advance(HOUR)
    client.send_text(CHAT, "once", "u-1")
    assert len(fake.messages) == 2


def test_a_sender_whose_lease_ran_out_cannot_kill_or_release_the_row_another_now_holds(
        db, fake, clock):
    """A claims, stalls past its lease; B claims. A's late give-up or postpone changes nothing
    while B holds the row, nor after B sent it."""
    client = FeishuClient(fake.settings(), timeout=2.0)
    a = OutboxSender(db, client, clock=clock, owner="A", rng=lambda: 1.0)
    b = OutboxSender(db, client, clock=clock, owner="B", rng=lambda: 1.0)
    uid = outbox.enqueue(db, "send", CHAT, {"text": "hello"}, now=clock.now())
    [stale] = outbox.claim_due(db, owner="A", now=clock.now(), lease=30)
    clock.advance(31)
    [held] = outbox.claim_due(db, owner="B", now=clock.now(), lease=30)
    a._dead([stale], "A gave up late")
    a._postpone([stale], clock.now() + 600, "A postponed late")
    after = row(db, uid)
    assert (after["status"], after["lease_owner"], after["next_at"]) == \
        ("pending", "B", held["next_at"])
    assert not outbox.mark_dead(db, stale["id"], now=clock.now(), error="x", owner="A")
    assert not outbox.release(db, stale["id"], next_at=0, reason="x", owner="A")
    b._deliver_message(held, {})
    a._dead([stale], "A gave up late")
    a._postpone([stale], clock.now() + 600, "A postponed late")
    after = row(db, uid)
    assert after["status"] == "sent" and after["last_error"] is None and len(sends(fake)) == 1
    # without an owner (an admin tool) a sent row is still never made dead
    assert not outbox.mark_dead(db, stale["id"], now=clock.now(), error="x")
    assert row(db, uid)["status"] == "sent"

"""Faults in the services around opsbot: Feishu down, Coze rate-limiting, Coze dead.

Real sockets everywhere: the real lark-oapi client against the fake Feishu server, the real
aiohttp Coze client against the Coze simulator, the real worker, alert router and outbox sender
on a real SQLite file. The sender runs on a fake clock, so minutes of Feishu outage pass in
milliseconds; the worker runs on real time with a small breaker window.
"""
from __future__ import annotations

import asyncio
import dataclasses
import itertools
import json
import threading
import time
from collections import defaultdict

import pytest

from bot.alerting.router import load_alert
from bot.feishu.client import FeishuClient
from storage.outbox import reply_uuid
from bot.feishu.sender import OutboxSender
from bot.service import build_notifier
from bot.settings import AlertSettings, FeishuSettings, Settings
from pipeline.clock import FakeClock
from pipeline.config import BreakerPolicy, PipelineConfig, PollPolicy, RetryPolicy
from pipeline.coze import CozeClient
from pipeline.ratelimit import RateLimiter, coze_limiter
from pipeline.standins.simulator import CozeSimulator, Script
from pipeline.worker import Worker
from storage import outbox, queue
from storage.db import open_db, path_of
from tests.fake_feishu import FakeFeishu

ALERT_CHAT = "oc_alerts"
CHATS = ("oc_a", "oc_b", "oc_c")


@pytest.fixture
def fake():
    with FakeFeishu() as server:
        yield server


def outbox_rows(db, *, kind=None, target=None):
    sql, args = "SELECT * FROM outbox WHERE 1", []
    if kind:
        sql, args = sql + " AND kind = ?", args + [kind]
    if target:
        sql, args = sql + " AND target = ?", args + [target]
    return list(db.query(sql + " ORDER BY id", args))


def pump(sender, clock, fake, *, until, step=7.0, limit=2000):
    """Deliver, advance the fake clock, repeat until ``until()``; returns passes made."""
    for n in range(limit):
        sender.deliver_due()
        if until():
            return n
        clock.advance(step)
    raise AssertionError(f"not delivered after {limit} passes: {fake.messages[-3:]}")


# --- 1. Feishu outage ---------------------------------------------------------------------------

def numbered_card(n: int, chat: str) -> dict:
    """A valid 2.0 card carrying its number (the fake refuses a card Feishu would refuse)."""
    return {"schema": "2.0", "config": {"update_multi": True},
            "body": {"elements": [{"tag": "markdown", "content": f"{n} {chat}",
                                   "element_id": f"n{n}"}]}}


def _enqueue_traffic(db, clock, n_per_chat=6):
    """Interleaved sends to three chats plus alert cards; returns uuids in enqueue order."""
    uuids = []
    for i in range(n_per_chat):
        for chat in CHATS:
            uuids.append(outbox.enqueue(db, "send", chat, {"card": numbered_card(i, chat)},
                                        now=clock.now(), uuid=f"u-{chat}-{i}"))
            clock.advance(0.01)
    return uuids


@pytest.mark.parametrize("failure", ["http_500", "rate_limited_99991400", "dropped"])
def test_feishu_outage_everything_delivered_after_recovery_in_order_once(db, fake, failure):
    clock = FakeClock(1_750_000_000.0)
    client = FeishuClient(fake.settings())
    sender = OutboxSender(db, client, clock=clock, owner="t", rng=lambda: 1.0)
    uuids = _enqueue_traffic(db, clock)
    outage = 40  # Feishu calls that fail: minutes of outage at the backoff the sender uses
    if failure == "http_500":
        fake.fail("send", status=503, times=outage)
    elif failure == "dropped":
        fake.fail("send", drop=True, times=outage)
    else:
        fake.fail("send", status=429, code=99991400, times=outage,
                  headers={"x-ogw-ratelimit-reset": "30"})
    started = clock.now()
    pump(sender, clock, fake, until=lambda: len(fake.messages) == len(uuids))
    assert clock.now() - started > 60  # it really was down for minutes of (fake) time

    # none lost, none twice, per chat in enqueue order
    sent = fake.messages
    assert sorted(m["uuid"] for m in sent) == sorted(uuids)
    by_chat = defaultdict(list)
    for m in sent:
        by_chat[m["chat_id"]].append(int(m["content"]["body"]["elements"][0]["content"].split()[0]))
    assert by_chat == {c: list(range(6)) for c in CHATS}
    assert [r["status"] for r in outbox_rows(db)] == ["sent"] * len(uuids)
    # every retried call carried the row's uuid (Feishu dedupes on it)
    send_calls = fake.requests_to("/im/v1/messages", "POST")
    assert {c["json"]["uuid"] for c in send_calls} == set(uuids)
    assert all(c["json"]["uuid"] for c in send_calls)


def test_rate_limited_feishu_waits_for_the_reset_it_asks_for(db, fake):
    clock = FakeClock(1_750_000_000.0)
    sender = OutboxSender(db, FeishuClient(fake.settings()), clock=clock, owner="t",
                          rng=lambda: 0.0)
    outbox.enqueue(db, "send", "oc_a", {"text": "hi"}, now=clock.now(), uuid="u1")
    fake.fail("send", status=429, code=99991400, headers={"x-ogw-ratelimit-reset": "42"})
    sender.deliver_due()
    [row] = outbox_rows(db)
    assert row["status"] == "pending" and row["next_at"] - clock.now() >= 42
    clock.advance(41)
    sender.deliver_due()
    assert fake.messages == []        # not tried before the reset
    clock.advance(1.5)
    sender.deliver_due()
    assert [m["uuid"] for m in fake.messages] == ["u1"]


# --- the pipeline is not slowed by Feishu -----------------------------------------------------

FAST = PipelineConfig(
    max_coze=8, max_synthesis=2, coze_qps=200, lease_seconds=5, idle_interval=0.02,
    skip_synthesis=True,
    poll=PollPolicy(first=0.02, multiplier=1.5, maximum=0.05),
    retry=RetryPolicy(max_attempts=40, initial=0.02, maximum=0.1, max_total=20),
    breaker=BreakerPolicy(failure_threshold=3, open_seconds=0.3, success_threshold=1),
)


def make_settings(db_path, **feishu):
    values = dict(alert_chat_id=ALERT_CHAT, admin_ids=("ou_admin",), oncall_ids=("ou_oncall",))
    values.update(feishu)
    return Settings(feishu=FeishuSettings(**values), db_path=db_path, pipeline=FAST,
                    alerts=AlertSettings(failure_rate_min_tasks=1000))


async def _run_batch(db, settings, sim, n, tmp_path, *, config=FAST, limiter=None,
                     during=None, timeout=60.0):
    """Run a batch of ``n`` tasks with the real worker + notifier; returns (batch, secs, router)."""
    cmd = f"om_cmd{next(_cmd_ids)}"
    batch = queue.create_batch(
        db, [{"task_key": f"t{i}", "params": {"i": i}} for i in range(n)], now=time.time(),
        source="chat", chat_id="oc_run", command_message_id=cmd)
    # the `run` command's reply card, which the progress patches update (as bot.chat.handlers does)
    outbox.enqueue(db, "reply", cmd, {"card": numbered_card(0, batch)}, now=time.time(),
                   uuid=reply_uuid(cmd), ref="oc_run")
    notifier, router = build_notifier(db, settings, _RealClock())
    own = limiter is None   # as run_worker and opsbot run build it: the budget in the store
    limiter = limiter or coze_limiter(config.coze_qps, store=path_of(db), base_url=sim.base_url,
                                      token=sim.token)
    cfg = dataclasses.replace(config, output_dir=str(tmp_path / "out"))
    try:
        async with CozeClient(sim.base_url, sim.token, limiter=limiter) as coze:
            worker = Worker(db, cfg, coze, "wf1", notifier=notifier)
            t0 = time.monotonic()
            job = asyncio.create_task(worker.run(drain=True))
            if during is not None:
                await during(worker, router, batch)
            await asyncio.wait_for(job, timeout)
            took = time.monotonic() - t0
            worker.synth.close()
    finally:
        if own:
            limiter.close()
    router.flush()
    return batch, took, router


_cmd_ids = itertools.count(1)


class _RealClock:
    def now(self):
        return time.time()

    def monotonic(self):
        return time.monotonic()

    async def sleep(self, s):
        await asyncio.sleep(max(0.0, s))


def test_worker_is_not_slowed_while_feishu_is_down(db_path, fake, tmp_path):
    """A batch runs as fast with Feishu answering 500 to everything as with Feishu up; its
    cards wait in the outbox and are all delivered once Feishu is back."""
    settings = make_settings(db_path).replace(
        feishu=fake.settings(alert_chat_id=ALERT_CHAT, admin_ids=("ou_admin",)))
    sim = CozeSimulator(default_duration=0.05)
    for i in range(0, 12, 4):   # a few failures -> MEDIUM alert cards
        sim.script(f"t{i}", Script(outcome="Fail", error_code="4000", duration=0.02,
                                   error_message="invalid parameter"))

    # a sender thread keeps trying Feishu all along, on a fake clock that races ahead
    stop = threading.Event()
    sender_clock = FakeClock(time.time())
    sender_db = open_db(db_path)

    def send_loop():
        sender = OutboxSender(sender_db, FeishuClient(fake.settings()), clock=sender_clock,
                              owner="sender", rng=lambda: 1.0)
        while not stop.is_set():
            sender.deliver_due()
            sender_clock.advance(max(0.0, time.time() - sender_clock.now()) + 5)
            time.sleep(0.01)

    async def go():
        await sim.start()
        try:
            db = open_db(db_path)
            _, up, _ = await _run_batch(db, settings, sim, 24, tmp_path)
            fake.fail("send", status=500, times=10**6)
            fake.fail("reply", status=500, times=10**6)
            fake.fail("patch", status=500, times=10**6)
            thread.start()
            sent_before = len(fake.messages)
            batch, down, _ = await _run_batch(db, settings, sim, 24, tmp_path)
            return db, batch, up, down, sent_before
        finally:
            await sim.stop()

    thread = threading.Thread(target=send_loop, daemon=True)
    db, batch, up, down, sent_before = asyncio.run(go())
    try:
        counts = queue.batch_counts(db, batch)
        assert counts["succeeded"] + counts["failed"] == 24 and counts["failed"] == 3
        assert down < max(2 * up, up + 1.0), (up, down)   # not slowed by Feishu
        assert len(fake.messages) == sent_before            # Feishu really was down
        pending = [r for r in outbox_rows(db) if r["status"] == "pending"
                   and r["kind"] in ("send", "reply")]
        assert pending and all(r["attempts"] >= 1 for r in pending[:1])
        # Feishu comes back: everything queued meanwhile goes out, once each
        with fake._lock:
            for route in ("send", "reply", "patch"):
                fake._scripts[route].clear()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            left = db.execute("SELECT COUNT(*) FROM outbox WHERE status = 'pending'"
                              " AND kind IN ('send', 'reply', 'patch')").fetchone()[0]
            if not left:
                break
            time.sleep(0.05)
        else:
            raise AssertionError("outbox not drained after recovery")
    finally:
        stop.set()
        thread.join(10)
        sender_db.conn.close()
    dead = [r for r in outbox_rows(db) if r["status"] == "dead"]
    assert dead == []
    uuids = [m["uuid"] for m in fake.messages]
    assert len(uuids) == len(set(uuids))
    alert_sends = [m for m in fake.messages if m["chat_id"] == ALERT_CHAT]
    assert len(alert_sends) == 2   # one MEDIUM card per batch (grouped by batch:stage:class)
    replies = [m for m in fake.messages if m["reply_to"]]
    assert sorted(m["reply_to"] for m in replies) == ["om_cmd1", "om_cmd1", "om_cmd2", "om_cmd2"]
    # per batch (one target each): the run reply, then the summary reply, in the order they were
    # queued; the two batches' replies may interleave (order is kept per target only)
    queued = [r["uuid"] for r in outbox_rows(db) if r["kind"] == "reply"]
    for target in ("om_cmd1", "om_cmd2"):
        delivered = [m["uuid"] for m in replies if m["reply_to"] == target]
        assert delivered == [u for u in queued if u in delivered], target


# --- 2. Coze 429 storm and dead Coze ----------------------------------------------------------

def _critical_sends(db):
    return [r for r in outbox_rows(db, kind="send", target=ALERT_CHAT)
            if r["ref"] == "breaker:coze"]


def test_429_storm_stays_under_the_qps_budget_and_recovers(db_path, tmp_path):
    qps = 10
    cfg = dataclasses.replace(FAST, coze_qps=qps, max_coze=8,
                              poll=PollPolicy(first=0.1, multiplier=1.5, maximum=0.3))
    settings = make_settings(db_path)
    sim = CozeSimulator(default_duration=0.2)

    async def during(worker, router, batch):
        await asyncio.sleep(0.3)
        sim.storm_429(1.0, retry_after=0.5)

    async def go():
        await sim.start()
        try:
            db = open_db(db_path)
            # burst 1: the budget is a rate, not a rate plus a bucket's worth
            batch, took, router = await _run_batch(
                db, settings, sim, 8, tmp_path, config=cfg,
                limiter=RateLimiter(qps, burst=1, recovery=2.0), during=during)
            return db, batch, took
        finally:
            await sim.stop()

    db, batch, took = asyncio.run(go())
    storm = [r for r in sim.requests if r.status == 429]
    assert storm, "the storm never hit"
    assert sim.max_rps() <= qps, sim.max_rps()
    # while it stormed the worker backed off: far fewer calls than the budget allows
    assert len(storm) <= qps * 1.0 / 2, len(storm)
    assert queue.batch_counts(db, batch)["succeeded"] == 8
    assert _critical_sends(db) == []   # 429 is back-pressure, not an outage: no breaker


def test_worker_limiter_as_run_worker_builds_it_stays_under_the_qps_budget(db_path, tmp_path):
    qps = 10
    cfg = dataclasses.replace(FAST, coze_qps=qps, max_coze=10,
                              poll=PollPolicy(first=0.05, multiplier=1.0, maximum=0.05))
    settings = make_settings(db_path)
    sim = CozeSimulator(default_duration=0.4)

    async def go():
        await sim.start()
        try:
            db = open_db(db_path)
            await _run_batch(db, settings, sim, 10, tmp_path, config=cfg)  # service's limiter
        finally:
            await sim.stop()

    asyncio.run(go())
    assert sim.max_rps() <= qps, sim.max_rps()


def test_dead_coze_opens_breaker_one_critical_alert_then_recovers(db_path, fake, tmp_path):
    qps = 20
    cfg = dataclasses.replace(FAST, coze_qps=qps, max_coze=6)
    settings = make_settings(db_path)
    sim = CozeSimulator(default_duration=0.1)
    seen = {}

    async def during(worker, router, batch):
        db = worker.db
        while queue.batch_counts(db, batch)["succeeded"] < 3:
            await asyncio.sleep(0.01)
        sim.set_down(True)        # every connection dropped: like a dead host
        t0 = time.monotonic()
        while worker.breaker.state().state != "open":
            await asyncio.sleep(0.01)
            assert time.monotonic() - t0 < 10, "breaker never opened"
        seen["opened"] = True
        before = sim.total_requests
        await asyncio.sleep(1.5)  # several open windows pass while Coze stays down
        seen["calls_while_down"] = sim.total_requests - before
        seen["critical_while_down"] = len(_critical_sends(db))
        seen["alert_while_down"] = (load_alert(db, "breaker:coze") or {}).get("status")
        sim.set_down(False)

    async def go():
        await sim.start()
        try:
            db = open_db(db_path)
            batch, took, router = await _run_batch(db, settings, sim, 30, tmp_path,
                                                   config=cfg, during=during)
            return db, batch
        finally:
            await sim.stop()

    db, batch = asyncio.run(go())
    assert seen["opened"]
    # no retry storm against a dead host: open windows of 0.3 s let a probe or a few through
    assert seen["calls_while_down"] <= cfg.max_coze * (1.5 / 0.3 + 1), seen
    assert sim.max_rps() <= 2 * qps
    assert seen["critical_while_down"] == 1 and seen["alert_while_down"] == "open"
    # recovery: breaker closed, every task done, the alert resolved, still one CRITICAL card
    assert queue.batch_counts(db, batch)["succeeded"] == 30
    state = db.execute("SELECT state FROM breakers WHERE service = 'coze'").fetchone()[0]
    assert state == "closed"
    alert = load_alert(db, "breaker:coze")
    assert alert["tier"] == "CRITICAL" and alert["status"] == "resolved"
    assert len(_critical_sends(db)) == 2   # the CRITICAL card and its one resolved notice
    card, notice = _critical_sends(db)
    assert "card" in json.loads(card["payload"]) and "text" in json.loads(notice["payload"])
    patches = outbox_rows(db, kind="patch", target=card["uuid"])
    assert patches, "the CRITICAL card was never patched to resolved"

"""One Coze budget per account, whoever spends it: the store-held slots, on a fake clock.

Two limiters on one SQLite file stand for two processes (each has its own connection and store
thread); the cross-process test with real processes is in ``test_shared_budget_processes.py``.
"""
from __future__ import annotations

import asyncio

import pytest

from pipeline.clock import FakeClock
from pipeline.ratelimit import RateLimiter, SharedRateLimiter, coze_limiter
from storage import budget, queue
from storage.db import open_db
from tests.helpers import held_write_lock


def limiters(db_path, clock, n=2, rate=10.0, **kw):
    return [SharedRateLimiter(db_path, "acct", rate, clock, **kw) for _ in range(n)]


def run_callers(groups, clock, per_caller=5, callers=4):
    """Every limiter gets ``callers`` coroutines taking ``per_caller`` slots; returns the grant
    times per limiter."""
    granted = [[] for _ in groups]

    async def caller(i, limiter):
        for _ in range(per_caller):
            await limiter.acquire()
            granted[i].append(clock.now())

    async def main():
        await asyncio.gather(*(caller(i, lim) for i, lim in enumerate(groups)
                               for _ in range(callers)))

    asyncio.run(main())
    return granted


def test_two_processes_share_one_rate(db_path):
    open_db(db_path)
    clock = FakeClock()
    a, b = limiters(db_path, clock, rate=10.0)
    start = clock.now()
    try:
        granted = run_callers([a, b], clock)
    finally:
        a.close(), b.close()
    times = sorted(granted[0] + granted[1])
    assert len(times) == 40 and granted[0] and granted[1]
    assert max_in_window(times) <= 10       # never 11 grants inside one second, across both
    assert times[-1] - start < 2 * 3.9      # and the budget is used, not wasted


def test_a_busy_process_reserves_many_slots_per_store_write(db_path):
    clock = FakeClock()
    (a,) = limiters(db_path, clock, n=1, rate=200.0)
    try:
        granted = run_callers([a], clock, per_caller=10, callers=16)
    finally:
        a.close()
    assert len(granted[0]) == 160 and max_in_window(granted[0]) <= 200
    assert a.max_slots == 50 and a.reservations <= 160 / 16   # 16 callers waiting: 16 a write


def max_in_window(times, window=1.0):
    """The most grants in any half-open ``window`` (as the simulator's ``max_rps`` counts)."""
    times, best, lo = sorted(times), 0, 0
    for hi, t in enumerate(times):
        while t - times[lo] >= window - 1e-9:
            lo += 1
        best = max(best, hi - lo + 1)
    return best


def test_unshared_limiters_would_double_the_rate(db_path):
    """The same load on two local buckets: what the shared budget prevents."""
    clock = FakeClock()
    granted = run_callers([RateLimiter(10, clock), RateLimiter(10, clock)], clock)
    assert max_in_window(granted[0] + granted[1]) > 10


def test_an_idle_process_reserves_one_slot_at_a_time(db_path):
    clock = FakeClock()
    (lim,) = limiters(db_path, clock, n=1, rate=20.0)

    async def main():
        for _ in range(5):
            await lim.acquire()
            await clock.sleep(1.0)           # one request a second: no slot is wasted

    try:
        asyncio.run(main())
    finally:
        lim.close()
    assert lim.requests == 5 and lim.reservations == 5


def test_a_slow_down_in_one_process_pauses_the_other(db_path):
    open_db(db_path)
    clock = FakeClock()
    a, b = limiters(db_path, clock, rate=8.0, recovery=10.0)

    async def main():
        await a.acquire()
        await b.acquire()
        a.slow_down(3.0)
        t0 = clock.now()
        await asyncio.sleep(0.05)            # the store thread records the pause
        await b.acquire()
        return clock.now() - t0

    try:
        waited = asyncio.run(main())
    finally:
        a.close(), b.close()
    assert waited >= 3.0 - 1e-6
    assert b.current_rate == pytest.approx(a.policy.rate / 2)   # halved for every process


def test_a_slot_missed_by_a_late_loop_is_dropped_not_used_late(db_path):
    clock = FakeClock()
    (lim,) = limiters(db_path, clock, n=1, rate=4.0, horizon=1.0)

    async def main():
        lim._waiting = 3                     # three callers in line: three slots reserved
        await lim.acquire()
        lim._waiting = 0
        clock.advance(2.0)                   # the loop was stuck; both other slots passed
        await lim.acquire()
        return clock.now()

    try:
        t = asyncio.run(main())
    finally:
        lim.close()
    assert lim.reservations == 2             # the stale slots were dropped, a fresh one taken
    assert lim.requests == 2 and t >= clock.now()


def test_a_stale_next_slot_far_ahead_starts_over(db):
    policy = budget.RatePolicy(10.0, 1.0, 30.0)
    now = 1_750_000_000.0
    budget.reserve(db, "k", policy, now=now + 10_000, count=1)     # a clock that ran ahead
    grant = budget.reserve(db, "k", policy, now=now, count=3)
    assert grant.first == now and grant.slots() == pytest.approx([now, now + 0.1, now + 0.2])


def test_account_key_hides_the_token_and_separates_accounts():
    key = budget.account_key("https://api.coze.cn", "pat_secret_token")
    assert "pat_secret_token" not in key and len(key) == 24
    assert key == budget.account_key("https://api.coze.cn/", "pat_secret_token")
    assert key != budget.account_key("https://api.coze.cn", "pat_other")


def test_coze_limiter_shares_only_through_a_file(db_path):
    assert isinstance(coze_limiter(5), RateLimiter)
    assert isinstance(coze_limiter(5, store=":memory:"), RateLimiter)
    shared = coze_limiter(5, store=db_path, base_url="u", token="t")
    try:
        assert isinstance(shared, SharedRateLimiter)
    finally:
        shared.close()


def test_the_store_locked_means_waiting_not_overspending(db_path):
    """While another process holds the write lock, no slot is handed out."""
    open_db(db_path).conn.close()
    clock = FakeClock()
    (lim,) = limiters(db_path, clock, n=1, rate=10.0, busy_timeout=0.05, retry_wait=0.5)
    lock = held_write_lock(db_path)

    async def main():
        lock.acquire()                               # another process holds the write lock
        task = asyncio.ensure_future(lim.acquire())
        for _ in range(40):
            await asyncio.sleep(0.01)
        assert not task.done() and lim.requests == 0
        lock.release()
        await task

    try:
        asyncio.run(main())
    finally:
        lock.close()
        lim.close()
    assert lim.requests == 1


# --- who claims whose tasks ---------------------------------------------------------------------

def test_a_batch_held_by_its_runner_is_left_to_it(db):
    now = 1_750_000_000.0
    cli = queue.create_batch(db, [{"task_key": "c1"}], now=now, source="cli", runner="cli-proc",
                             runner_until=now + 60)
    chat = queue.create_batch(db, [{"task_key": "s1"}], now=now, source="chat")
    got = queue.claim_tasks(db, owner="service", now=now, lease=60, limit=10)
    assert [t["batch_id"] for t in got] == [chat]
    got = queue.claim_tasks(db, owner="cli-proc", now=now, lease=60, limit=10,
                            batch_ids=[cli])
    assert [t["batch_id"] for t in got] == [cli]


def test_a_batch_whose_runner_is_gone_is_taken_over(db):
    now = 1_750_000_000.0
    cli = queue.create_batch(db, [{"task_key": "c1"}, {"task_key": "c2"}], now=now,
                             source="cli", runner="cli-proc", runner_until=now + 60)
    assert queue.claim_tasks(db, owner="service", now=now + 59, lease=60, limit=10) == []
    assert [t["task_key"] for t in queue.claim_tasks(
        db, owner="service", now=now + 61, lease=60, limit=1)] == ["c1"]   # hold ran out
    assert not queue.hold_batch(db, cli, owner="someone-else", until=None)
    assert queue.hold_batch(db, cli, owner="cli-proc", until=None)         # a clean exit
    assert [t["task_key"] for t in queue.claim_tasks(
        db, owner="service", now=now + 62, lease=60, limit=10)] == ["c2"]


def test_slots_that_went_stale_while_the_store_was_busy_are_not_used(db_path):
    """The reservation waits on another process's write lock while time goes by: the slots it
    then gets are already in the past, and a new reservation is made instead of using them."""
    db = open_db(db_path)
    clock = FakeClock()
    (lim,) = limiters(db_path, clock, n=1, rate=10.0, busy_timeout=5.0)
    lock = held_write_lock(db_path)

    async def main():
        lock.acquire()                               # another process holds the write lock
        task = asyncio.ensure_future(lim.acquire())
        await asyncio.sleep(0.2)                     # the store thread is waiting on it...
        clock.advance(3.0)                           # ...while three seconds pass
        lock.release()
        await task
        return clock.now()

    try:
        granted = asyncio.run(main())
    finally:
        lock.close()
        lim.close()
    next_slot = db.execute("SELECT next_slot FROM budgets").fetchone()[0]
    used_slot = next_slot - lim._spacing
    assert lim.reservations == 2
    assert used_slot <= granted <= used_slot + 0.03

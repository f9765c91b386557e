"""The shared token bucket on a fake clock: rate, burst, global pause after a 429, AIMD recovery."""
from __future__ import annotations

import asyncio

import pytest

from pipeline.clock import FakeClock
from pipeline.coze import CozeClient
from pipeline.ratelimit import RateLimiter
from pipeline.standins.simulator import CozeSimulator, Script


def stamps(limiter, clock, n):
    async def main():
        out = []
        for _ in range(n):
            await limiter.acquire()
            out.append(clock.monotonic() - start)
        return out

    start = clock.monotonic()
    return asyncio.run(main())


def test_acquires_respect_the_rate():
    clock = FakeClock()
    limiter = RateLimiter(5, clock)
    times = stamps(limiter, clock, 11)
    assert times[0] == 0.0
    assert times[-1] == pytest.approx(2.0)
    assert all(b - a == pytest.approx(0.2) for a, b in zip(times, times[1:]))
    assert limiter.requests == 11


def test_burst_then_steady_rate():
    clock = FakeClock()
    times = stamps(RateLimiter(2, clock, burst=4), clock, 6)
    assert times[:4] == [0.0] * 4
    assert times[4:] == pytest.approx([0.5, 1.0])


def test_concurrent_callers_share_one_budget():
    clock = FakeClock()
    limiter = RateLimiter(10, clock)
    granted = []

    async def worker():
        for _ in range(5):
            await limiter.acquire()
            granted.append(clock.monotonic())

    async def main():
        await asyncio.gather(*(worker() for _ in range(4)))

    start = clock.monotonic()
    asyncio.run(main())
    assert len(granted) == 20 and limiter.requests == 20
    assert granted[-1] - start == pytest.approx(1.9)
    for i in range(len(granted) - 10):          # never 11 grants inside one second
        assert granted[i + 10] - granted[i] >= 1.0 - 1e-9


def test_slow_down_pauses_everyone_and_halves_the_rate_then_recovers():
    clock = FakeClock()
    limiter = RateLimiter(8, clock, recovery=10.0)
    stamps(limiter, clock, 1)
    limiter.slow_down(3.0)
    assert limiter.current_rate == pytest.approx(4.0)
    t0 = clock.monotonic()

    async def waiter():
        await limiter.acquire()
        return clock.monotonic() - t0

    async def main():
        return await asyncio.gather(waiter(), waiter())

    first, second = asyncio.run(main())
    assert first == pytest.approx(3.0)             # nobody goes before the Retry-After
    assert second == pytest.approx(3.25)           # then at the halved rate
    clock.advance(5.0)                             # halfway through recovery
    assert 4.0 < limiter.current_rate < 8.0
    clock.advance(10.0)
    assert limiter.current_rate == 8.0


def test_repeated_slowdowns_do_not_go_below_the_floor():
    clock = FakeClock()
    limiter = RateLimiter(16, clock, min_rate_fraction=1 / 16)
    for _ in range(10):
        limiter.slow_down(0)
    assert limiter.current_rate == pytest.approx(1.0)
    limiter.pause_until(clock.monotonic() + 5)
    limiter.pause_until(clock.monotonic() + 1)     # a shorter pause never shortens the first
    assert limiter.paused_until == clock.monotonic() + 5


def test_bad_arguments():
    with pytest.raises(ValueError):
        RateLimiter(0)
    with pytest.raises(ValueError):
        RateLimiter(1, burst=0)


def test_client_with_limiter_keeps_the_simulator_under_the_rate_and_backs_off_a_429():
    clock = FakeClock()
    sim = CozeSimulator(clock=clock, default_duration=0)

    async def main():
        base = await sim.start()
        limiter = RateLimiter(5, clock)
        sim.script("t0", Script(http_429_first_n=1, retry_after=2))
        try:
            async with CozeClient(base, "sim-token", limiter=limiter) as coze:
                for i in range(20):
                    try:
                        await coze.submit("wf", {"task_id": f"t{i}"})
                    except Exception:
                        pass
        finally:
            await sim.stop()
        return limiter

    start = clock.monotonic()
    limiter = asyncio.run(main())
    assert sim.total_requests == 20 == limiter.requests
    assert sim.max_rps(1.0) <= 5
    assert limiter.slowdowns == 1
    # 2 s pause after the 429, then at most 5/s: 19 more requests cannot fit in under ~4.8 s
    assert clock.monotonic() - start >= 2 + 18 / 5

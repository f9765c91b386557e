"""A shared request budget: one token bucket for every Coze call (submit and poll alike).

Coze counts ``run``, ``stream_run`` and ``run_histories`` against one QPS budget, so one
:class:`RateLimiter` is shared by all callers. Time comes from the injected clock
(``clock.monotonic()`` / ``clock.sleep()``), so a :class:`~pipeline.clock.FakeClock` makes it
instant in tests.

After a 429 (:meth:`RateLimiter.slow_down`) every caller pauses until the Retry-After has passed
(the pause is global, not per caller), the effective rate is halved (multiplicative decrease) and
then grows back linearly to the configured rate over ``recovery`` seconds (additive increase).
"""
from __future__ import annotations

import asyncio

from .clock import Clock

__all__ = ["RateLimiter"]

_EPSILON = 1e-6  # seconds; waits shorter than this are granted at once


class RateLimiter:
    """Token bucket: ``rate`` requests per second on average, bursts of up to ``burst``."""

    def __init__(self, rate: float, clock: Clock | None = None, burst: int = 1, *,
                 min_rate_fraction: float = 1 / 16, recovery: float = 30.0) -> None:
        if rate <= 0:
            raise ValueError("rate must be > 0 requests per second")
        if burst < 1:
            raise ValueError("burst must be >= 1")
        self.rate = float(rate)
        self.clock = clock or Clock()
        self.burst = burst
        self.requests = 0            # tokens handed out
        self.slowdowns = 0           # times slow_down() was called
        self._min_rate = self.rate * min_rate_fraction
        self._recovery = recovery    # seconds to climb from a reduced rate back to ``rate``
        self._tokens = float(burst)
        self._stamp = self.clock.monotonic()
        self._paused_until = 0.0
        self._after_pause = False
        self._reduced = self.rate    # rate right after the last decrease
        self._reduced_at = self._stamp
        self._lock: asyncio.Lock | None = None

    @property
    def current_rate(self) -> float:
        """The effective rate now, in requests per second (below ``rate`` after a 429)."""
        if self._reduced >= self.rate:
            return self.rate
        since = max(0.0, self.clock.monotonic() - self._reduced_at)
        climbed = (self.rate - self._min_rate) * since
        return min(self.rate, self._reduced + climbed / self._recovery)

    @property
    def paused_until(self) -> float:
        return self._paused_until

    async def acquire(self) -> None:
        """Wait until a request may be sent. Callers are served first come, first served."""
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:   # one waiter at a time keeps FIFO order and FakeClock time exact
            while True:
                wait = self._wait_needed()
                if wait <= 0:
                    self._tokens -= 1.0
                    self.requests += 1
                    return
                await self.clock.sleep(wait)

    def _wait_needed(self) -> float:
        """Seconds until a token is free (0 = free now); refills the bucket as a side effect."""
        now = self.clock.monotonic()
        if now < self._paused_until:
            return self._paused_until - now
        rate = self.current_rate
        elapsed = max(0.0, now - self._stamp)
        self._tokens = min(float(self.burst), self._tokens + elapsed * rate)
        self._stamp = max(self._stamp, now)
        if self._after_pause:
            self._tokens = min(self._tokens, 1.0)
            self._after_pause = False
        wait = (1.0 - self._tokens) / rate
        # Clock values near 1.7e9 have ~2e-7 s resolution: a shorter wait may never elapse.
        return 0.0 if wait < _EPSILON else wait

    def pause_until(self, t: float) -> None:
        """Hold every caller until ``clock.monotonic()`` reaches ``t`` (never shortens a pause)."""
        if t > self._paused_until:
            self._paused_until = t
            self._after_pause = True   # one request at the pause's end, then the rate: no burst

    def slow_down(self, seconds: float = 0.0) -> None:
        """Answer to a 429: pause everyone ``seconds`` and halve the effective rate."""
        now = self.clock.monotonic()
        self.slowdowns += 1
        self._reduced = max(self._min_rate, self.current_rate / 2)
        self._reduced_at = now + max(0.0, seconds)   # recovery starts once the pause is over
        self.pause_until(now + max(0.0, seconds))


def coze_limiter(qps: float, clock: Clock | None = None) -> RateLimiter:
    """The limiter for one Coze account: ``qps`` requests in any one second, never more.

    A bucket of one token: a bigger burst would let a full bucket plus a second of refill
    through in one second, and Coze counts its QPS per second.
    """
    return RateLimiter(qps, clock, burst=1)

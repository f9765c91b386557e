"""A shared request budget: one token bucket for every Coze call (submit and poll alike).

Coze counts ``run``, ``stream_run`` and ``run_histories`` against one QPS budget, so one
:class:`RateLimiter` is shared by all callers. Time comes from the injected clock
(``clock.monotonic()`` / ``clock.sleep()``), so a :class:`~pipeline.clock.FakeClock` makes it
instant in tests.

After a 429 (:meth:`RateLimiter.slow_down`) every caller pauses until the Retry-After has passed
(the pause is global, not per caller), the effective rate is halved (multiplicative decrease) and
then grows back linearly to the configured rate over ``recovery`` seconds (additive increase).

A Coze account's budget is shared by every process that uses it (the service worker and an
``opsbot run`` on the same store): :class:`SharedRateLimiter` keeps it in the store
(:mod:`storage.budget`) and offers the same ``acquire`` / ``slow_down`` interface.
:func:`coze_limiter` picks the shared one whenever it is given a store.
"""
from __future__ import annotations

import asyncio
import collections
import logging
import sqlite3
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from storage import budget

from .clock import Clock

__all__ = ["RateLimiter", "SharedRateLimiter", "coze_limiter"]

log = logging.getLogger("opsbot.ratelimit")

_EPSILON = 1e-6  # seconds; waits shorter than this are granted at once
#: Seconds after its time that a reserved slot may still be used (see SharedRateLimiter).
LATE = 0.03


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

    def close(self) -> None:
        """Nothing to release (the shared limiter's counterpart stops its store thread)."""


class SharedRateLimiter:
    """The budget of one Coze account, held in the store and shared by every process using it.

    Callers in this process queue first come, first served. The first in line reserves send
    slots in the store (:func:`storage.budget.reserve`): one per waiting caller, or what this
    process used in the last ``horizon`` seconds if that is more, and never more than
    ``horizon`` seconds' worth of the rate. A busy process thus writes about ``1 / horizon``
    times a second, and a quiet one once per request. Each caller then sleeps until its slot and
    may use it up to :data:`LATE` seconds after it (an event loop is never exactly on time);
    a slot missed by more is dropped. Slots are spaced ``(1 + LATE) / rate`` apart, so however
    late each one is used within that tolerance, no second of time holds more than ``rate``
    requests from all processes together (the price: a 3 % lower average rate). Reserved
    slots that nobody here needs lapse unused: they cost budget, never exceed it.

    The store is written from one background thread with its own connection and a short busy
    timeout, never from the event loop. While the store cannot be written (another process
    holds the lock), no slot is handed out: requests wait rather than overspend.

    :meth:`slow_down` (a 429) drops this process's reserved slots, pauses it at once, and
    records the pause and the halved rate in the store for every other process; slots that
    another process reserved before the 429 (at most ``horizon`` seconds' worth) are still
    used by it.
    """

    def __init__(self, db_path: str | Path, key: str, rate: float, clock: Clock | None = None,
                 *, horizon: float = 0.25, min_rate_fraction: float = 1 / 16,
                 recovery: float = 30.0, busy_timeout: float = 2.0,
                 retry_wait: float = 0.1) -> None:
        if rate <= 0:
            raise ValueError("rate must be > 0 requests per second")
        self.rate = float(rate)
        self.clock = clock or Clock()
        self.key = key
        slot_rate = self.rate / (1 + LATE)
        self.policy = budget.RatePolicy(slot_rate, slot_rate * min_rate_fraction, recovery)
        self.max_slots = max(1, int(self.rate * horizon))
        self.horizon = horizon
        self.requests = 0            # slots used
        self.slowdowns = 0           # times slow_down() was called
        self.reservations = 0        # store writes that reserved slots
        self._db_path = str(db_path)
        self._busy_timeout = busy_timeout
        self._retry_wait = retry_wait
        self._slots: collections.deque[float] = collections.deque()
        self._spacing = 1.0 / slot_rate
        self._paused_until = 0.0
        self._waiting = 0
        self._used: collections.deque[float] = collections.deque()   # recent grant times
        self._lock: asyncio.Lock | None = None
        self._db: Any = None         # opened in the store thread
        self._store_down_since: float | None = None
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="coze-budget")

    @property
    def current_rate(self) -> float:
        """The slot rate of the last reservation (``rate / (1 + LATE)``; less after a 429)."""
        return 1.0 / self._spacing

    @property
    def paused_until(self) -> float:
        return self._paused_until

    async def acquire(self) -> None:
        """Wait until a request may be sent. Callers are served first come, first served."""
        if self._lock is None:
            self._lock = asyncio.Lock()
        self._waiting += 1
        try:
            async with self._lock:
                while True:
                    wait = await self._next_wait()
                    if wait <= 0:
                        self._slots.popleft()
                        self.requests += 1
                        self._used.append(self.clock.now())
                        return
                    await self.clock.sleep(wait)
        finally:
            self._waiting -= 1

    async def _next_wait(self) -> float:
        """Seconds until the first reserved slot (reserving when none is left); 0: send now."""
        while True:
            now = self.clock.now()
            if now < self._paused_until:
                return self._paused_until - now
            while self._slots and self._slots[0] < now - LATE:
                self._slots.popleft()    # missed: using it now could crowd a later second
            if self._slots:
                wait = self._slots[0] - now
                return 0.0 if wait < _EPSILON else wait
            while self._used and self._used[0] < now - self.horizon:
                self._used.popleft()
            count = min(self.max_slots, max(1, self._waiting, len(self._used)))
            try:
                grant = await asyncio.get_running_loop().run_in_executor(
                    self._pool, self._reserve, count)
            except sqlite3.Error as exc:
                if self._store_down_since is None:   # one line per outage, not per retry
                    self._store_down_since = now
                    log.warning("Coze budget: store unavailable, Coze calls wait (%s)", exc)
                return self._retry_wait
            if self._store_down_since is not None:
                log.warning("Coze budget: store available again after %.1fs",
                            now - self._store_down_since)
                self._store_down_since = None
            self.reservations += 1
            self._spacing = grant.spacing
            self._slots.extend(grant.slots())
            # and look again: slots that went stale while the store was busy are dropped

    def slow_down(self, seconds: float = 0.0) -> None:
        """Answer to a 429: pause this process now, and every process through the store."""
        now = self.clock.now()
        self.slowdowns += 1
        self._slots.clear()
        self._paused_until = max(self._paused_until, now + max(0.0, seconds))
        try:
            future = self._pool.submit(self._slow_down, now, seconds)
        except RuntimeError:   # closed: nobody here sends any more
            return
        future.add_done_callback(_log_failure)

    def close(self) -> None:
        """Stop the store thread and close its connection (pending writes finish first)."""
        self._pool.submit(self._close_db)
        self._pool.shutdown(wait=True)

    # -- in the store thread ----------------------------------------------------------------

    def _store(self):
        if self._db is None:
            from storage.db import open_db, set_lock_wait

            self._db = open_db(self._db_path)
            set_lock_wait(self._db, self._busy_timeout)
        return self._db

    def _reserve(self, count: int) -> budget.Grant:
        return budget.reserve(self._store(), self.key, self.policy, now=self.clock.now(),
                              count=count)

    def _slow_down(self, now: float, seconds: float) -> None:
        budget.slow_down(self._store(), self.key, self.policy, now=now, seconds=seconds)

    def _close_db(self) -> None:
        if self._db is not None:
            self._db.conn.close()
            self._db = None


def _log_failure(future) -> None:
    exc = future.exception()
    if exc is not None:
        log.warning("Coze budget: could not record a slow-down in the store (%s)", exc)


def coze_limiter(qps: float, clock: Clock | None = None, *, store: str | Path | None = None,
                 base_url: str = "", token: str = "") -> "RateLimiter | SharedRateLimiter":
    """The limiter for one Coze account: ``qps`` requests in any one second, never more.

    With ``store`` (the SQLite path), the budget is shared with every other process that uses
    the same account (``base_url`` + ``token``) on that store: :class:`SharedRateLimiter`.
    Without it (or for an in-memory store, which no other process can see), a local bucket of
    one token: a bigger burst would let a full bucket plus a second of refill through in one
    second, and Coze counts its QPS per second.
    """
    if store is not None and str(store) != ":memory:":
        return SharedRateLimiter(store, budget.account_key(base_url, token), qps, clock)
    return RateLimiter(qps, clock, burst=1)

"""Time, injected: the real clock in production, a fake one in tests so nothing sleeps.

``now()`` is wall time (Unix seconds, stored in the database); ``monotonic()`` measures intervals;
``sleep()`` waits. A :class:`FakeClock` advances only when told or when something sleeps on it.
"""
from __future__ import annotations

import asyncio
import time


class Clock:
    def now(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(0.0, seconds))


class FakeClock(Clock):
    """A clock that jumps: ``sleep`` advances time at once (after yielding to the loop)."""

    def __init__(self, start: float = 1_750_000_000.0) -> None:
        self._t = start
        self.slept: list[float] = []

    def now(self) -> float:
        return self._t

    def monotonic(self) -> float:
        return self._t

    def advance(self, seconds: float) -> None:
        self._t += seconds

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self._t += max(0.0, seconds)
        await asyncio.sleep(0)

"""The Coze QPS budget of one account, shared by every process that opens this store.

One row per account (``budgets``, keyed by :func:`account_key`, a hash: the token is never
stored). The row holds send *slots*, not tokens: ``next_slot`` is the Unix time of the next free
slot. :func:`reserve` hands out ``n`` consecutive slots ``1 / rate`` seconds apart, starting at
``max(next_slot, now, paused_until)``, and moves ``next_slot`` past them, all in one
transaction that runs alone among this account's budget writes (SQLite: ``BEGIN IMMEDIATE``;
PostgreSQL: the per-key lock ``budget:<account>``, since the row may not exist yet). No two
processes ever get the same slot, and the slots of all processes together are at least
``1 / rate`` apart: the virtual-scheduling form of a token bucket one token deep (GCRA). A
process reserves a few slots per transaction when it has several callers waiting, so the write
rate stays far below the request rate when the budget binds.

After a 429 (:func:`slow_down`) the row records a pause and a halved rate that climbs back to
the configured rate over ``recovery`` seconds, so every process slows down, not only the one
that was refused. All times are Unix seconds from the caller's clock.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import sqlite_utils

from .db import transaction

#: A ``next_slot`` further ahead than this (a wall clock set back, a crashed process with a
#: long reservation) is stale and starts over at ``now``; real reservations reach a few seconds.
MAX_AHEAD = 60.0


def account_key(base_url: str, token: str) -> str:
    """The budget row of one Coze account: a hash of the base URL and the token."""
    return hashlib.sha256(f"{base_url.rstrip('/')}\n{token}".encode()).hexdigest()[:24]


@dataclass(frozen=True)
class Grant:
    """Slots reserved by one :func:`reserve`: ``count`` slots from ``first``, ``spacing`` apart."""

    first: float
    spacing: float
    count: int

    def slots(self) -> list[float]:
        return [self.first + i * self.spacing for i in range(self.count)]


@dataclass(frozen=True)
class RatePolicy:
    """The configured rate (requests per second), its floor after 429s, and the recovery time."""

    rate: float
    min_rate: float
    recovery: float

    def current(self, reduced: float | None, reduced_at: float | None, now: float) -> float:
        """The rate in force at ``now``: reduced after a 429, climbing back linearly."""
        if reduced is None or reduced_at is None or reduced >= self.rate:
            return self.rate
        since = max(0.0, now - reduced_at)
        climbed = (self.rate - self.min_rate) * since / max(self.recovery, 1e-9)
        return max(self.min_rate, min(self.rate, reduced + climbed))


def reserve(db: sqlite_utils.Database, key: str, policy: RatePolicy, *, now: float,
            count: int) -> Grant:
    """Reserve ``count`` (>= 1) consecutive send slots of the account ``key``."""
    count = max(1, int(count))
    with transaction(db, concurrent=True, key=f"budget:{key}") as conn:
        row = conn.execute("SELECT next_slot, paused_until, reduced_rate, reduced_at FROM budgets"
                           " WHERE key = ?", [key]).fetchone()
        next_slot, paused_until, reduced, reduced_at = row or (0.0, 0.0, None, None)
        if next_slot > now + MAX_AHEAD and next_slot > paused_until:
            next_slot = now   # stale (see MAX_AHEAD)
        first = max(next_slot, now, paused_until)
        spacing = 1.0 / policy.current(reduced, reduced_at, first)
        conn.execute(
            "INSERT INTO budgets (key, next_slot, paused_until, updated_at) VALUES (?, ?, ?, ?)"
            " ON CONFLICT(key) DO UPDATE SET next_slot = excluded.next_slot,"
            " updated_at = excluded.updated_at",
            [key, first + count * spacing, paused_until, now])
    return Grant(first, spacing, count)


def slow_down(db: sqlite_utils.Database, key: str, policy: RatePolicy, *, now: float,
              seconds: float) -> None:
    """A 429: nobody sends before ``now + seconds``; the rate halves (never below the floor)."""
    until = now + max(0.0, seconds)
    with transaction(db, concurrent=True, key=f"budget:{key}") as conn:
        row = conn.execute("SELECT paused_until, reduced_rate, reduced_at FROM budgets"
                           " WHERE key = ?", [key]).fetchone()
        paused_until, reduced, reduced_at = row or (0.0, None, None)
        halved = max(policy.min_rate, policy.current(reduced, reduced_at, now) / 2)
        conn.execute(
            "INSERT INTO budgets (key, next_slot, paused_until, reduced_rate, reduced_at,"
            " updated_at) VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT(key) DO UPDATE SET"
            " paused_until = MAX(budgets.paused_until, excluded.paused_until),"
            " next_slot = MAX(budgets.next_slot, excluded.next_slot),"
            " reduced_rate = excluded.reduced_rate, reduced_at = excluded.reduced_at,"
            " updated_at = excluded.updated_at",
            [key, until, max(paused_until, until), halved, until, now])

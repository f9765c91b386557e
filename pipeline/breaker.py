"""A circuit breaker per service, with its state in the store.

closed -> open after ``failure_threshold`` consecutive failures -> half_open once ``open_seconds``
have passed -> closed after ``success_threshold`` successes (a failure in half_open opens it again).

Submits and polls are counted apart (``kind``): a success of one never clears the failures of
the other, so a fault that hits only submits (the run endpoint down while ``run_histories``
answers) opens the breaker although polls keep succeeding. A breaker opened by submits closes
only on submit successes. Calls without a kind count as polls.
A breaker tripped by a fatal error (bad token, no balance) stays open until a human resets it
(``resume`` in chat or the Resume button): waiting cannot fix those.

The state lives in the ``breakers`` table so the chat's ``status`` shows it and ``resume`` (in the
web process) resets it; every process reads the row, so a reset is seen at once. Every change
reads the row and writes it in one ``BEGIN IMMEDIATE`` transaction, so a process deciding on a
state it read earlier never undoes another's change (a stale success closing a manual trip).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import sqlite_utils

from storage import breakers
from storage.db import transaction

from .config import BreakerPolicy

MANUAL = "manual"  # opened_by value that disables the automatic half-open


@dataclass(frozen=True)
class BreakerState:
    service: str
    state: str
    failures: int
    successes: int
    opened_at: float | None
    reason: str | None
    submit_failures: int = 0    # consecutive failed submits (``failures``: other calls)

    def opened_by_submits(self, threshold: int) -> bool:
        return self.submit_failures >= threshold


class Breaker:
    def __init__(self, db: sqlite_utils.Database, service: str, policy: BreakerPolicy,
                 now: Callable[[], float],
                 on_change: Callable[[BreakerState, BreakerState], None] | None = None) -> None:
        self.db = db
        self.service = service
        self.policy = policy
        self.now = now
        self.on_change = on_change

    def state(self) -> BreakerState:
        row = breakers.get(self.db, self.service)
        if row is None:
            return BreakerState(self.service, "closed", 0, 0, None, None)
        return BreakerState(*row)

    def allow(self) -> bool:
        """May a call go out now? Moves open -> half_open when the open time has passed."""
        st = self.state()
        if st.state == "closed" or st.state == "half_open":
            return True
        if (st.reason or "").startswith(MANUAL):
            return False

        def change(st: BreakerState) -> dict | None:
            if st.state == "open" and not (st.reason or "").startswith(MANUAL) \
                    and st.opened_at is not None \
                    and self.now() - st.opened_at >= self.policy.open_seconds:
                return dict(state="half_open", successes=0)
            return None

        return self._update(change).state != "open"

    def retry_at(self) -> float | None:
        """When an open breaker will let a probe through (None: closed, or manual)."""
        st = self.state()
        if st.state != "open" or (st.reason or "").startswith(MANUAL) or st.opened_at is None:
            return None
        return st.opened_at + self.policy.open_seconds

    def record_success(self, kind: str = "poll") -> None:
        """A call of ``kind`` (``submit`` or ``poll``) succeeded."""
        field = "submit_failures" if kind == "submit" else "failures"

        def change(st: BreakerState) -> dict | None:
            if st.state == "closed":
                return {field: 0} if getattr(st, field) else None
            if st.state == "half_open":
                if kind != "submit" and st.opened_by_submits(self.policy.failure_threshold):
                    return None  # a poll answering says nothing about the submits that opened it
                successes = st.successes + 1
                if successes >= self.policy.success_threshold:
                    return dict(state="closed", failures=0, submit_failures=0, successes=0,
                                opened_at=None, reason=None)
                return dict(successes=successes)
            return None   # open (a call that went out before it opened, or a manual trip)

        self._update(change)

    def record_failure(self, reason: str, kind: str = "poll") -> None:
        """A call of ``kind`` failed in a way that says the service is unwell."""
        field = "submit_failures" if kind == "submit" else "failures"

        def change(st: BreakerState) -> dict | None:
            if st.state == "open":
                return None
            count = getattr(st, field) + 1
            if st.state == "half_open" or count >= self.policy.failure_threshold:
                return dict(state="open", successes=0, opened_at=self.now(),
                            reason=reason[:300], **{field: count})
            return {field: count}

        self._update(change)

    def trip(self, reason: str) -> None:
        """Open until a human resets it (fatal errors)."""
        self._update(lambda st: dict(state="open", successes=0, opened_at=self.now(),
                                     reason=f"{MANUAL}: {reason}"[:300]))

    def reset(self) -> None:
        self._update(lambda st: dict(state="closed", failures=0, submit_failures=0, successes=0,
                                     opened_at=None, reason=None))

    def _update(self, change: Callable[[BreakerState], dict | None]) -> BreakerState:
        """Read the state and write ``change(state)`` in one transaction that runs alone among
        this service's breaker writes (SQLite: ``BEGIN IMMEDIATE``; PostgreSQL: the per-key
        lock ``breaker:<service>``), so a write never rests on a state another process changed
        meanwhile (a stale success closing a manual trip). Returns the state after; ``on_change``
        is told after commit."""
        with transaction(self.db, concurrent=True, key=f"breaker:{self.service}") as conn:
            before = self.state()
            changes = change(before)
            if not changes:
                return before
            after = BreakerState(**{**before.__dict__, **changes})
            breakers.put_in(conn, service=after.service, state=after.state,
                            failures=after.failures, successes=after.successes,
                            opened_at=after.opened_at, reason=after.reason,
                            submit_failures=after.submit_failures, now=self.now())
        if self.on_change and after.state != before.state:
            self.on_change(before, after)
        return after


def reset_all(db: sqlite_utils.Database, now: float,
              services: tuple[str, ...] | None = None) -> int:
    """Close every breaker (of ``services``, if given; the chat's ``resume``); returns how many
    were not closed."""
    return breakers.close_all(db, now, services)


def all_states(db: sqlite_utils.Database) -> list[BreakerState]:
    return [BreakerState(*r) for r in breakers.all_rows(db)]

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
web process) resets it; every process reads the row, so a reset is seen at once.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import sqlite_utils

from storage import breakers

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
        if st.opened_at is not None and self.now() - st.opened_at >= self.policy.open_seconds:
            self._write(st, state="half_open", successes=0)
            return True
        return False

    def retry_at(self) -> float | None:
        """When an open breaker will let a probe through (None: closed, or manual)."""
        st = self.state()
        if st.state != "open" or (st.reason or "").startswith(MANUAL) or st.opened_at is None:
            return None
        return st.opened_at + self.policy.open_seconds

    def record_success(self, kind: str = "poll") -> None:
        """A call of ``kind`` (``submit`` or ``poll``) succeeded."""
        st = self.state()
        field = "submit_failures" if kind == "submit" else "failures"
        if st.state == "closed":
            if getattr(st, field):
                self._write(st, **{field: 0})
            return
        if st.state == "half_open":
            if kind != "submit" and st.opened_by_submits(self.policy.failure_threshold):
                return   # a poll answering says nothing about the submits that opened it
            successes = st.successes + 1
            if successes >= self.policy.success_threshold:
                self._write(st, state="closed", failures=0, submit_failures=0, successes=0,
                            opened_at=None, reason=None)
            else:
                self._write(st, successes=successes)

    def record_failure(self, reason: str, kind: str = "poll") -> None:
        """A call of ``kind`` failed in a way that says the service is unwell."""
        st = self.state()
        if st.state == "open":
            return
        field = "submit_failures" if kind == "submit" else "failures"
        count = getattr(st, field) + 1
        if st.state == "half_open" or count >= self.policy.failure_threshold:
            self._write(st, state="open", successes=0, opened_at=self.now(),
                        reason=reason[:300], **{field: count})
        else:
            self._write(st, **{field: count})

    def trip(self, reason: str) -> None:
        """Open until a human resets it (fatal errors)."""
        st = self.state()
        self._write(st, state="open", successes=0, opened_at=self.now(),
                    reason=f"{MANUAL}: {reason}"[:300])

    def reset(self) -> None:
        st = self.state()
        self._write(st, state="closed", failures=0, submit_failures=0, successes=0,
                    opened_at=None, reason=None)

    def _write(self, before: BreakerState, **changes: Any) -> None:
        after = BreakerState(**{**before.__dict__, **changes})
        breakers.put(self.db, service=after.service, state=after.state, failures=after.failures,
                     successes=after.successes, opened_at=after.opened_at, reason=after.reason,
                     submit_failures=after.submit_failures, now=self.now())
        if self.on_change and after.state != before.state:
            self.on_change(before, after)


def reset_all(db: sqlite_utils.Database, now: float) -> int:
    """Close every breaker (the chat's ``resume``); returns how many were not closed."""
    return breakers.close_all(db, now)


def all_states(db: sqlite_utils.Database) -> list[BreakerState]:
    return [BreakerState(*r) for r in breakers.all_rows(db)]

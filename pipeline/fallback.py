"""Choosing the workflow to submit to: the primary, or a fallback while the primary is failing.

When the primary's runs fail at ``fallback_failure_rate`` or more within ``fallback_window``
seconds (counting at least ``fallback_min_runs`` finished runs), new submits go to the fallback
workflow. After ``fallback_cooldown`` seconds the primary gets the traffic back with a clean slate;
if it is still broken, the same rule switches again. Only runs that ended (Success or Fail) count:
an API error (bad token, rate limit) says nothing about the workflow itself.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass


@dataclass(frozen=True)
class Switch:
    """A change of the active workflow, for alerts: ``to_fallback`` False means back to primary."""

    to_fallback: bool
    primary: str
    fallback: str
    reason: str
    pipeline: str = "default"   # whose workflows (set by the worker; see pipeline.routing)


class WorkflowSelector:
    def __init__(self, primary: str, fallback: str = "", *, failure_rate: float = 0.5,
                 window: float = 600.0, min_runs: int = 5, cooldown: float = 600.0) -> None:
        self.primary = primary
        self.fallback = fallback
        self.failure_rate = failure_rate
        self.window = window
        self.min_runs = min_runs
        self.cooldown = cooldown
        self._outcomes: deque[tuple[float, bool]] = deque()
        self._switched_at: float | None = None

    @property
    def on_fallback(self) -> bool:
        return self._switched_at is not None

    def current(self, now: float) -> tuple[str, Switch | None]:
        """The workflow to submit to now, and the switch back to primary if it happens now."""
        if self._switched_at is not None and now - self._switched_at >= self.cooldown:
            self._switched_at = None
            self._outcomes.clear()
            return self.primary, Switch(False, self.primary, self.fallback,
                                        f"cool-down of {self.cooldown:.0f}s over; trying the "
                                        f"primary again")
        return (self.fallback if self._switched_at is not None else self.primary), None

    def record(self, workflow_id: str, ok: bool, now: float) -> Switch | None:
        """Count a finished run; returns the switch to the fallback when the rule fires."""
        if not self.fallback or workflow_id != self.primary or self._switched_at is not None:
            return None
        self._outcomes.append((now, ok))
        while self._outcomes and now - self._outcomes[0][0] > self.window:
            self._outcomes.popleft()
        runs = len(self._outcomes)
        failed = sum(1 for _, good in self._outcomes if not good)
        if runs >= self.min_runs and failed / runs >= self.failure_rate:
            self._switched_at = now
            return Switch(True, self.primary, self.fallback,
                          f"{failed} of the last {runs} runs of the primary failed "
                          f"(threshold {self.failure_rate:.0%})")
        return None

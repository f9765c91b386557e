"""The worker's clock-driven duties: the 09:00 daily report, latency checks, held-back updates.

:meth:`Scheduler.tick` is called every few seconds by the worker. Decisions are pure functions of
the time so they are tested with a fake clock across time zones and midnight:

- :func:`due_report_date`: the report for day D is due from ``report_time`` on D + 1 (local
  time). A worker that was down at that moment sends the latest missed report when it comes back,
  once (only the latest: a week offline does not flood the chat with seven). A fresh store (no
  report sent yet) waits for the next ``report_time`` rather than sending an old day.
- The report for a day is enqueued with a uuid derived from the day, and ``report:last_sent``
  is written after, so a crash in between re-enqueues the same uuid: nothing is sent twice.
"""
from __future__ import annotations

import hashlib
import logging
from datetime import date, datetime, time, timedelta
from typing import Any

import sqlite_utils

from storage import kv, outbox

from bot.alerting.report import compute_report, mark_sent, report_card, report_groups

log = logging.getLogger("opsbot.scheduler")

LAST_SENT_KEY = "report:last_sent"


def parse_hhmm(text: str) -> time:
    hh, mm = text.split(":")
    return time(int(hh), int(mm))


def due_report_date(now: datetime, last_sent: date | None,
                    report_time: time = time(9, 0)) -> date | None:
    """The day whose report should go out now, or None.

    ``now`` is an aware datetime in the report's time zone; ``last_sent`` the day of the last
    report sent (None: never).
    """
    today = now.date()
    if now.time() >= report_time:
        target = today - timedelta(days=1)
    else:
        target = today - timedelta(days=2)
        if last_sent is None:
            return None
    if last_sent is not None and last_sent >= target:
        return None
    return target


class Scheduler:
    """Periodic duties of the worker. ``router`` (an :class:`bot.alerting.router.AlertRouter`) is
    optional: with it, ``tick`` also runs its latency check and flushes throttled updates."""

    def __init__(self, db: sqlite_utils.Database, settings, clock, *, router: Any = None,
                 latency_every: float = 30.0) -> None:
        self.db, self.settings, self.clock, self.router = db, settings, clock, router
        self.latency_every = latency_every
        self._latency_at = float("-inf")

    def tick(self) -> dict[str, Any]:
        """Do whatever is due now; returns what was done (for logs and tests)."""
        done: dict[str, Any] = {"report": self.send_due_report()}
        if self.router is not None:
            now = self.clock.now()
            self.router.flush()
            if now - self._latency_at >= self.latency_every:
                self._latency_at = now
                done["latency"] = self.router.check_latency(now)
        return done

    def last_sent(self) -> date | None:
        value = kv.get(self.db, LAST_SENT_KEY)
        try:
            return date.fromisoformat(value) if value is not None else None
        except ValueError:
            return None

    def send_due_report(self) -> str | None:
        """Enqueue the due daily report (if any) to the alert chat; return its day."""
        now = self.clock.now()
        local = datetime.fromtimestamp(now, self.settings.tz)
        day = due_report_date(local, self.last_sent(), parse_hhmm(self.settings.alerts.report_time))
        if day is None:
            return None
        groups = [(chat, names) for chat, names in report_groups(self.settings) if chat]
        for chat, names in groups:
            # one card per alert chat, of the pipelines reporting there (bot.alerting.report)
            card = report_card(compute_report(self.db, day, self.settings.tz, names),
                               self.settings.language)
            uuid = f"report-{day.isoformat()}" if names is None else \
                f"report-{day.isoformat()}-{hashlib.sha256(chat.encode()).hexdigest()[:16]}"
            outbox.enqueue(self.db, "send", chat, {"card": card}, now=now, uuid=uuid,
                           ref=f"report:{day.isoformat()}")
            log.info("daily report enqueued", extra={"day": day.isoformat(), "chat": chat})
        if not groups:
            log.warning("daily report not sent: FEISHU_ALERT_CHAT_ID is not set",
                        extra={"day": day.isoformat()})
        mark_sent(self.db, now=now, day=day)
        return day.isoformat()

"""``GET /metrics``: the store's state in Prometheus text format (version 0.0.4).

:func:`render_metrics` reads the store (one short query per family) and the in-process
:data:`WEBHOOK_LATENCY` histogram, which the web app feeds with ``WEBHOOK_LATENCY.observe(s)``
per webhook request. Families::

    opsbot_tasks{state}                       gauge, tasks by status (every status listed)
    opsbot_attempts_total{error_class}        counter, stage attempts (``none``: succeeded)
    opsbot_stage_seconds_bucket{stage,le}     histogram of successful attempts' durations
    opsbot_breaker_state{service}             gauge, 0 closed, 1 half_open, 2 open
    opsbot_alerts{tier,status}                gauge, alert rows
    opsbot_outbox_depth, opsbot_inbox_pending gauges
    opsbot_outbox_dead                        gauge, outgoing calls given up on (not replayed)
    opsbot_last_report_timestamp              gauge, Unix seconds (0: never)
    opsbot_webhook_seconds_bucket{le}         histogram, webhook handling time in this process
    <extra>                                   gauges passed in by the caller
"""
from __future__ import annotations

import math
import re
import threading
from typing import Any, Iterable

import sqlite_utils

from storage import alerts as store_alerts, breakers, inbox, kv, metrics as store_metrics, outbox
from storage.queue import ACTIVE, FINAL

STAGE_BUCKETS = (1, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
WEBHOOK_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)
BREAKER_VALUES = {"closed": 0, "half_open": 1, "open": 2}
_NAME = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")


class Histogram:
    """A thread-safe cumulative histogram (seconds)."""

    def __init__(self, buckets: Iterable[float]) -> None:
        self.buckets = tuple(sorted(buckets))
        self._counts = [0] * len(self.buckets)
        self._sum = 0.0
        self._count = 0
        self._lock = threading.Lock()

    def observe(self, seconds: float) -> None:
        with self._lock:
            self._sum += seconds
            self._count += 1
            for i, le in enumerate(self.buckets):
                if seconds <= le:
                    self._counts[i] += 1

    def snapshot(self) -> tuple[list[tuple[float, int]], float, int]:
        """``([(le, cumulative count)], sum, count)``."""
        with self._lock:
            return list(zip(self.buckets, self._counts)), self._sum, self._count


WEBHOOK_LATENCY = Histogram(WEBHOOK_BUCKETS)


def _escape(value: Any) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(labels: dict[str, Any]) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items()) + "}"


def _num(value: float) -> str:
    if isinstance(value, float) and math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return repr(value) if isinstance(value, float) else str(value)


class _Out:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def family(self, name: str, kind: str, help_: str) -> None:
        self.lines += [f"# HELP {name} {help_}", f"# TYPE {name} {kind}"]

    def sample(self, name: str, value: float, **labels: Any) -> None:
        self.lines.append(f"{name}{_labels(labels)} {_num(value)}")

    def histogram(self, name: str, buckets: list[tuple[float, int]], total: float, count: int,
                  **labels: Any) -> None:
        for le, n in buckets:
            self.sample(f"{name}_bucket", n, **labels, le=_num(float(le)))
        self.sample(f"{name}_bucket", count, **labels, le="+Inf")
        self.sample(f"{name}_sum", total, **labels)
        self.sample(f"{name}_count", count, **labels)


class AttemptTotals:
    """Running totals over the append-only ``attempts`` table, read incrementally.

    Each :meth:`update` reads only the rows added since the last one (a range of the integer
    primary key), so a scrape costs the same with a year of history as with a day; the first
    scrape of a process reads everything once. Keep one per process and database file. Not
    thread-safe: the caller serialises scrapes.
    """

    def __init__(self) -> None:
        self.last_id = 0
        self.by_class: dict[str, int] = {}
        self.stages: dict[str, list[float]] = {}   # stage -> bucket counts..., sum, count

    def update(self, db: sqlite_utils.Database) -> "AttemptTotals":
        top = store_metrics.last_attempt_id(db)
        if top < self.last_id:      # the table was emptied or replaced: start over
            self.__init__()
        if top == self.last_id:
            return self
        for ec, n in store_metrics.attempts_by_class(db, self.last_id, top):
            self.by_class[ec] = self.by_class.get(ec, 0) + n
        for row in store_metrics.stage_durations(db, self.last_id, top, STAGE_BUCKETS):
            acc = self.stages.setdefault(row[0], [0.0] * (len(STAGE_BUCKETS) + 2))
            for i, v in enumerate(row[1:]):
                acc[i] += v or 0
        self.last_id = top
        return self


def render_metrics(db: sqlite_utils.Database, *, extra: dict[str, float] | None = None,
                   totals: AttemptTotals | None = None) -> str:
    """Every family above as Prometheus text (ends with a newline).

    ``totals``: the process's :class:`AttemptTotals` (the web app keeps one, so a scrape only
    reads new attempts); without it the attempts are read in full.
    """
    out = _Out()
    out.family("opsbot_tasks", "gauge", "Tasks by status.")
    states = {s: 0 for s in ACTIVE + FINAL}
    states.update(store_metrics.task_counts(db))
    for state, n in sorted(states.items()):
        out.sample("opsbot_tasks", n, state=state)
    totals = (totals or AttemptTotals()).update(db)
    out.family("opsbot_attempts_total", "counter", "Stage attempts by error class.")
    for ec, n in sorted(totals.by_class.items()):
        out.sample("opsbot_attempts_total", n, error_class=ec)
    _stage_histograms(totals, out)
    out.family("opsbot_breaker_state", "gauge", "Circuit breaker: 0 closed, 1 half_open, 2 open.")
    for service, state in breakers.states(db):
        out.sample("opsbot_breaker_state", BREAKER_VALUES.get(state, 2), service=service)
    out.family("opsbot_alerts", "gauge", "Alert rows by tier and status.")
    for tier, status, n in store_alerts.counts(db):
        out.sample("opsbot_alerts", n, tier=tier, status=status)
    out.family("opsbot_outbox_depth", "gauge", "Outbox rows waiting to be sent.")
    out.sample("opsbot_outbox_depth", outbox.depth(db))
    out.family("opsbot_outbox_dead", "gauge",
               "Outbox rows given up on (permanent error, or Feishu's uuid window passed).")
    out.sample("opsbot_outbox_dead", outbox.dead_count(db))
    out.family("opsbot_inbox_pending", "gauge", "Inbox events not yet handled.")
    out.sample("opsbot_inbox_pending", inbox.pending(db))
    out.family("opsbot_last_report_timestamp", "gauge", "When a daily report was last sent.")
    value = kv.get(db, "report:last_sent_at")
    out.sample("opsbot_last_report_timestamp", float(value) if value is not None else 0)
    out.family("opsbot_webhook_seconds", "histogram", "Webhook handling time (this process).")
    out.histogram("opsbot_webhook_seconds", *WEBHOOK_LATENCY.snapshot())
    for name, value in sorted((extra or {}).items()):
        if not _NAME.match(name):
            raise ValueError(f"not a metric name: {name!r}")
        out.family(name, "gauge", "Extra value supplied by the caller.")
        out.sample(name, value)
    return "\n".join(out.lines) + "\n"


def _stage_histograms(totals: AttemptTotals, out: _Out) -> None:
    out.family("opsbot_stage_seconds", "histogram", "Successful stage attempt durations.")
    for stage, acc in sorted(totals.stages.items()):
        counts, total, count = acc[:-2], acc[-2], acc[-1]
        out.histogram("opsbot_stage_seconds", list(zip(STAGE_BUCKETS, map(int, counts))),
                      float(total), int(count), stage=stage)

"""``GET /metrics``: the store's state and the web processes' own measurements, in Prometheus
text format (version 0.0.4).

Two kinds of families, told apart by where their numbers live:

* store-derived (queue depth, tasks, attempts, breakers, alerts...): :func:`render_metrics` reads
  the store (one short query per family) at scrape time, so every web process gives the same
  answer;
* process-measured (webhook latency and requests): kept with ``prometheus_client``. Under
  gunicorn each web worker writes its samples to files in ``PROMETHEUS_MULTIPROC_DIR`` (set up by
  :mod:`bot.web.gunicorn_metrics`) and a scrape sums the files of every worker, living or dead, so
  the counters do not jump with whichever worker answers. Without that variable (``opsbot
  serve``, tests) they are this process's own.

The web app feeds them with ``WEBHOOK_LATENCY.observe(s)`` and
``WEBHOOK_REQUESTS.labels(status=...).inc()`` per webhook request. Families::

    opsbot_tasks{state}                       gauge, tasks by status (every status listed)
    opsbot_attempts_total{error_class}        counter, stage attempts (``none``: succeeded)
    opsbot_stage_seconds_bucket{stage,le}     histogram of successful attempts' durations
    opsbot_breaker_state{service}             gauge, 0 closed, 1 half_open, 2 open
    opsbot_alerts{tier,status}                gauge, alert rows
    opsbot_outbox_depth, opsbot_inbox_pending gauges
    opsbot_outbox_dead                        gauge, outgoing calls given up on (not replayed)
    opsbot_last_report_timestamp              gauge, Unix seconds (0: never)
    opsbot_webhook_seconds_bucket{le}         histogram, webhook handling time (all web workers)
    opsbot_webhook_requests_total{status}     counter, webhook requests by HTTP status
    <extra>                                   gauges passed in by the caller
"""
from __future__ import annotations

import math
import re
from typing import Any

import sqlite_utils
from prometheus_client import CollectorRegistry, Counter
from prometheus_client import Histogram as PromHistogram
from prometheus_client import values as prom_values

from storage import alerts as store_alerts, breakers, inbox, kv, metrics as store_metrics, outbox
from storage.queue import ACTIVE, FINAL

STAGE_BUCKETS = (1, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
WEBHOOK_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)
BREAKER_VALUES = {"closed": 0, "half_open": 1, "open": 2}
_NAME = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")


# Process-measured families live in their own registry (not the library's global one), so
# importing this module twice, or in a test, never registers a name twice.
PROCESS_REGISTRY = CollectorRegistry(auto_describe=False)
WEBHOOK_LATENCY = PromHistogram("opsbot_webhook_seconds", "Webhook handling time.",
                                buckets=WEBHOOK_BUCKETS, registry=PROCESS_REGISTRY)
WEBHOOK_REQUESTS = Counter("opsbot_webhook_requests", "Webhook requests by HTTP status.",
                           ["status"], registry=PROCESS_REGISTRY)


def multiprocess_mode() -> bool:
    """True when ``prometheus_client`` writes samples to ``PROMETHEUS_MULTIPROC_DIR`` (it decides
    once, at import, from the environment; this asks the library rather than the environment)."""
    return bool(getattr(prom_values.ValueClass, "_multiprocess", False))


def process_families() -> list[Any]:
    """The process-measured families: summed over every web worker's files in multiprocess
    mode, else this process's own."""
    if multiprocess_mode():
        from prometheus_client.multiprocess import MultiProcessCollector

        registry = CollectorRegistry(auto_describe=False)
        MultiProcessCollector(registry)   # reads PROMETHEUS_MULTIPROC_DIR itself
        families = list(registry.collect())
    else:
        families = list(PROCESS_REGISTRY.collect())
    return sorted(families, key=lambda f: f.name)


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
    _process_families(out)
    for name, value in sorted((extra or {}).items()):
        if not _NAME.match(name):
            raise ValueError(f"not a metric name: {name!r}")
        out.family(name, "gauge", "Extra value supplied by the caller.")
        out.sample(name, value)
    return "\n".join(out.lines) + "\n"


def _process_families(out: _Out) -> None:
    """The process-measured families in the same text as the store's (``le`` written as the
    stage histogram writes it; the library's ``_created`` samples left out: they differ per
    process and mean nothing once summed)."""
    helps = {"opsbot_webhook_seconds": "Webhook handling time (all web workers).",
             "opsbot_webhook_requests": "Webhook requests by HTTP status (all web workers)."}
    for fam in process_families():
        name = fam.name + ("_total" if fam.type == "counter" else "")
        out.family(name, fam.type, helps.get(fam.name, fam.documentation))
        samples = [s for s in fam.samples if not s.name.endswith("_created")]
        if fam.type == "histogram":   # buckets in order, then sum and count
            order = {"_bucket": 0, "_sum": 1, "_count": 2}
            samples.sort(key=lambda s: (order.get(s.name[len(fam.name):], 3),
                                        float(s.labels.get("le", 0)) if s.labels.get("le")
                                        else 0.0))
        else:
            samples.sort(key=lambda s: sorted(s.labels.items()))
        for smp in samples:
            labels = dict(smp.labels)
            if "le" in labels:
                labels["le"] = _num(float(labels["le"]))
            value = smp.value
            if fam.type in ("counter", "histogram") and float(value).is_integer() \
                    and not smp.name.endswith("_sum"):
                value = int(value)
            out.sample(smp.name, value, **labels)


def _stage_histograms(totals: AttemptTotals, out: _Out) -> None:
    out.family("opsbot_stage_seconds", "histogram", "Successful stage attempt durations.")
    for stage, acc in sorted(totals.stages.items()):
        counts, total, count = acc[:-2], acc[-2], acc[-1]
        out.histogram("opsbot_stage_seconds", list(zip(STAGE_BUCKETS, map(int, counts))),
                      float(total), int(count), stage=stage)

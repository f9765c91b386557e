"""The canary: a small known-good task run on a schedule, so a broken flow is found before a batch.

Every ``alerts.canary_interval`` seconds (0 turns it off) a one-task batch (source ``canary``,
parameters ``alerts.canary_params``) is queued for the worker. When it fails, or has not finished
within ``alerts.canary_timeout``, a HIGH alert says the flow is broken end to end; the next
canary that succeeds resolves it. Called from the worker's scheduler tick.
"""
from __future__ import annotations

import logging
from typing import Any

from storage import alerts as store_alerts, queue

from bot.alerting.router import AlertRouter, oncall, resolve_alert
from bot.chat.i18n import t

log = logging.getLogger("opsbot.canary")
KEY = "canary"


class Canary:
    def __init__(self, db, settings, clock, router: AlertRouter) -> None:
        self.db = db
        self.settings = settings
        self.clock = clock
        self.router = router

    @property
    def lang(self) -> str:
        return self.settings.language

    @property
    def pipeline(self) -> str:
        """The canary runs on the default pipeline (the first one when none is default); its
        alert goes to that pipeline's chat."""
        spec = self.settings.default_pipeline or self.settings.pipelines[0]
        return spec.name

    @property
    def enabled(self) -> bool:
        return self.settings.alerts.canary_interval > 0

    def tick(self) -> str | None:
        """Judge the latest canary, then queue a new one when due; returns a new batch id."""
        if not self.enabled:
            return None
        latest = self._latest()
        now = self.clock.now()
        interval = self.settings.alerts.canary_interval
        timeout = self.settings.alerts.canary_timeout
        if latest is not None:
            self._judge(latest, now)
            # not due (a read: most ticks stop here without taking the write lock)
            if now - latest["created_at"] < interval:
                return None
            if latest["status"] in queue.BATCH_OPEN and now - latest["created_at"] < timeout:
                return None  # never two canaries at once
        # due: checked again and queued in one transaction, so workers ticking at the same
        # moment queue one canary between them
        batch_id = queue.create_batch_when_due(
            self.db, [{"task_key": f"canary-{int(now)}",
                       "params": dict(self.settings.alerts.canary_params)}],
            now=now, source="canary", pipeline=self.pipeline, every=interval,
            open_for=timeout)
        if batch_id is None:
            return None
        log.info("canary queued", extra={"batch_id": batch_id})
        return batch_id

    def _latest(self) -> dict[str, Any] | None:
        return queue.latest_batch_from(self.db, "canary")

    def _judge(self, batch: dict[str, Any], now: float) -> None:
        [task] = queue.tasks_of(self.db, batch["id"]) or [None]
        if task is None:
            return
        if task["status"] == "succeeded":
            resolve_alert(self.db, self.settings, KEY, now=now,
                          note={"by": "opsbot", "text": t("canary.succeeded", self.lang,
                                                          batch_id=batch["id"])})
            return
        late = (task["status"] in queue.ACTIVE
                and now - batch["created_at"] >= self.settings.alerts.canary_timeout)
        if task["status"] == "failed" or late or batch["status"] == "blocked":
            reason = (task["error_message"] or task["error_class"]
                      or t("canary.failed", self.lang)) \
                if task["status"] == "failed" else (
                t("canary.late", self.lang, seconds=f"{self.settings.alerts.canary_timeout:.0f}")
                if late else t("canary.blocked", self.lang, reason=batch["blocked_reason"] or ""))
            details = {"kind": "canary", "reason": reason, "error_code": task["error_code"],
                       "batch_id": batch["id"], "task_key": task["task_key"],
                       "task_id": task["id"], "debug_url": task["debug_url"], "stage": "coze"}
            if self._already_reported(batch["id"]):
                return
            self.router.raise_alert(KEY, "HIGH", details, batch_id=batch["id"],
                                    mentions=oncall(self.settings.scoped(batch.get("pipeline"))))

    def _already_reported(self, batch_id: str) -> bool:
        row = store_alerts.status_and_batch(self.db, KEY)
        return row is not None and row[1] == batch_id and row[0] == "open"

"""Bitable write-back: each task's outcome goes back to its record in the team's task table.

Writes are outbox rows of kind ``bitable_update`` (target ``app_token/table_id``); the sender
coalesces them into ``batch_update`` calls of at most 500 records, one call per table at a time,
rate limited and retried. Several updates to one record before a send merge into one.
"""
from __future__ import annotations

import hashlib
import json
from typing import Any

from pipeline.notify import NullNotifier
from storage import outbox, queue

from .settings import Settings

MAX_TEXT = 2000  # keep a cell readable; the full output is in the store and the results JSON


class BitableWriteBack(NullNotifier):
    """A pipeline notifier that writes final task outcomes to Bitable (other hooks: no-ops)."""

    def __init__(self, db, settings: Settings, clock) -> None:
        self.db = db
        self.settings = settings
        self.clock = clock
        f = settings.feishu
        self.target = f"{f.bitable_app_token}/{f.bitable_table_id}"
        self.enabled = bool(f.bitable_app_token and f.bitable_table_id)

    def task_finished(self, task: dict[str, Any], decision: Any, error: Any) -> None:
        if not self.enabled or not task.get("record_id"):
            return
        row = queue.get_task(self.db, task["id"])
        enqueue_update(self.db, self.settings, row["record_id"], outcome_fields(self.settings, row),
                       now=self.clock.now(), ref=f"task:{row['id']}")


def outcome_fields(settings: Settings, row: dict[str, Any]) -> dict[str, Any]:
    f = settings.feishu
    status = {"succeeded": f.bitable_done_value, "failed": f.bitable_failed_value}.get(
        row["status"], row["status"])
    duration = None
    if row.get("finished_at") and row.get("started_at"):
        duration = round(row["finished_at"] - row["started_at"], 1)
    error = ""
    if row["status"] == "failed":
        error = f"[{row.get('error_class') or ''} {row.get('error_code') or ''}] " \
                f"{row.get('error_message') or ''}".strip()
    values = {
        f.bitable_status_field: status,
        f.bitable_execute_id_field: row.get("execute_id") or "",
        f.bitable_output_field: _text(row.get("output")),
        f.bitable_error_field: error[:MAX_TEXT],
        f.bitable_duration_field: duration,
    }
    return {k: v for k, v in values.items() if k and v is not None}


def mark_running(db, settings: Settings, batch_id: str, now: float) -> int:
    """Set the batch's records to the running value, so the next ``run`` does not take them."""
    f = settings.feishu
    if not (f.bitable_app_token and f.bitable_table_id):
        return 0
    n = 0
    for row in queue.tasks_of(db, batch_id):
        if row.get("record_id"):
            enqueue_update(db, settings, row["record_id"],
                           {f.bitable_status_field: f.bitable_running_value}, now=now,
                           ref=f"batch:{batch_id}", key=f"run:{batch_id}:{row['id']}")
            n += 1
    return n


def mark_cancelled(db, settings: Settings, batch_id: str, now: float) -> int:
    """Set the records of the batch's cancelled tasks back to the pending value, so the next
    ``run`` takes them again (``mark_running`` left them at the running value). Deterministic
    uuids: cancelling twice (or a crash and a repeat) enqueues nothing new."""
    f = settings.feishu
    if not (f.bitable_app_token and f.bitable_table_id):
        return 0
    n = 0
    for row in queue.tasks_of(db, batch_id, ["cancelled"]):
        if row.get("record_id"):
            enqueue_update(db, settings, row["record_id"],
                           {f.bitable_status_field: f.bitable_pending_value}, now=now,
                           ref=f"batch:{batch_id}", key=_key("cx", batch_id, row["id"]))
            n += 1
    return n


def _key(prefix: str, batch_id: str, task_id: int) -> str:
    """An outbox uuid for one task's update (Feishu-style uuids are at most 50 characters)."""
    key = f"{prefix}:{batch_id}:{task_id}"
    if len(key) <= 50:
        return key
    return f"{prefix}-" + hashlib.sha256(key.encode()).hexdigest()[:40]


def enqueue_update(db, settings: Settings, record_id: str, fields: dict[str, Any], *, now: float,
                   ref: str, key: str | None = None) -> str:
    f = settings.feishu
    return outbox.enqueue(db, "bitable_update", f"{f.bitable_app_token}/{f.bitable_table_id}",
                          {"record_id": record_id, "fields": fields}, now=now, uuid=key, ref=ref)


def _text(output: Any) -> str:
    if output is None:
        return ""
    if not isinstance(output, str):
        output = json.dumps(output, ensure_ascii=False)
    return output if len(output) <= MAX_TEXT else output[:MAX_TEXT - 1] + "…"

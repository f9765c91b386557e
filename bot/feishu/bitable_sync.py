"""Bitable write-back: each task's outcome goes back to its record in the team's task table.

Writes are outbox rows of kind ``bitable_update`` (target ``app_token/table_id``); the sender
coalesces them into ``batch_update`` calls of at most 500 records, one call per table at a time,
rate limited and retried. Several updates to one record before a send merge into one.

The finished video (the synthesis result's ``"video"``: a path to an MP4) goes back to the row
too, when ``feishu.bitable_video_field`` names a column:

- ``bitable_video_mode = "upload"``: an outbox row of kind ``bitable_attach`` (payload
  ``{"record_id", "field", "path", "file_name"}``); the sender uploads the file into the Bitable
  and writes ``[{"file_token": ...}]`` into the attachment column. Its outbox target is
  ``app_token/table_id#files``, apart from the status writes, so an upload in backoff does not
  hold them back (the outbox keeps order per target). Durable like every write: a
  crash before the upload or the write repeats it from the outbox.
- ``"link"``: the column gets text: ``feishu.video_link_base`` + the video's path under
  ``pipeline.output_dir`` (where the team serves that folder), or the absolute path when no base
  is set. A result without ``"video"`` (the manifest step, an operator's command) writes nothing.

With ``feishu.bitable_log_table_id`` set, every attempt is mirrored to that table (the per-node
log for Bitable dashboards): outbox rows of kind ``bitable_create``, at most :data:`LOG_BATCH`
records each (one ``batch_create`` call). The rows are enqueued by :func:`mirror_attempts`
together with a cursor in ``kv`` in one transaction, so nothing is sent twice or skipped.

Many pipelines: a task's row is written back into the table of its batch's pipeline
(:func:`for_batch`); the log table and the column names are shared.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Any

from pipeline.notify import NullNotifier
from storage import kv, outbox, queue
from storage.db import transaction

from bot.settings import Settings

MAX_TEXT = 2000  # keep a cell readable; the full output is in the store and the results JSON


def for_batch(db, settings: Settings, batch_id: str) -> Settings:
    """The settings as the batch's pipeline sees them (its table); unchanged with one pipeline
    or when they are already scoped."""
    if not getattr(settings, "many_pipelines", False) or settings.scope:
        return settings
    return settings.scoped(queue.batch_field(db, batch_id, "pipeline"))


class BitableWriteBack(NullNotifier):
    """A pipeline notifier that writes final task outcomes to Bitable (other hooks: no-ops)."""

    def __init__(self, db, settings: Settings, clock) -> None:
        self.db = db
        self.settings = settings
        self.clock = clock
        f = settings.feishu
        self.target = f"{f.bitable_app_token}/{f.bitable_table_id}"
        self.enabled = bool(f.bitable_app_token and f.bitable_table_id)
        self._mirrored_at = float("-inf")

    def task_finished(self, task: dict[str, Any], decision: Any, error: Any) -> None:
        self._mirror()
        if not task.get("record_id"):
            return
        settings = for_batch(self.db, self.settings, task["batch_id"])
        f = settings.feishu
        if not (f.bitable_app_token and f.bitable_table_id):
            return
        row = queue.get_task(self.db, task["id"])
        fields = outcome_fields(settings, row)
        video = video_path(row)
        if video and f.bitable_video_field:
            if f.bitable_video_mode == "link":
                fields[f.bitable_video_field] = video_link(settings, video)
            else:
                enqueue_attachment(self.db, settings, row, video, now=self.clock.now())
        enqueue_update(self.db, settings, row["record_id"], fields,
                       now=self.clock.now(), ref=f"task:{row['id']}")

    def task_retrying(self, task: dict[str, Any], decision: Any, error: Any) -> None:
        self._mirror()

    def batch_finished(self, batch_id: str) -> None:
        self._mirror(force=True)

    def _mirror(self, force: bool = False) -> None:
        """Mirror new attempts to the log table, at most every LOG_INTERVAL seconds (a finished
        batch flushes at once)."""
        if not (self.settings.feishu.bitable_log_table_id and self.settings.feishu.bitable_app_token):
            return
        now = self.clock.now()
        if force or now - self._mirrored_at >= LOG_INTERVAL:
            self._mirrored_at = now
            mirror_attempts(self.db, self.settings, now=now)


# --- the finished video ---------------------------------------------------------------------------

def video_path(row: dict[str, Any]) -> str | None:
    """The rendered video of a succeeded task (``output.synthesis.video``), when it exists."""
    if row.get("status") != "succeeded" or not row.get("output"):
        return None
    try:
        output = json.loads(row["output"]) if isinstance(row["output"], str) else row["output"]
    except ValueError:
        return None
    result = output.get("synthesis") if isinstance(output, dict) else None
    video = result.get("video") if isinstance(result, dict) else None
    return video if isinstance(video, str) and video and os.path.isfile(video) else None


def video_link(settings: Settings, path: str) -> str:
    """``video_link_base`` + the path under ``pipeline.output_dir``; the absolute path when no
    base is set or the video lies outside the output folder."""
    base = settings.feishu.video_link_base
    absolute = os.path.abspath(path)
    root = os.path.abspath(settings.pipeline.output_dir)
    if not base or os.path.commonpath([absolute, root]) != root:
        return absolute
    relative = os.path.relpath(absolute, root).replace(os.sep, "/")
    from urllib.parse import quote
    return base.rstrip("/") + "/" + quote(relative)


FILES_SUFFIX = "#files"  # outbox target of attachment rows: "app_token/table_id#files"


def enqueue_attachment(db, settings: Settings, row: dict[str, Any], path: str, *,
                       now: float) -> str:
    """Queue the upload of ``path`` into the row's attachment column (one per finished run)."""
    f = settings.feishu
    payload = {"record_id": row["record_id"], "field": f.bitable_video_field,
               "path": os.path.abspath(path), "file_name": os.path.basename(path)}
    key = _key("att", row["batch_id"], f"{row['id']}:{int((row.get('finished_at') or 0) * 1000)}")
    # its own target: per-target order must not hold the row's status writes behind an
    # upload that is in backoff (the sender strips FILES_SUFFIX and locks app/table for the write)
    return outbox.enqueue(db, "bitable_attach",
                          f"{f.bitable_app_token}/{f.bitable_table_id}{FILES_SUFFIX}",
                          payload, now=now, uuid=key, ref=f"task:{row['id']}")


def batch_outputs(db, settings: Settings, batch_id: str) -> dict[str, Any]:
    """What the batch produced, for its summary card: ``{"videos": [(task_key, link)],
    "count", "folder", "link_base"}`` (links as :func:`video_link` makes them; at most 20
    listed; task keys raw: the card cuts and escapes them)."""
    videos = []
    for row in queue.tasks_of(db, batch_id, ["succeeded"]):
        path = video_path(row)
        if path:
            videos.append((row["task_key"], video_link(settings, path)))
    folder = os.path.join(os.path.abspath(settings.pipeline.output_dir), batch_id)
    return {"count": len(videos), "videos": videos[:20], "folder": folder,
            "link_base": bool(settings.feishu.video_link_base)}


# --- the log table --------------------------------------------------------------------------------

LOG_BATCH = 500          # records per batch_create call (Feishu's limit)
LOG_INTERVAL = 5.0       # seconds between mirror passes while a batch runs
LOG_CURSOR = "bitable_log:last_attempt"
#: Columns of the log table, for ``opsbot doctor`` and the README (text unless noted).
LOG_FIELDS = {"task_id": "text", "batch_id": "text", "stage": "text", "outcome": "text",
              "error_class": "text", "error_code": "text", "node": "text",
              "started_at": "date", "seconds": "number", "input_bytes": "number",
              "output_bytes": "number", "execute_id": "text"}


def log_record(row: dict[str, Any]) -> dict[str, Any]:
    """One attempt as log-table fields (empty values left out; dates as ms timestamps)."""
    seconds = None
    if row.get("ended_at") is not None:
        seconds = round(max(0.0, row["ended_at"] - row["started_at"]), 3)
    values = {"task_id": row.get("task_key"), "batch_id": row.get("batch_id"),
              "stage": row.get("stage"), "outcome": row.get("outcome"),
              "error_class": row.get("error_class"), "error_code": row.get("error_code"),
              "node": row.get("node"), "started_at": int(row["started_at"] * 1000),
              "seconds": seconds, "input_bytes": row.get("input_bytes"),
              "output_bytes": row.get("output_bytes"), "execute_id": row.get("execute_id")}
    return {k: (str(v) if LOG_FIELDS[k] == "text" else v) for k, v in values.items()
            if v not in (None, "")}


def mirror_attempts(db, settings: Settings, *, now: float, limit: int = 20 * LOG_BATCH) -> int:
    """Queue the attempts recorded since the last call for the log table; return how many.

    Each outbox row carries at most LOG_BATCH records; the cursor moves in the same
    transaction, so a crash leaves either both or neither.
    """
    f = settings.feishu
    if not (f.bitable_log_table_id and f.bitable_app_token):
        return 0
    target = f"{f.bitable_app_token}/{f.bitable_log_table_id}"
    with transaction(db) as conn:
        value = kv.get_in(conn, LOG_CURSOR)
        last = int(value) if value is not None else 0
        rows = queue.attempts_after_in(conn, last, limit=limit)
        for i in range(0, len(rows), LOG_BATCH):
            chunk = rows[i:i + LOG_BATCH]
            outbox.enqueue_in(conn, uuid=f"log:{chunk[0]['id']}:{chunk[-1]['id']}",
                              kind="bitable_create", target=target,
                              payload={"records": [log_record(r) for r in chunk]},
                              ref="attempt-log", now=now)
        if rows:
            kv.put_in(conn, LOG_CURSOR, str(rows[-1]["id"]), now=now)
    return len(rows)


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
    settings = for_batch(db, settings, batch_id)
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
    settings = for_batch(db, settings, batch_id)
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


def _key(prefix: str, batch_id: str, task_id: Any) -> str:
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

"""``opsbot run FILE``: one batch, the whole pipeline in this process, with progress and results.

The batch goes through the same store and worker as chat batches, so a run that is interrupted
(Ctrl-C, kill) can be finished later by ``opsbot worker --drain`` (or a running service worker)
without resubmitting anything.

Sharing a store with a running service worker: the batch is marked as run by this process
(``batches.runner``, held for ``lease_seconds`` and renewed while it runs), so the service
worker leaves its tasks alone, as this process touches only its own batch; and both spend one
Coze QPS budget per account, kept in the store (:class:`~pipeline.ratelimit.SharedRateLimiter`).
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import sqlite_utils

from storage import queue
from storage.db import path_of

from .clock import Clock
from .coze import CozeClient
from .config import PipelineConfig
from .notify import Notifier
from .progress import ProgressLine
from .ratelimit import coze_limiter
from .routing import Account, Route, Routing
from .worker import Worker, make_owner

log = logging.getLogger("opsbot.runner")


@dataclass
class RunResult:
    batch_id: str
    counts: dict[str, int]
    results_path: Path
    exit_code: int


async def run_batch(db: sqlite_utils.Database, config: PipelineConfig, *, tasks: list[dict],
                    coze_base_url: str, coze_token: str, workflow_id: str,
                    results_path: Path, clock: Clock | None = None,
                    notifier: Notifier | None = None, stream: TextIO | None = None,
                    progress_every: float = 0.5, pipeline: str = "default",
                    account: str = "default", account_pipelines: tuple[str, ...] | None = None,
                    breaker_service: str = "coze") -> RunResult:
    """``pipeline``: the batch's pipeline; ``account`` (its breaker row ``breaker_service``)
    the Coze account it runs on, whose run limit (``config.max_coze``) is counted over the
    batches of ``account_pipelines`` (None: every batch on the store)."""
    clock = clock or Clock()
    owner = make_owner()
    hold = config.lease_seconds
    batch_id = queue.create_batch(db, tasks, now=clock.now(), source="cli",
                                  workflow_id=workflow_id, runner=owner,
                                  runner_until=clock.now() + hold, pipeline=pipeline)
    limiter = coze_limiter(config.coze_qps, clock, store=path_of(db), base_url=coze_base_url,
                           token=coze_token)
    started = clock.monotonic()
    bar = ProgressLine(stream)
    stop = asyncio.Event()
    _install_stop(stop)
    held_at = clock.now()
    try:
        async with CozeClient(coze_base_url, coze_token, limiter=limiter) as coze:
            # this batch only: the store may be shared with a service worker's chat batches
            routing = Routing((Account(account, coze, config.max_coze, config.coze_qps,
                                       breaker_service=breaker_service,
                                       pipelines=account_pipelines),),
                              (Route(pipeline, workflow_id, config.fallback_workflow_id,
                                     account=account),))
            worker = Worker(db, config, coze, workflow_id, clock=clock, notifier=notifier,
                            batch_ids=(batch_id,), owner=owner, routing=routing)
            run = asyncio.create_task(worker.run(drain=True, stop=stop))
            try:
                while not run.done():
                    bar.update(queue.batch_counts(db, batch_id), clock.monotonic() - started)
                    if clock.now() - held_at >= hold / 3:
                        held_at = await _renew_hold(worker, batch_id, owner, clock, hold,
                                                    held_at)
                    await asyncio.wait([run], timeout=progress_every)
                await run
            finally:
                worker.synth.close()
    finally:
        limiter.close()
        with contextlib.suppress(sqlite3.Error):   # whatever is left, any worker may finish
            queue.hold_batch(db, batch_id, owner=owner, until=None)
    counts = queue.batch_counts(db, batch_id)
    bar.update(counts, clock.monotonic() - started, final=True)
    write_results(db, batch_id, results_path)
    ok = counts["succeeded"] == counts["total"] and not stop.is_set()
    return RunResult(batch_id, counts, results_path, 0 if ok else 1)


async def _renew_hold(worker: Worker, batch_id: str, owner: str, clock: Clock,
                      hold: float, held_at: float) -> float:
    """Keep the batch this process's own for ``hold`` more seconds; returns when it was done.
    The write goes through the worker's store thread: a store locked by another process delays
    it without freezing the loop."""
    try:
        await worker.store(queue.hold_batch, batch_id, owner=owner, until=clock.now() + hold)
    except sqlite3.OperationalError as exc:   # the store is busy: try again on the next tick
        log.warning("could not renew the hold on batch %s: %s", batch_id, exc)
        return held_at
    return clock.now()


def _install_stop(stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError, ValueError):  # not the main thread
            pass


def task_result(row: dict[str, Any]) -> dict[str, Any]:
    """One task as the results JSON shows it."""
    created, started, finished = row["created_at"], row["started_at"], row["finished_at"]
    return {
        "task_id": row["task_key"],
        "status": row["status"],
        "attempts": row["attempts"],
        "resubmits": row["resubmits"],
        "execute_id": row["execute_id"],
        "debug_url": row["debug_url"],
        "error_class": row["error_class"],
        "error_code": row["error_code"],
        "error_message": row["error_message"],
        "output": _load(row["output"]),
        "timings": {
            "queued_seconds": _diff(started, created),
            "coze_seconds": row["coze_seconds"],
            "synthesis_seconds": row["synthesis_seconds"],
            "total_seconds": _diff(finished, started),
        },
    }


def write_results(db: sqlite_utils.Database, batch_id: str, path: Path) -> dict[str, Any]:
    rows = queue.tasks_of(db, batch_id)
    doc = {
        "batch_id": batch_id,
        "counts": queue.batch_counts(db, batch_id),
        "tasks": [task_result(r) for r in rows],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(doc, ensure_ascii=False, indent=2), encoding="utf-8")
    tmp.replace(path)
    return doc


def summary_table(db: sqlite_utils.Database, batch_id: str, limit: int = 20) -> str:
    """A plain-text summary: counts, then the failed tasks with why and what to do."""
    counts = queue.batch_counts(db, batch_id)
    lines = [f"batch {batch_id}: {counts['succeeded']} succeeded, {counts['failed']} failed,"
             f" {counts['cancelled']} cancelled, {counts['total']} total"]
    failed = queue.tasks_of(db, batch_id, ["failed"])
    if failed:
        lines.append("")
        lines.append(f"{'task_id':<20} {'class':<16} {'code':<10} message")
        for row in failed[:limit]:
            lines.append(f"{row['task_key'][:20]:<20} {str(row['error_class'])[:16]:<16}"
                         f" {str(row['error_code'] or '')[:10]:<10}"
                         f" {(row['error_message'] or '')[:80]}")
        if len(failed) > limit:
            lines.append(f"... and {len(failed) - limit} more (see the results JSON)")
        lines.append("")
        lines.append(f"retry the failed ones later with: opsbot run FILE --include "
                     f"{','.join(r['task_key'] for r in failed[:5])}"
                     f"{',...' if len(failed) > 5 else ''}")
    return "\n".join(lines)


def _diff(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else round(a - b, 3)


def _load(text: Any) -> Any:
    if not isinstance(text, str):
        return text
    try:
        return json.loads(text)
    except ValueError:
        return text


def seeds_config(path: str | Path) -> dict[str, Any]:
    """Read the seeds' JSON config: ``workflow_config.coze_config`` and the worker limits.

    Returns the keys found: token, workflow_id, max_coze, max_synthesis, poll_first.
    """
    from .batchfile import BatchFileError

    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BatchFileError(f"--config {path}: no such file") from None
    except ValueError as exc:
        raise BatchFileError(f"--config {path}: not valid JSON ({exc})") from None
    wc = doc.get("workflow_config", doc) if isinstance(doc, dict) else {}
    if not isinstance(wc, dict):
        raise BatchFileError(f"--config {path}: workflow_config must be an object")
    coze = wc.get("coze_config", {}) if isinstance(wc.get("coze_config", {}), dict) else {}
    out: dict[str, Any] = {}
    for key, src in (("token", coze.get("token")), ("workflow_id", coze.get("workflow_id"))):
        if src:
            out[key] = str(src)
    for key, name in (("max_coze", "max_coze_concurrent"),
                      ("max_synthesis", "max_synthesis_workers")):
        value = wc.get(name, coze.get(name))
        if value is not None:
            if not isinstance(value, int) or value < 1:
                raise BatchFileError(f"--config {path}: {name} must be a whole number >= 1")
            out[key] = value
    poll = wc.get("poll_interval", coze.get("poll_interval"))
    if poll is not None:
        if not isinstance(poll, (int, float)) or poll <= 0:
            raise BatchFileError(f"--config {path}: poll_interval must be a positive number")
        out["poll_first"] = float(poll)
    return out

"""Batches and tasks: the durable work queue.

A worker claims a due task with a lease (``claim_tasks``); while it holds the lease it renews it
(``renew_leases``). A worker killed mid-task leaves the lease to run out, and the next claim picks
the task up again with its stored ``execute_id``, so a submitted run is waited on, never submitted
twice. Every function takes ``now`` (Unix seconds) so tests control time.
"""
from __future__ import annotations

import json
import sqlite3
import time
import uuid
from typing import Any, Callable, Iterable

import sqlite_utils

from .db import Conflict, NotFound, is_postgres, transaction

FINAL = ("succeeded", "failed", "cancelled", "ignored")
ACTIVE = ("queued", "running", "retrying")
BATCH_OPEN = ("queued", "running", "paused", "blocked")
#: Attempts are recorded one at a time (PostgreSQL: this per-key lock; SQLite: its one writer),
#: so their ids are committed in the order given out: readers that follow the table by id
#: (/metrics' running totals, the Bitable log's cursor) never pass an id that commits later.
ATTEMPT_WRITES = "attempts"


def new_batch_id() -> str:
    return "b" + uuid.uuid4().hex[:8]


def create_batch(db: sqlite_utils.Database, tasks: Iterable[dict[str, Any]], *, now: float,
                 source: str, batch_id: str | None = None, chat_id: str | None = None,
                 command_message_id: str | None = None, created_by: str | None = None,
                 workflow_id: str | None = None, options: dict | None = None,
                 runner: str | None = None, runner_until: float | None = None,
                 pipeline: str = "default") -> str:
    """Record a batch and its tasks in one transaction; return the batch id.

    Each task is ``{"task_key": str, "params": dict, "record_id": str | None}``. Duplicate
    task keys within the batch raise ``ValueError`` before anything is written. ``runner``:
    the owner that runs this batch itself (``opsbot run``); no other worker claims its tasks
    until ``runner_until`` (see :func:`hold_batch`). ``pipeline``: the pipeline the batch
    belongs to (its workflow, Coze account and chat; see bot.settings).
    """
    rows = _checked(tasks)
    batch_id = batch_id or new_batch_id()
    with transaction(db) as conn:
        _insert_batch(conn, rows, batch_id=batch_id, now=now, source=source, chat_id=chat_id,
                      command_message_id=command_message_id, created_by=created_by,
                      workflow_id=workflow_id, options=options, runner=runner,
                      runner_until=runner_until, pipeline=pipeline)
    return batch_id


def create_batch_when_due(db: sqlite_utils.Database, tasks: Iterable[dict[str, Any]], *,
                          now: float, source: str, every: float, open_for: float,
                          pipeline: str = "default") -> str | None:
    """Record a batch of ``source`` unless the latest batch of that source is younger than
    ``every`` seconds, or is still open (:data:`BATCH_OPEN`) and younger than ``open_for``
    (whatever its pipeline); return the new batch id (of ``pipeline``), or None when it was
    not due.

    The check and the insert are one transaction that runs alone (SQLite: ``BEGIN
    IMMEDIATE``; PostgreSQL: the exclusive write lock), so processes checking at the same
    moment queue one batch, never two (the scheduled canary of every worker).
    """
    rows = _checked(tasks)
    with transaction(db) as conn:
        latest = conn.execute(
            "SELECT created_at, status FROM batches WHERE source = ?"
            " ORDER BY created_at DESC, rowid DESC LIMIT 1", [source]).fetchone()
        if latest is not None:
            age = now - latest[0]
            if age < every or (latest[1] in BATCH_OPEN and age < open_for):
                return None
        batch_id = new_batch_id()
        _insert_batch(conn, rows, batch_id=batch_id, now=now, source=source, pipeline=pipeline)
    return batch_id


def _checked(tasks: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """The tasks as a list; ``ValueError`` naming duplicate task keys."""
    rows = list(tasks)
    keys = [t["task_key"] for t in rows]
    dupes = sorted({k for k in keys if keys.count(k) > 1})
    if dupes:
        raise ValueError(f"duplicate task_id: {', '.join(dupes[:5])}")
    return rows


def _insert_batch(conn, rows: list[dict[str, Any]], *, batch_id: str, now: float, source: str,
                  chat_id: str | None = None, command_message_id: str | None = None,
                  created_by: str | None = None, workflow_id: str | None = None,
                  options: dict | None = None, runner: str | None = None,
                  runner_until: float | None = None, pipeline: str = "default") -> None:
    """Insert the batch row and its tasks inside the caller's transaction."""
    conn.execute(
        "INSERT INTO batches (id, source, status, chat_id, command_message_id, created_by,"
        " created_at, workflow_id, options, runner, runner_until, pipeline)"
        " VALUES (?, ?, 'queued', ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (batch_id, source, chat_id, command_message_id, created_by, now, workflow_id,
         json.dumps(options or {}, ensure_ascii=False), runner, runner_until, pipeline))
    conn.executemany(
        "INSERT INTO tasks (batch_id, task_key, record_id, params, created_at)"
        " VALUES (?, ?, ?, ?, ?)",
        [(batch_id, t["task_key"], t.get("record_id"),
          json.dumps(t.get("params") or {}, ensure_ascii=False), now) for t in rows])


def get_batch(db: sqlite_utils.Database, batch_id: str) -> dict[str, Any]:
    rows = list(db.query("SELECT * FROM batches WHERE id = ?", [batch_id]))
    if not rows:
        raise NotFound(f"batch {batch_id} not found")
    return rows[0]


def _in_pipelines(pipelines: Iterable[str] | None, column: str = "pipeline",
                  ) -> tuple[str, list[str]]:
    """SQL ``AND column IN (...)`` for ``pipelines`` (None: no condition) and its arguments."""
    if pipelines is None:
        return "", []
    names = list(pipelines)
    return f" AND {column} IN ({','.join('?' * len(names)) or 'NULL'})", names


def latest_batch(db: sqlite_utils.Database,
                 pipelines: Iterable[str] | None = None) -> dict[str, Any] | None:
    """The newest batch (of ``pipelines``, if given), or None."""
    cond, args = _in_pipelines(pipelines)
    rows = list(db.query(f"SELECT * FROM batches WHERE 1 = 1{cond}"
                         " ORDER BY created_at DESC, rowid DESC LIMIT 1", args))
    return rows[0] if rows else None


def list_batches(db: sqlite_utils.Database, *, open_only: bool = False,
                 limit: int = 10, pipelines: Iterable[str] | None = None) -> list[dict[str, Any]]:
    where = f"WHERE status IN {BATCH_OPEN!r}" if open_only else "WHERE 1 = 1"
    cond, args = _in_pipelines(pipelines)
    return list(db.query(
        f"SELECT * FROM batches {where}{cond} ORDER BY created_at DESC, rowid DESC LIMIT ?",
        [*args, limit]))


def batch_counts(db: sqlite_utils.Database, batch_id: str) -> dict[str, int]:
    """Task counts by status for one batch (every status present, zero when none)."""
    counts = {s: 0 for s in ACTIVE + FINAL}
    for row in db.query("SELECT status, COUNT(*) AS n FROM tasks WHERE batch_id = ?"
                        " GROUP BY status", [batch_id]):
        counts[row["status"]] = row["n"]
    counts["total"] = sum(counts.values())
    # A running task that already failed once is waiting on a retry or a new run: show it so.
    backing_off = db.execute("SELECT COUNT(*) FROM tasks WHERE batch_id = ? AND status = 'running'"
                             " AND error_class IS NOT NULL", [batch_id]).fetchone()[0]
    counts["running"] -= backing_off
    counts["retrying"] += backing_off
    return counts


def get_task(db: sqlite_utils.Database, task_id: int) -> dict[str, Any]:
    rows = list(db.query("SELECT * FROM tasks WHERE id = ?", [task_id]))
    if not rows:
        raise NotFound(f"task {task_id} not found")
    return rows[0]


def find_task(db: sqlite_utils.Database, ref: str) -> dict[str, Any]:
    """Find a task by numeric id or by its task_key (latest batch first)."""
    if ref.isdigit():
        rows = list(db.query("SELECT * FROM tasks WHERE id = ?", [int(ref)]))
        if rows:
            return rows[0]
    rows = list(db.query("SELECT * FROM tasks WHERE task_key = ? ORDER BY id DESC LIMIT 1",
                         [ref]))
    if not rows:
        raise NotFound(f"task {ref} not found")
    return rows[0]


def tasks_of(db: sqlite_utils.Database, batch_id: str,
             status: Iterable[str] | None = None) -> list[dict[str, Any]]:
    if status is None:
        return list(db.query("SELECT * FROM tasks WHERE batch_id = ? ORDER BY id", [batch_id]))
    st = tuple(status)
    marks = ",".join("?" * len(st))
    return list(db.query(
        f"SELECT * FROM tasks WHERE batch_id = ? AND status IN ({marks}) ORDER BY id",
        [batch_id, *st]))


def claim_tasks(db: sqlite_utils.Database, *, owner: str, now: float, lease: float,
                limit: int, stage: str | None = None,
                batch_ids: Iterable[str] | None = None,
                pipelines: Iterable[str] | None = None) -> list[dict[str, Any]]:
    """Claim up to ``limit`` due tasks of running batches for ``owner``.

    A task is due when it is queued/retrying with ``next_at <= now``, or running with an expired
    lease held by another owner (its worker died; an owner never takes over its own tasks, whose
    coroutines may still be alive). Claimed tasks become ``running`` with a fresh lease. Batches
    that are queued become running on their first claim. ``batch_ids`` limits the claim. A
    batch that another live process runs itself (``runner``, held until ``runner_until``) is
    left to it. ``pipelines`` limits the claim to batches of those pipelines (one Coze
    account's).

    PostgreSQL: one statement that skips the rows other claimers hold (``SKIP LOCKED``), so
    claimers on many machines run in parallel; SQLite: read then update, under its one writer.
    """
    if limit <= 0:
        return []
    wanted = tuple(batch_ids) if batch_ids else ()
    with transaction(db, concurrent=True) as conn:
        if is_postgres(db):
            return _claim_skip_locked(conn, owner=owner, now=now, lease=lease, limit=limit,
                                      stage=stage, wanted=wanted, pipelines=pipelines)
        return _claim_select_update(conn, owner=owner, now=now, lease=lease, limit=limit,
                                    stage=stage, wanted=wanted, pipelines=pipelines)


def _due_sql(*, owner: str, now: float, limit: int, stage: str | None, wanted: tuple,
             pipelines: Iterable[str] | None = None, lock: str = "",
             sqlite: bool = False) -> tuple[str, list[Any]]:
    """The ids (and ``next_at``) of up to ``limit`` due tasks, earliest first: one
    index-ordered, limited scan per status (tasks_claim is (status, next_at), id breaks ties),
    merged, so cost grows with ``limit``, not with the number of queued tasks. Running tasks
    are found by their expired lease (tasks_lease is (status, lease_until)), so the claim does
    not read every running task whose lease is valid; SQLite is told to use that index
    (``sqlite``: ``INDEXED BY``; its planner would rather read tasks_claim in order), and
    PostgreSQL picks it itself. ``lock`` ends each scan (PostgreSQL: ``FOR UPDATE OF t SKIP
    LOCKED``)."""
    stage_sql = " AND t.stage = ?" if stage else ""
    stage_args: list[Any] = [stage] if stage else []
    in_pipelines, pipeline_args = _in_pipelines(pipelines)
    runnable = (" AND t.batch_id IN (SELECT id FROM batches WHERE status IN ('queued', 'running')"
                " AND (runner IS NULL OR runner = ? OR runner_until IS NULL OR runner_until < ?)"
                f"{in_pipelines})")
    if wanted:
        runnable += f" AND t.batch_id IN ({','.join('?' * len(wanted))})"
    parts, args = [], []
    for status, cond in (("queued", "t.next_at <= ?"), ("retrying", "t.next_at <= ?"),
                         ("running", "t.lease_until < ? AND t.lease_owner IS NOT ?")):
        hint = " INDEXED BY tasks_lease" if sqlite and status == "running" else ""
        parts.append(f"SELECT * FROM (SELECT t.id, t.next_at FROM tasks t{hint}"
                     f" WHERE t.status = ?"
                     f" AND {cond}{stage_sql}{runnable} ORDER BY t.next_at, t.id LIMIT ?{lock})"
                     f" AS {status}")
        own = [owner] if status == "running" else []
        args += [status, now, *own, *stage_args, owner, now, *pipeline_args, *wanted, limit]
    sql = f"SELECT id FROM ({' UNION ALL '.join(parts)}) AS due ORDER BY next_at, id LIMIT ?"
    return sql, [*args, limit]


def _claim_select_update(conn, *, owner: str, now: float, lease: float, limit: int,
                         stage: str | None, wanted: tuple,
                         pipelines: Iterable[str] | None = None) -> list[dict[str, Any]]:
    """SQLite's claim: read the due ids, then take them (its one writer makes that atomic)."""
    sql, args = _due_sql(owner=owner, now=now, limit=limit, stage=stage, wanted=wanted,
                         pipelines=pipelines, sqlite=True)
    ids = [r[0] for r in conn.execute(sql, args).fetchall()]
    if not ids:
        return []
    marks = ",".join("?" * len(ids))
    conn.execute(
        f"UPDATE tasks SET status = 'running', lease_owner = ?, lease_until = ?,"
        f" started_at = COALESCE(started_at, ?) WHERE id IN ({marks})",
        [owner, now + lease, now, *ids])
    conn.execute(
        f"UPDATE batches SET status = 'running', started_at = COALESCE(started_at, ?)"
        f" WHERE status = 'queued' AND id IN (SELECT batch_id FROM tasks WHERE id IN ({marks}))",
        [now, *ids])
    cols = [d[0] for d in conn.execute("SELECT * FROM tasks LIMIT 0").description]
    rows = conn.execute(f"SELECT * FROM tasks WHERE id IN ({marks}) ORDER BY id", ids).fetchall()
    return [dict(zip(cols, r)) for r in rows]


def _claim_skip_locked(conn, *, owner: str, now: float, lease: float, limit: int,
                       stage: str | None, wanted: tuple,
                       pipelines: Iterable[str] | None = None) -> list[dict[str, Any]]:
    """PostgreSQL's claim, one statement: each scan locks the due rows it returns and skips the
    rows another claimer has locked (``SKIP LOCKED``); a row another claimer took and committed
    meanwhile is re-checked on its new version and dropped. The CTE runs once, so exactly the
    rows it locked are taken; their queued batches start in the same statement, their rows
    locked in id order (as every claimer does, so two claimers starting the same batches never
    wait for each other in a circle)."""
    due, args = _due_sql(owner=owner, now=now, limit=limit, stage=stage, wanted=wanted,
                         pipelines=pipelines, lock=" FOR UPDATE OF t SKIP LOCKED")
    cur = conn.execute(
        f"WITH due AS MATERIALIZED ({due}),"
        " claimed AS (UPDATE tasks SET status = 'running', lease_owner = ?, lease_until = ?,"
        "  started_at = COALESCE(started_at, ?) FROM due WHERE tasks.id = due.id"
        "  RETURNING tasks.*),"
        " started AS (UPDATE batches SET status = 'running', started_at = COALESCE(started_at, ?)"
        "  WHERE status = 'queued' AND id IN (SELECT id FROM batches WHERE status = 'queued'"
        "   AND id IN (SELECT batch_id FROM claimed) ORDER BY id FOR UPDATE))"
        " SELECT * FROM claimed ORDER BY id", [*args, owner, now + lease, now, now])
    cols = [d[0] for d in cur.description]
    return [dict(zip(cols, r)) for r in cur.fetchall()]


def hold_batch(db: sqlite_utils.Database, batch_id: str, *, owner: str,
               until: float | None) -> bool:
    """Keep running ``batch_id`` alone until ``until`` (None: let any worker take it over).

    Returns False when ``owner`` is not the batch's runner (nothing is changed then).
    """
    with transaction(db, concurrent=True) as conn:
        cur = conn.execute("UPDATE batches SET runner_until = ? WHERE id = ? AND runner = ?",
                           [until, batch_id, owner])
        return cur.rowcount == 1


def renew_leases(db: sqlite_utils.Database, task_ids: Iterable[int], *, owner: str,
                 now: float | Callable[[], float], lease: float) -> set[int]:
    """Extend the leases ``owner`` still holds; return the ids it no longer holds.

    ``now`` may be a clock function: it is read once the write lock is held, so a renewal that
    waited for another process's write still grants a full lease from when it happens.
    """
    ids = list(task_ids)
    if not ids:
        return set()
    marks = ",".join("?" * len(ids))
    with transaction(db, concurrent=True) as conn:
        now = now() if callable(now) else now
        conn.execute(f"UPDATE tasks SET lease_until = ? WHERE lease_owner = ? AND status = 'running'"
                     f" AND id IN ({marks})", [now + lease, owner, *ids])
        held = {r[0] for r in conn.execute(
            f"SELECT id FROM tasks WHERE lease_owner = ? AND status = 'running' AND id IN ({marks})",
            [owner, *ids])}
    return set(ids) - held


def update_task(db: sqlite_utils.Database, task_id: int, *, owner: str | None = None,
                **fields: Any) -> bool:
    """Update a task's columns; with ``owner``, only while that owner holds it. Returns success."""
    if not fields:
        return True
    cols = ", ".join(f"{k} = ?" for k in fields)
    args = [_json(v) for v in fields.values()]
    sql = f"UPDATE tasks SET {cols} WHERE id = ?"
    args.append(task_id)
    if owner is not None:
        sql += " AND lease_owner = ? AND status = 'running'"
        args.append(owner)
    with transaction(db, concurrent=True) as conn:
        cur = conn.execute(sql, args)
        return cur.rowcount == 1


def mark_submit(db: sqlite_utils.Database, task_id: int, *, owner: str, now: float,
                max_in_flight: int | None = None,
                pipelines: Iterable[str] | None = None) -> str:
    """Mark a submit about to go out (``submit_started_at = now``) while ``owner`` holds the task.

    With ``max_in_flight``: only while fewer Coze runs are in flight across every worker on this
    store (running tasks in the ``coze`` stage with a run id or a submit marked), checked in the
    same transaction, so two processes never together exceed one account's concurrency.
    ``pipelines``: count only the runs of batches of these pipelines (the account's).
    Returns ``"marked"``, ``"full"`` (nothing written: submit later), ``"adopted"`` (the task
    is still held, but a run id was stored meanwhile: the worker that lost the lease during its
    submit adopted its run, see :func:`store_run_id`; nothing written, submit nothing) or
    ``"lost"`` (the lease).
    """
    # One key per account (its pipelines), so accounts do not wait for each other.
    pipelines = None if pipelines is None else tuple(pipelines)
    account = ",".join(sorted(pipelines or ()))
    with transaction(db, concurrent=True, key=f"coze-in-flight:{account}") as conn:
        if max_in_flight is not None:
            cond, args = _in_pipelines(pipelines)
            of_account = f" AND batch_id IN (SELECT id FROM batches WHERE 1 = 1{cond})" \
                if cond else ""
            busy = conn.execute(
                "SELECT COUNT(*) FROM tasks WHERE status = 'running' AND stage = 'coze'"
                " AND (execute_id IS NOT NULL OR submit_started_at IS NOT NULL) AND id != ?"
                f"{of_account}", [task_id, *args]).fetchone()[0]
            if busy >= max_in_flight:
                return "full"
        cur = conn.execute("UPDATE tasks SET submit_started_at = ? WHERE id = ?"
                           " AND lease_owner = ? AND status = 'running' AND execute_id IS NULL",
                           [now, task_id, owner])
        if cur.rowcount == 1:
            return "marked"
        held = conn.execute("SELECT 1 FROM tasks WHERE id = ? AND lease_owner = ?"
                            " AND status = 'running'", [task_id, owner]).fetchone()
        return "adopted" if held else "lost"


def store_run_id(db: sqlite_utils.Database, task_id: int, *, owner: str, mark: float,
                 tries: int = 20, pause: float = 0.5, **fields: Any) -> str:
    """Store the ``execute_id`` (and the other ``fields``) of a run Coze just accepted.

    ``"owned"``: written while ``owner`` holds the task. ``"adopted"``: the lease was lost, but
    nobody has submitted since (``submit_started_at`` is still this submit's ``mark`` and no
    id is stored), so the id is written anyway and the next claim waits on this run instead of
    submitting another. ``"lost"``: another worker moved on (its own submit, or the doubt
    recorded). A write that finds the store locked past its busy timeout is tried again, up to
    ``tries`` times, ``pause`` seconds apart (run it off the event loop); then it raises.
    """
    fields = {**fields, "submit_started_at": None}
    cols = ", ".join(f"{k} = ?" for k in fields)
    args = [_json(v) for v in fields.values()]
    for left in range(tries - 1, -1, -1):
        try:
            with transaction(db, concurrent=True) as conn:
                cur = conn.execute(f"UPDATE tasks SET {cols} WHERE id = ? AND lease_owner = ?"
                                   " AND status = 'running'", [*args, task_id, owner])
                if cur.rowcount == 1:
                    return "owned"
                cur = conn.execute(f"UPDATE tasks SET {cols} WHERE id = ? AND execute_id IS NULL"
                                   " AND submit_started_at = ?", [*args, task_id, mark])
                return "adopted" if cur.rowcount == 1 else "lost"
        except sqlite3.OperationalError:
            if not left:
                raise
            time.sleep(pause)
    raise AssertionError("unreachable")  # pragma: no cover


def _json(value: Any) -> Any:
    return json.dumps(value, ensure_ascii=False) if isinstance(value, (dict, list)) else value


def set_batch_status(db: sqlite_utils.Database, batch_id: str, status: str, *, now: float,
                     reason: str | None = None, allowed_from: Iterable[str] | None = None) -> str:
    """Move a batch to ``status``; returns the previous status.

    Raises ``NotFound`` for an unknown batch and ``Conflict`` when the batch is in a status not
    in ``allowed_from``.
    """
    with transaction(db) as conn:
        row = conn.execute("SELECT status FROM batches WHERE id = ?", [batch_id]).fetchone()
        if row is None:
            raise NotFound(f"batch {batch_id} not found")
        previous = row[0]
        if allowed_from is not None and previous not in tuple(allowed_from):
            raise Conflict(f"batch {batch_id} is {previous}")
        finished = now if status in ("cancelled", "done") else None
        conn.execute("UPDATE batches SET status = ?, blocked_reason = ?,"
                     " finished_at = COALESCE(?, finished_at) WHERE id = ?",
                     [status, reason, finished, batch_id])
        if status == "cancelled":
            conn.execute("UPDATE tasks SET status = 'cancelled', finished_at = ?,"
                         " lease_owner = NULL WHERE batch_id = ? AND status IN"
                         " ('queued', 'retrying', 'running')", [now, batch_id])
    return previous


def block_open_batches(db: sqlite_utils.Database, *, now: float, reason: str,
                       batch_ids: Iterable[str] | None = None,
                       pipelines: Iterable[str] | None = None) -> list[str]:
    """Block running/queued batches (all, those of ``pipelines``, or the given ones); return
    the ids blocked."""
    with transaction(db) as conn:
        if batch_ids is None:
            cond, args = _in_pipelines(pipelines)
            ids = [r[0] for r in conn.execute(
                f"SELECT id FROM batches WHERE status IN ('queued', 'running'){cond}", args)]
        else:
            wanted = list(batch_ids)
            marks = ",".join("?" * len(wanted)) or "NULL"
            ids = [r[0] for r in conn.execute(
                f"SELECT id FROM batches WHERE status IN ('queued', 'running') AND id IN ({marks})",
                wanted)]
        for bid in ids:
            conn.execute("UPDATE batches SET status = 'blocked', blocked_reason = ? WHERE id = ?",
                         [reason, bid])
    return ids


def requeue_tasks(db: sqlite_utils.Database, task_ids: Iterable[int], *, now: float) -> int:
    """Put failed/ignored/cancelled tasks back in the queue for a fresh run; returns how many.

    The stored ``execute_id`` is cleared (a new run is wanted), attempts restart, and a finished
    batch is reopened.
    """
    ids = list(task_ids)
    if not ids:
        return 0
    marks = ",".join("?" * len(ids))
    with transaction(db) as conn:
        cur = conn.execute(
            f"UPDATE tasks SET status = 'queued', stage = 'coze', execute_id = NULL,"
            f" submitted_at = NULL, attempts = 0, resubmits = 0, next_at = ?, lease_owner = NULL,"
            f" lease_until = NULL, error_class = NULL, error_code = NULL, error_message = NULL,"
            f" error_node = NULL, finished_at = NULL, output = NULL, coze_output = NULL"
            f" WHERE id IN ({marks}) AND status IN ('failed', 'ignored', 'cancelled')",
            [now, *ids])
        n = cur.rowcount
        conn.execute(
            f"UPDATE batches SET status = 'running', finished_at = NULL WHERE id IN"
            f" (SELECT batch_id FROM tasks WHERE id IN ({marks})) AND status IN ('done', 'cancelled')",
            ids)
    return n


def finish_batches(db: sqlite_utils.Database, *, now: float,
                   batch_ids: Iterable[str] | None = None) -> list[str]:
    """Mark running batches (of ``batch_ids``, if given) with no active task left as done;
    return their ids. A worker limited to its own batches never finishes (and announces)
    another process's."""
    wanted = tuple(batch_ids) if batch_ids else ()
    only = f" AND b.id IN ({','.join('?' * len(wanted))})" if wanted else ""
    # Concurrent on PostgreSQL: only requeue (exclusive) makes a final task active again, and
    # the status check in the UPDATE (under the batch's row lock) lets one of two finishers
    # announce a batch, never both.
    with transaction(db, concurrent=True) as conn:
        ids = [r[0] for r in conn.execute(
            "SELECT b.id FROM batches b WHERE b.status = 'running' AND NOT EXISTS"
            " (SELECT 1 FROM tasks t WHERE t.batch_id = b.id"
            f"  AND t.status IN ('queued', 'running', 'retrying')){only} ORDER BY b.id",
            list(wanted))]   # one order of row locks for every finisher: no deadlock
        return [bid for bid in ids if conn.execute(
            "UPDATE batches SET status = 'done', finished_at = ? WHERE id = ?"
            " AND status = 'running'", [now, bid]).rowcount == 1]


def has_pending_work(db: sqlite_utils.Database,
                     batch_ids: Iterable[str] | None = None,
                     stages: Iterable[str] | None = None,
                     pipelines: Iterable[str] | None = None) -> bool:
    """True while some task of a queued/running batch (of ``batch_ids``, if given; of
    ``pipelines``, if given; in one of ``stages``, if given) is not final."""
    wanted = tuple(batch_ids) if batch_ids else ()
    only = f" AND b.id IN ({','.join('?' * len(wanted))})" if wanted else ""
    in_stages = tuple(stages) if stages else ()
    if in_stages:
        only += f" AND t.stage IN ({','.join('?' * len(in_stages))})"
    cond, names = _in_pipelines(pipelines, "b.pipeline")
    row = db.execute(
        "SELECT 1 FROM tasks t JOIN batches b ON b.id = t.batch_id"
        " WHERE b.status IN ('queued', 'running') AND t.status IN ('queued', 'running', 'retrying')"
        f"{only}{cond} LIMIT 1", [*wanted, *in_stages, *names]).fetchone()
    return row is not None


def next_due_at(db: sqlite_utils.Database) -> float | None:
    """The earliest ``next_at`` of a waiting task in a runnable batch (None when none)."""
    row = db.execute(
        "SELECT MIN(t.next_at) FROM tasks t JOIN batches b ON b.id = t.batch_id"
        " WHERE b.status IN ('queued', 'running') AND t.status IN ('queued', 'retrying')"
    ).fetchone()
    return row[0] if row and row[0] is not None else None


def record_attempt(db: sqlite_utils.Database, task: dict[str, Any], *, stage: str,
                   started_at: float, ended_at: float, outcome: str,
                   error_class: str | None = None, error_code: str | None = None,
                   error_message: str | None = None, node: str | None = None,
                   execute_id: str | None = None, input_bytes: int | None = None,
                   output_bytes: int | None = None) -> None:
    """One stage attempt. ``input_bytes`` defaults to the size of the stage's stored input: the
    task's params for ``coze``, its stored workflow output for ``synthesis`` (UTF-8 bytes of the
    JSON); ``output_bytes`` is what the caller measured (None: unknown, e.g. a failed call).
    Runs beside other writes, but one attempt at a time (:data:`ATTEMPT_WRITES`). A run's
    success is recorded once: a worker killed between recording it and moving the task on
    leaves it to its successor, which polls the same run and finds it recorded."""
    if input_bytes is None:
        stored = task.get("params") if stage == "coze" else \
            task.get("coze_output") if stage == "synthesis" else None
        input_bytes = _size(stored)
    with transaction(db, concurrent=True, key=ATTEMPT_WRITES) as conn:
        if outcome == "success" and execute_id and conn.execute(
                "SELECT 1 FROM attempts WHERE task_id = ? AND stage = ? AND outcome = 'success'"
                " AND execute_id = ?", [task["id"], stage, execute_id]).fetchone():
            return  # a worker killed after recording this run's success; its successor polled it
        conn.execute(
            "INSERT INTO attempts (task_id, batch_id, stage, started_at, ended_at, outcome,"
            " error_class, error_code, error_message, node, execute_id, input_bytes,"
            " output_bytes) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [task["id"], task["batch_id"], stage, started_at, ended_at, outcome, error_class,
             error_code, error_message, node, execute_id, input_bytes, output_bytes])


def _size(value: Any) -> int | None:
    """UTF-8 bytes of a stored value (JSON for structures); None for no value."""
    if value is None:
        return None
    if not isinstance(value, str):
        value = json.dumps(value, ensure_ascii=False)
    return len(value.encode("utf-8"))


# -- reads and writes used by the bot (the storage seam) ----------------------------------------


def attempts_after_in(conn, last_id: int, *, limit: int) -> list[dict[str, Any]]:
    """Attempts with ``id > last_id`` (each with its task's ``task_key``), oldest first, at most
    ``limit``; on the caller's connection (inside its transaction)."""
    cur = conn.execute(
        "SELECT a.*, t.task_key FROM attempts a LEFT JOIN tasks t ON t.id = a.task_id"
        " WHERE a.id > ? ORDER BY a.id LIMIT ?", [last_id, limit])
    cols = [d[0] for d in cur.description]
    return [dict(zip(cols, r)) for r in cur.fetchall()]


def batch_field(db: sqlite_utils.Database, batch_id: str, column: str) -> Any:
    """One column (``status``, ``source``, ``workflow_id``, ``pipeline``, ``chat_id``) of the
    batch; None when the batch does not exist. Raises ValueError for another column name."""
    if column not in ("status", "source", "workflow_id", "pipeline", "chat_id"):
        raise ValueError(f"not a batch field: {column!r}")
    row = db.execute(f"SELECT {column} FROM batches WHERE id = ?", [batch_id]).fetchone()
    return row[0] if row else None


def batch_exists(db: sqlite_utils.Database, batch_id: str) -> bool:
    """Is there a batch with this id?"""
    return db.execute("SELECT 1 FROM batches WHERE id = ?", [batch_id]).fetchone() is not None


def batch_statuses(db: sqlite_utils.Database, batch_ids: Iterable[str]) -> dict[str, str]:
    """``{batch_id: status}`` of those of ``batch_ids`` that exist."""
    ids = list(batch_ids)
    if not ids:
        return {}
    marks = ",".join("?" * len(ids))
    return dict(db.execute(f"SELECT id, status FROM batches WHERE id IN ({marks})",
                           ids).fetchall())


def batch_ids_with_status(db: sqlite_utils.Database, statuses: Iterable[str],
                          pipelines: Iterable[str] | None = None) -> list[str]:
    """Ids of the batches (of ``pipelines``, if given) whose status is in ``statuses``, oldest
    first."""
    st = list(statuses)
    marks = ",".join("?" * len(st))
    cond, args = _in_pipelines(pipelines)
    return [r[0] for r in db.execute(
        f"SELECT id FROM batches WHERE status IN ({marks}){cond} ORDER BY created_at, id",
        [*st, *args])]


def latest_batch_id_with_status(db: sqlite_utils.Database, status: str,
                                pipelines: Iterable[str] | None = None) -> str | None:
    """The id of the newest batch in ``status`` (of ``pipelines`` when given), or None."""
    cond, args = _in_pipelines(pipelines)
    row = db.execute(f"SELECT id FROM batches WHERE status = ?{cond} ORDER BY created_at DESC,"
                     " rowid DESC LIMIT 1", [status, *args]).fetchone()
    return row[0] if row else None


def latest_batch_from(db: sqlite_utils.Database, source: str) -> dict[str, Any] | None:
    """The newest batch whose ``source`` is ``source`` (e.g. ``canary``), or None."""
    rows = list(db.query("SELECT * FROM batches WHERE source = ?"
                         " ORDER BY created_at DESC, rowid DESC LIMIT 1", [source]))
    return rows[0] if rows else None


def set_progress_message(db: sqlite_utils.Database, batch_id: str, target: str) -> None:
    """Record where the batch's progress card lives, unless it is already recorded."""
    with transaction(db, concurrent=True) as conn:
        conn.execute("UPDATE batches SET progress_message_id = ? WHERE id = ?"
                     " AND progress_message_id IS NULL", [target, batch_id])


def latest_task_by_key(db: sqlite_utils.Database, task_key: str,
                       pipelines: Iterable[str] | None = None) -> dict[str, Any] | None:
    """The newest task with ``task_key`` (of the batches of ``pipelines`` when given), or
    None."""
    cond, args = _in_pipelines(pipelines)
    of = f" AND batch_id IN (SELECT id FROM batches WHERE 1 = 1{cond})" if cond else ""
    rows = list(db.query(f"SELECT * FROM tasks WHERE task_key = ?{of} ORDER BY id DESC LIMIT 1",
                         [task_key, *args]))
    return rows[0] if rows else None


def failed_tasks(db: sqlite_utils.Database, *, batch_id: str | None = None,
                 limit: int, pipelines: Iterable[str] | None = None) -> list[dict[str, Any]]:
    """The latest ``limit`` failed tasks (of ``batch_id`` when given, else of ``pipelines``
    when given), newest finish first."""
    if batch_id is not None:
        return list(db.query("SELECT * FROM tasks WHERE status = 'failed' AND batch_id = ?"
                             " ORDER BY finished_at DESC, id DESC LIMIT ?", [batch_id, limit]))
    cond, args = _in_pipelines(pipelines)
    of = f" AND batch_id IN (SELECT id FROM batches WHERE 1 = 1{cond})" if cond else ""
    return list(db.query(f"SELECT * FROM tasks WHERE status = 'failed'{of}"
                         " ORDER BY finished_at DESC, id DESC LIMIT ?", [*args, limit]))


def active_record_ids(db: sqlite_utils.Database) -> set[str]:
    """Bitable record ids of tasks still queued, running or retrying."""
    return {r[0] for r in db.execute(
        "SELECT record_id FROM tasks WHERE record_id IS NOT NULL"
        " AND status IN ('queued', 'running', 'retrying')")}


def ids_with_status(db: sqlite_utils.Database, task_ids: Iterable[int],
                    statuses: Iterable[str]) -> list[int]:
    """Those of ``task_ids`` whose status is in ``statuses``, in id order."""
    return [r[0] for r in db.execute(
        "SELECT id FROM tasks WHERE id IN (SELECT value FROM json_each(?)) AND status IN"
        " (SELECT value FROM json_each(?)) ORDER BY id",
        [json.dumps(list(task_ids)), json.dumps(list(statuses))])]


def count_with_status(db: sqlite_utils.Database, task_ids: Iterable[int],
                      statuses: Iterable[str], *, negate: bool = False) -> int:
    """How many of ``task_ids`` have a status in ``statuses`` (not in it, with ``negate``)."""
    st = list(statuses)
    marks = ",".join("?" * len(st))
    op = "NOT IN" if negate else "IN"
    return db.execute(
        f"SELECT COUNT(*) FROM tasks WHERE id IN (SELECT value FROM json_each(?))"
        f" AND status {op} ({marks})", [json.dumps(list(task_ids)), *st]).fetchone()[0]


def ignore_failed(db: sqlite_utils.Database, task_ids: Iterable[int]) -> int:
    """Mark those of ``task_ids`` that failed as ``ignored``; returns how many changed."""
    with transaction(db, concurrent=True) as conn:
        return conn.execute(
            "UPDATE tasks SET status = 'ignored' WHERE id IN (SELECT value FROM json_each(?))"
            " AND status = 'failed'", [json.dumps(list(task_ids))]).rowcount


def running_since(db: sqlite_utils.Database, before: float) -> list[tuple]:
    """Running tasks started before ``before``: ``(id, batch_id, task_key, stage, started_at)``
    in id order."""
    return db.execute(
        "SELECT id, batch_id, task_key, stage, started_at FROM tasks WHERE status = 'running'"
        " AND started_at IS NOT NULL AND started_at < ? ORDER BY id",
        [before]).fetchall()


def finished_since(db: sqlite_utils.Database, since: float,
                   pipelines: Iterable[str] | None = None) -> tuple[int, int]:
    """``(finished, failed)``: tasks (of batches of ``pipelines``, if given) that succeeded or
    failed at or after ``since``."""
    cond, args = _in_pipelines(pipelines)
    of = f" AND batch_id IN (SELECT id FROM batches WHERE 1 = 1{cond})" if cond else ""
    n, failed = db.execute(
        "SELECT COUNT(*), COALESCE(SUM(status = 'failed'), 0) FROM tasks WHERE finished_at >= ?"
        f" AND status IN ('succeeded', 'failed'){of}", [since, *args]).fetchone()
    return n, failed


def failures_by_class(db: sqlite_utils.Database, batch_id: str) -> list[tuple[str | None, int]]:
    """``[(error_class, count)]`` of the batch's failed tasks, largest first (class may be
    None)."""
    return [(r[0], r[1]) for r in db.execute(
        "SELECT error_class, COUNT(*) AS n FROM tasks WHERE batch_id = ? AND status = 'failed'"
        " GROUP BY error_class ORDER BY n DESC, error_class", [batch_id])]


def failed_examples(db: sqlite_utils.Database, batch_id: str, error_class: str | None, *,
                    limit: int) -> list[tuple[str, str | None]]:
    """``(task_key, error_message)`` of up to ``limit`` failed tasks of the batch with
    ``error_class`` (None matches a missing class), in id order."""
    return db.execute(
        "SELECT task_key, error_message FROM tasks WHERE batch_id = ? AND status = 'failed'"
        " AND error_class IS ? ORDER BY id LIMIT ?",
        [batch_id, error_class, limit]).fetchall()


def attempt_count(db: sqlite_utils.Database, task_id: int) -> int:
    """How many attempts the task has recorded."""
    return db.execute("SELECT COUNT(*) FROM attempts WHERE task_id = ?",
                      [task_id]).fetchone()[0]


def gate_resubmits(db: sqlite_utils.Database, task_id: int) -> int:
    """Gate resubmits of the task since its last failed or fatal attempt."""
    return db.execute(
        "SELECT COUNT(*) FROM attempts WHERE task_id = ? AND stage = 'gate'"
        " AND outcome = 'resubmit' AND id > COALESCE((SELECT MAX(id) FROM attempts"
        " WHERE task_id = ? AND outcome IN ('fail', 'fatal')), 0)",
        [task_id, task_id]).fetchone()[0]


def running_owners(db: sqlite_utils.Database) -> list[str]:
    """Distinct lease owners of running tasks."""
    return [r[0] for r in db.execute(
        "SELECT DISTINCT lease_owner FROM tasks WHERE status = 'running'"
        " AND lease_owner IS NOT NULL").fetchall()]


def expire_leases_of(db: sqlite_utils.Database, owners: Iterable[str]) -> int:
    """Expire the leases of running tasks held by ``owners`` (the next claim takes them);
    returns how many tasks."""
    dead = list(owners)
    if not dead:
        return 0
    marks = ",".join("?" * len(dead))
    with transaction(db) as conn:
        cur = conn.execute(f"UPDATE tasks SET lease_until = 0 WHERE status = 'running'"
                           f" AND lease_owner IN ({marks})", dead)
        return cur.rowcount


def release_task(db: sqlite_utils.Database, task_id: int, *, owner: str) -> None:
    """Hand a running task held by ``owner`` back to the queue (its execute_id is kept)."""
    with transaction(db, concurrent=True) as conn:
        conn.execute("UPDATE tasks SET status = 'queued', lease_owner = NULL,"
                     " lease_until = NULL WHERE id = ? AND lease_owner = ?"
                     " AND status = 'running'", [task_id, owner])

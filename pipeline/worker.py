"""The worker: claims tasks from the store and runs each through its stages.

One asyncio loop, one coroutine per claimed task. Limits: at most ``max_coze`` tasks in the Coze
stage (submitted or waiting on a run) and ``max_synthesis`` synthesis jobs. A task leaves the Coze
stage, freeing its slot, the moment its run succeeds, and starts synthesis at once. ``max_coze``
is one Coze account's concurrency: a submit is marked only while fewer runs are in flight across
every worker on the store (checked in the marking transaction), else it waits.

Durability rules, in the order things happen for a task:
1. claim with a lease (renewed while the task is worked on);
2. submit, then store ``execute_id`` before anything else: a restarted worker that claims the task
   again finds the id and waits on the same run instead of submitting a new one (a worker whose
   lease ran out meanwhile still stores the id while nobody has submitted since, and the write
   is tried again while the store is locked);
3. wait (adaptive polling; a run that ended is never polled again);
4. write the outcome, with the lease check, so a worker that lost its lease writes nothing.
Coze offers no idempotency key, so two windows for a duplicate submit stay open: a crash between
Coze accepting the run and the store committing its id, and a submit whose request went out but
whose answer was lost (timeout, dropped or reset connection, HTTP 5xx). Each submit is marked
(``submit_started_at``) before it goes out and the mark is cleared only when the id is stored or
the request provably never reached Coze (refused, DNS, connect timeout) or Coze refused it; a
task still marked is submitted again with the doubt recorded first (an ``in_doubt`` attempt),
never silently. Cancellation (block, cancel, shutdown) waits for a submit on the wire.

Store calls that write run on a dedicated thread (:class:`storage.db.StoreThread`) and are
awaited, so a process holding SQLite's write lock (the web process, ``opsbot run``) delays those
writes but never freezes the loop: polls, submits and lease renewals go on. Reads stay on the
loop (WAL readers never wait for a writer). The notifier's hooks are called on the loop; the
service's notifier (:class:`bot.service.NotifierThread`) hands them to a thread of its own.

Many pipelines (:mod:`pipeline.routing`): each batch names its pipeline, which picks the
workflow (and fallback selector) and the Coze account. Every account has its own client (token,
QPS budget), ``max_runs`` limit and breaker (``coze`` for the default account, ``coze:NAME``
otherwise): runs are claimed per account, counted per account across every process, and a fatal
error on one account blocks only the batches of the pipelines on it.

Run times are learned per workflow from Coze's ``create_time`` / ``update_time`` (see
:mod:`pipeline.runtimes`) and kept in the store, so a new worker starts warm.

Failures go through :func:`pipeline.classifier.classify`: retry (inside the call, with backoff),
resubmit (a new run, bounded), fail the task, or fatal: trip the breaker, block every open batch
and wait for a human.
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import sqlite3
from typing import Any, Iterable

import sqlite_utils

from storage import queue
from storage import runtimes as stored_runtimes
from storage import workers as stored_workers
from storage.db import StoreThread

from .breaker import Breaker
from .classifier import Decision, classify
from .clock import Clock
from .config import PipelineConfig
from .errors import CozeError, CozeNetworkError, PipelineError, RunFailed, SynthesisError
from .fallback import WorkflowSelector
from .notify import Notifier, NullNotifier
from .quality import GateFailed, evaluate, urls_to_probe
from .routing import Account, Routing
from .retry import call_with_retry
from .runtimes import KEEP, RunTimeBook, RunTimeModel, run_seconds
from .synthesis import Synthesizer
from .urlprobe import probe_urls
from .workerid import WorkerIdentity, new_identity, process_gone

__all__ = ["Worker", "LeaseLost", "BatchPaused", "RunTimeModel", "make_owner", "STAGES",
           "parse_stages"]

log = logging.getLogger("opsbot.worker")

STAGES = ("coze", "synthesis")


def make_owner() -> str:
    """A unique worker id for this process start (see :mod:`pipeline.workerid`)."""
    return new_identity().id


def parse_stages(text: str) -> frozenset[str]:
    """``"coze,synthesis"`` (commas or spaces; ``all``) -> the stages; ValueError naming an
    unknown one."""
    names = [n for n in text.replace(",", " ").split() if n]
    if not names:
        raise ValueError(f"no stage given (choose from {', '.join(STAGES)} or all)")
    if names == ["all"]:
        return frozenset(STAGES)
    unknown = [n for n in names if n not in STAGES]
    if unknown:
        raise ValueError(f"unknown stage {unknown[0]!r} (choose from {', '.join(STAGES)} or all)")
    return frozenset(names)


class LeaseLost(PipelineError):
    """Another worker took the task over (this one was too slow to renew its lease)."""


class BatchPaused(PipelineError):
    """The task's batch was paused: no new run is submitted for it until it is resumed."""


class CozeSlotsFull(PipelineError):
    """``max_coze`` runs are in flight across every worker on the store: submit later."""


class _Lane:
    """One Coze account at run time: its client, limit, breaker and half-open probe lock."""

    def __init__(self, account: Account, breaker: Breaker) -> None:
        self.account = account
        self.name = account.name
        self.coze = account.coze
        self.max_runs = account.max_runs
        self.pipelines = account.pipelines
        self.breaker = breaker
        self.probe_lock = asyncio.Lock()


class Worker:
    def __init__(self, db: sqlite_utils.Database, config: PipelineConfig, coze: Any,
                 workflow_id: str, *, clock: Clock | None = None,
                 routing: Routing | None = None,
                 synthesizer: Synthesizer | None = None, notifier: Notifier | None = None,
                 owner: str | None = None, batch_ids: tuple[str, ...] | None = None,
                 stages: Iterable[str] | None = None,
                 identity: WorkerIdentity | None = None) -> None:
        """``batch_ids`` limits the worker to those batches (``opsbot run`` works on its own).

        ``stages`` limits the tasks it claims to those stages (default both): a Coze-only worker
        leaves a task whose run succeeded in the queue at stage ``synthesis`` for a worker that
        synthesises. ``identity`` (default: this process, with ``owner`` as its id) is recorded
        in the store with a heartbeat while the worker runs.

        ``routing`` (many pipelines, see :mod:`pipeline.routing`): the accounts and pipelines;
        ``coze`` and ``workflow_id`` are then unused. Without it: ``coze`` is the one account
        (``max_coze``, ``coze_qps``, breaker ``coze``) and ``workflow_id`` the one pipeline."""
        self.db = db
        self.config = config
        if routing is None:
            routing = Routing.single(coze, workflow_id, max_runs=config.max_coze,
                                     qps=config.coze_qps,
                                     fallback_workflow_id=config.fallback_workflow_id)
        self.routing = routing
        self.coze = routing.accounts[0].coze
        self.workflow_id = routing.routes[0].workflow_id
        self.selectors = {r.name: WorkflowSelector(
            r.workflow_id, r.fallback_workflow_id, failure_rate=config.fallback_failure_rate,
            window=config.fallback_window, min_runs=config.fallback_min_runs,
            cooldown=config.fallback_cooldown) for r in routing.routes}
        self.selector = self.selectors[routing.routes[0].name]
        self.clock = clock or Clock()
        self.synth = synthesizer or Synthesizer.from_config(
            config, clock=self.clock, coze_base_url=getattr(self.coze, "base_url", ""))
        self.notifier = notifier or NullNotifier()
        self.identity = identity or new_identity(owner)
        self.owner = self.identity.id
        self.stages = frozenset(stages) if stages is not None else frozenset(STAGES)
        if not self.stages or not self.stages <= set(STAGES):
            raise ValueError(f"stages must be some of {STAGES}, got {sorted(self.stages)}")
        self.lanes = {a.name: _Lane(a, Breaker(db, a.breaker_service, config.breaker,
                                               self.clock.now, on_change=self._breaker_changed))
                      for a in routing.accounts}
        self.breaker = self.lanes[routing.accounts[0].name].breaker  # the first account's
        self._lane_of: dict[int, _Lane] = {}          # Coze-stage task -> its account
        self._batch_pipelines: dict[str, str | None] = {}
        self._inflight: dict[int, asyncio.Task] = {}
        self._batch_of: dict[int, str] = {}
        self._coze_active: set[int] = set()
        self._polling: set[int] = set()     # tasks waiting on a submitted run
        self._synth_active: set[int] = set()
        self.store = StoreThread(db)  # writes: off the loop
        # run times per workflow, loaded from the store the first time a workflow is polled
        self.runtimes = RunTimeBook(
            lambda workflow: stored_runtimes.load(
                self.db, workflow, limit=KEEP,
                since=self.clock.now() - stored_runtimes.MAX_AGE))
        self._submit_sent: dict[int, tuple[str, float]] = {}  # task -> (execute_id, sent at)
        self._wake = asyncio.Event()
        self._synth_claim_at = 0.0    # next look for synthesis-stage tasks (see _claim_and_start)
        self.stats = {"submits": 0, "polls": 0, "claimed": 0}
        self.batch_ids = tuple(batch_ids) if batch_ids else None
        self._finish_at = 0.0
        self._submitting: dict[int, asyncio.Future] = {}
        self._batch_workflows: dict[str, str | None] = {}

    # ---- main loop -------------------------------------------------------------------------

    async def run(self, *, drain: bool = False, stop: asyncio.Event | None = None) -> None:
        """Work until ``stop`` is set (or, with ``drain``, until nothing is left to do)."""
        stop = stop or asyncio.Event()
        me = self.identity
        await self.store(stored_workers.register, id=me.id, hostname=me.hostname, pid=me.pid,
                         pid_ns=me.pid_ns, proc_start=me.proc_start, stages=self.stages,
                         now=self.clock.now())
        await self.store(stored_workers.prune, now=self.clock.now())
        await self.recover_dead_owners()
        renewer = asyncio.create_task(self._renew_loop())
        try:
            while not stop.is_set():
                try:
                    self._enforce_batch_states()
                    await self._claim_and_start()
                    await self._tick_finish()
                    if drain and not self._inflight and await self._nothing_runnable():
                        break
                except sqlite3.OperationalError:  # e.g. a lock held past busy_timeout
                    log.exception("store unavailable; trying again")
                    await asyncio.sleep(1.0)
                    continue
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), self._idle_timeout())
                except asyncio.TimeoutError:
                    pass
        finally:
            renewer.cancel()
            try:
                await self._release_all()
                await self._finish_batches()
                await self.store(stored_workers.stopped, self.owner, now=self.clock.now())
            finally:
                self.store.close()   # waits for the writes still queued

    def _idle_timeout(self) -> float:
        return self.config.idle_interval

    async def _tick_finish(self) -> None:
        """Batches can end without a task ending here (resumed empty, cancelled elsewhere)."""
        now = self.clock.monotonic()
        if now >= self._finish_at:
            self._finish_at = now + 1.0
            await self._finish_batches()

    async def _nothing_runnable(self) -> bool:
        """For --drain: no pending work, or only work a human must unblock (manual breaker).

        A worker without the synthesis stage looks only at Coze-stage work (what is left for
        synthesis waits for a synthesis worker); one with it looks at every stage (Coze-stage
        tasks become synthesis work)."""
        stages = None if "synthesis" in self.stages else tuple(self.stages)
        if not queue.has_pending_work(self.db, batch_ids=self.batch_ids, stages=stages):
            return True
        for lane in self.lanes.values():
            if not queue.has_pending_work(self.db, batch_ids=self.batch_ids, stages=stages,
                                          pipelines=lane.pipelines):
                continue
            if await self._breaker_allows(lane) or lane.breaker.retry_at() is not None:
                return False
            log.warning("the Coze breaker of account %s waits for a human (resume); drain "
                        "leaves its work", lane.name)
        return True

    async def recover_dead_owners(self) -> int:
        """Expire at once the leases of workers known to be gone (after a ``kill -9``).

        Known to be gone: the worker recorded a clean stop, or it ran in this worker's PID
        namespace (same kernel boot, same namespace: see :mod:`pipeline.workerid`) and its
        process is no longer there. Any other worker (another machine or container, or a lease
        owner with no ``workers`` row) is never judged by PID: its tasks come back when their
        leases run out."""
        return await self.store(self._recover_dead_owners)

    def _recover_dead_owners(self, db: sqlite_utils.Database) -> int:
        me = self.identity
        owners = [o for o in queue.running_owners(db) if o != self.owner]
        dead = [o for o, row in stored_workers.get(db, owners).items()
                if row["stopped_at"] is not None
                or (me.pid_ns is not None and row["pid_ns"] == me.pid_ns
                    and process_gone(row["pid"], row["proc_start"]))]
        n = queue.expire_leases_of(db, dead)
        if n:
            log.info("recovered tasks of dead workers", extra={"count": n, "owners": dead})
        return n

    async def _claim_and_start(self) -> None:
        now = self.clock.now()
        free_synth = self.config.max_synthesis - len(self._synth_active)
        claimed = []
        if "synthesis" not in self.stages:
            free_synth = 0
        if free_synth > 0 and now >= self._synth_claim_at:
            claimed += await self.store(queue.claim_tasks, owner=self.owner, now=now,
                                        lease=self.config.lease_seconds, limit=free_synth,
                                        stage="synthesis", batch_ids=self.batch_ids)
            # Tasks reach the queue in the synthesis stage only when a worker stopped or died
            # mid-synthesis, and finding them scans the queued tasks (stage is not indexed):
            # look again at once only while there may be more, else after a second (a worker
            # that only synthesises gets all its work this way: it looks every idle interval).
            self._synth_claim_at = now if len(claimed) == free_synth or "coze" not in self.stages \
                else now + 1.0
        for lane in self.lanes.values() if "coze" in self.stages else ():
            mine = {t for t in self._coze_active if self._lane_of.get(t) is lane}
            free_coze = lane.max_runs - len(mine)
            if free_coze <= 0 or not await self._breaker_allows(lane):
                continue
            st = lane.breaker.state()
            if st.state == "half_open":   # one probe, not a stampede
                busy = mine
                if st.opened_by_submits(lane.breaker.policy.failure_threshold):
                    # only submits can close it: a probe that submitted and now polls is done
                    busy = busy - self._polling
                free_coze = 1 if not busy else 0
            if free_coze:
                got = await self.store(queue.claim_tasks, owner=self.owner, now=now,
                                       lease=self.config.lease_seconds, limit=free_coze,
                                       stage="coze", batch_ids=self.batch_ids,
                                       pipelines=lane.pipelines)
                for task in got:
                    if task["id"] not in self._inflight:
                        self._lane_of[task["id"]] = lane
                claimed += got
        for task in claimed:
            if task["id"] in self._inflight:  # our own, still alive: its lease just ran late
                continue
            self.stats["claimed"] += 1
            if task["stage"] == "coze":
                self._coze_active.add(task["id"])
            else:
                self._synth_active.add(task["id"])
            self._batch_of[task["id"]] = task["batch_id"]
            self._inflight[task["id"]] = asyncio.create_task(self._process(task))

    def _enforce_batch_states(self) -> None:
        """Stop coroutines of batches a human cancelled, or that a fatal error blocked."""
        if not self._inflight:
            return
        ids = sorted(set(self._batch_of.values()))
        states = queue.batch_statuses(self.db, ids)
        for task_id, batch_id in list(self._batch_of.items()):
            state = states.get(batch_id)
            # a block stops Coze work; synthesis needs no Coze and finishes what it started
            if state == "cancelled" or (state == "blocked" and task_id in self._coze_active):
                t = self._inflight.get(task_id)
                if t and not t.done():
                    t.cancel()

    async def _renew_loop(self) -> None:
        interval = max(0.05, self.config.lease_seconds / 3)
        while True:
            await asyncio.sleep(interval)
            ids = list(self._inflight)
            try:
                # "now" is read once the write has the lock, which may be seconds later
                lost = await self.store(queue.renew_leases, ids, owner=self.owner,
                                        now=self.clock.now, lease=self.config.lease_seconds)
                await self.store(stored_workers.heartbeat, self.owner, now=self.clock.now())
            except sqlite3.OperationalError:
                log.exception("lease renewal failed; trying again")
                continue
            for task_id in lost:
                t = self._inflight.get(task_id)
                if t and not t.done():
                    log.warning("lease lost", extra={"task_id": task_id})
                    t.cancel()

    async def _release_all(self) -> None:
        """On shutdown: stop every coroutine and hand its task back (execute_id kept)."""
        tasks = list(self._inflight.values())
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _release(self, task_id: int) -> None:
        await self.store(queue.release_task, task_id, owner=self.owner)

    async def _release_after_crash(self, task_id: int, tries: int = 60,
                                   pause: float = 0.5) -> None:
        for left in range(tries - 1, -1, -1):
            try:
                await self._release(task_id)
                return
            except sqlite3.OperationalError:
                if not left:
                    log.exception("task left running; another worker takes it over once its "
                                  "lease runs out", extra={"task_id": task_id})
                    return
                await asyncio.sleep(pause)

    async def _finish_batches(self) -> None:
        for batch_id in await self.store(queue.finish_batches, now=self.clock.now(),
                                         batch_ids=self.batch_ids):
            self.notifier.batch_finished(batch_id)

    # ---- one task ----------------------------------------------------------------------------

    async def _process(self, task: dict[str, Any]) -> None:
        task_id = task["id"]
        try:
            if task["stage"] == "coze":
                output = await self._gated_coze_stage(task)  # Coze, then the quality gate
                self._coze_active.discard(task_id)
                if output is _STOPPED:
                    return
                if self.config.skip_synthesis:
                    await self._succeed(task, output, synthesis=None)
                    return
                if "synthesis" not in self.stages:
                    # one write: the run's output, and the task back in the queue at stage
                    # synthesis, where a worker that synthesises claims it
                    await self._update(task, stage="synthesis", coze_output=_dump(output),
                                       status="queued", lease_owner=None, lease_until=None,
                                       next_at=self.clock.now())
                    return
                if not await self._update(task, stage="synthesis", coze_output=_dump(output)):
                    return
                self._synth_active.add(task_id)
            else:
                output = _load(task.get("coze_output"))
            await self._synthesis_stage(task, output)
        except asyncio.CancelledError:
            await self._settle_submit(task_id)
            await self._release(task_id)
            raise
        except Exception as exc:  # a bug must not kill the worker or stall other tasks
            log.exception("task crashed", extra={"task_id": task_id})
            try:
                await self._fail(task, None, exc, error_class="internal")
            except Exception:
                # e.g. the store locked past its busy timeout: a task left running under this
                # owner is never claimed again by it (its drain would wait forever), so hand
                # it back (a no-op once it is final)
                log.exception("could not record the task's failure; handing it back",
                              extra={"task_id": task_id})
                await self._release_after_crash(task_id)
        finally:
            if self._inflight.get(task_id) is asyncio.current_task():
                self._coze_active.discard(task_id)
                self._synth_active.discard(task_id)
                self._inflight.pop(task_id, None)
                self._batch_of.pop(task_id, None)
                self._submit_sent.pop(task_id, None)
                self._lane_of.pop(task_id, None)
            try:
                await self._finish_batches()
            except sqlite3.OperationalError:
                log.exception("store unavailable; batches are finished later")
            self._wake.set()

    # ---- quality gate (pipeline.quality) -------------------------------------------------------

    async def _gated_coze_stage(self, task: dict[str, Any]) -> Any:
        """The Coze stage, then the quality gate on its output (no checks configured: no gate).

        A failed check submits a new run (LOW) while the task has gate resubmits left
        (``gate.max_resubmits`` since its last failure); then the task fails (MEDIUM) with the
        check's name and the offending value in its error. Every gate pass is an attempt of
        stage ``gate`` (node = the check's name when it failed).
        """
        gate = self.config.gate
        while True:
            output = await self._coze_stage(task)
            if output is _STOPPED or not gate.checks:
                return output
            started = self.clock.now()
            urls = urls_to_probe(output, gate.checks)
            status = (await probe_urls(urls, timeout=gate.url_timeout, clock=self.clock)
                      if urls else {})
            failure = evaluate(output, gate.checks, status)
            size = _bytes_of(output)
            if failure is None:
                await self.store(queue.record_attempt, task, stage="gate", started_at=started,
                                 ended_at=self.clock.now(), outcome="success",
                                 execute_id=task.get("execute_id"), input_bytes=size,
                                 output_bytes=size)
                return output
            exc = GateFailed(failure)
            resubmit = self._gate_resubmits(task["id"]) < gate.max_resubmits
            decision = Decision("resubmit" if resubmit else "fail", 0.0, "quality",
                                "LOW" if resubmit else "MEDIUM",
                                failure.message + ("; submitting a new run" if resubmit else
                                                   f"; {gate.max_resubmits} new run(s) did not "
                                                   "fix it"))
            await self.store(queue.record_attempt, task, stage="gate", started_at=started,
                             ended_at=self.clock.now(), outcome=decision.action,
                             error_class="quality", error_code=failure.kind,
                             error_message=_msg(exc), node=failure.check,
                             execute_id=task.get("execute_id"), input_bytes=size)
            if not resubmit:
                await self._fail(task, decision, exc, error_class="quality")
                return _STOPPED
            if not await self._update(task, execute_id=None, submitted_at=None,
                                      error_class="quality", error_code=failure.kind,
                                      error_message=_msg(exc)):
                return _STOPPED
            self.notifier.task_retrying(task, decision, exc)

    def _gate_resubmits(self, task_id: int) -> int:
        """Gate resubmits of the task since its last failure (a human retry starts afresh)."""
        return queue.gate_resubmits(self.db, task_id)

    async def _settle_submit(self, task_id: int) -> None:
        """A cancelled task whose submit is on the wire waits for it, so its id gets stored."""
        pending = self._submitting.pop(task_id, None)
        if pending is not None and not pending.done():
            try:
                await asyncio.wait_for(asyncio.shield(pending), 60)
            except BaseException:  # noqa: BLE001 - its outcome is recorded by itself
                pass

    async def _coze_stage(self, task: dict[str, Any]) -> Any:
        params = _load(task["params"]) or {}
        if self.config.task_id_param:
            params = {self.config.task_id_param: task["task_key"], **params}
        if task.get("submit_started_at") and not task.get("execute_id"):
            if not await self._submit_in_doubt(task):
                return _STOPPED
        while True:
            if not task.get("execute_id"):
                started = self.clock.now()
                try:
                    workflow = self._workflow_for_submit(task)
                    await self._call(task, lambda coze: self._shielded_submit(
                        task, workflow, params, coze), kind="submit")
                except LeaseLost:
                    return _STOPPED
                except CozeSlotsFull:   # another process's runs fill the account: wait, not fail
                    await self.clock.sleep(max(0.05, self.config.idle_interval))
                    continue
                except BatchPaused:
                    log.info("batch paused: task handed back before a new submit",
                             extra={"task_id": task["id"], "batch_id": task["batch_id"]})
                    await self._release(task["id"])
                    return _STOPPED
                except Exception as exc:
                    if task.get("submit_started_at") and not task.get("execute_id") \
                            and not await self._submit_in_doubt(task, lost_answer=True):
                        return _STOPPED
                    result = await self._handle_error(task, exc, "coze", started)
                    if isinstance(result, _Resubmit):
                        await self.clock.sleep(result.wait)
                        continue
                    return result
            started = task["submitted_at"] or self.clock.now()
            try:
                status = await self._wait_run(task)
            except Exception as exc:
                error: BaseException = exc
            else:
                self._run_ended(task, status.status == "Success")
                if status.status == "Success":
                    ended = self.clock.now()
                    await self.store(queue.record_attempt, task, stage="coze", started_at=started,
                                     ended_at=ended, outcome="success",
                                     execute_id=task["execute_id"],
                                     output_bytes=_bytes_of(status.output))
                    await self._update(task, coze_seconds=ended - started)
                    return _load(status.output)
                error = status.as_error()
            result = await self._handle_error(task, error, "coze", started)
            if not isinstance(result, _Resubmit):
                return result
            await self.clock.sleep(result.wait)

    def _shielded_submit(self, task: dict[str, Any], workflow: str, params: dict,
                         coze: Any = None) -> Any:
        """One submit attempt whose answer is stored even if the task is cancelled meanwhile.

        Coze creates the run as soon as it accepts the request; cancelling while the answer is
        on its way would lose the ``execute_id`` and the next claim would submit again.
        """
        async def submit_and_store():
            if self._batch_status(task["batch_id"]) == "paused":
                raise BatchPaused(f"batch {task['batch_id']} is paused")
            if task.get("submit_started_at") and not task.get("execute_id"):
                # the last submit failed after its request may have reached Coze
                if not await self._submit_in_doubt(task, lost_answer=True):
                    raise LeaseLost(f"task {task['id']} was taken over")
            # Mark the submit in doubt first: if this process dies before the id is stored, the
            # next worker knows a run may exist that it cannot see (Coze has no idempotency key).
            # The same transaction counts the runs in flight of every process on this store:
            # the account's concurrency is one, whoever submits.
            mark = self.clock.now()
            lane = self._lane(task)
            marked = await self.store(queue.mark_submit, task["id"], owner=self.owner,
                                      now=mark, max_in_flight=lane.max_runs,
                                      pipelines=lane.pipelines)
            if marked == "full":
                raise CozeSlotsFull(f"{lane.max_runs} Coze runs in flight on account "
                                    f"{lane.name}")
            if marked == "adopted":
                # The worker whose lease this task had was still submitting and stored its run id
                # after this claim read the task: wait on that run, never submit a second one.
                # Handed back, the next claim (this worker's too) finds the id and polls it.
                log.info("the previous owner stored a run id meanwhile; handing the task back",
                         extra={"task_id": task["id"]})
                await self._release(task["id"])
                raise LeaseLost(f"task {task['id']} has a run already")
            if marked != "marked":
                log.warning("lease lost; dropping task", extra={"task_id": task["id"]})
                raise LeaseLost(f"task {task['id']} was taken over")
            task["submit_started_at"] = mark
            sent = self.clock.now()
            try:
                sub = await (coze or lane.coze).submit(workflow, params)
            except BaseException as exc:
                # Only a request that never reached Coze leaves no run behind. After a timeout,
                # a dropped or reset connection or a 5xx, Coze may have created the run: the mark
                # stays, and the next submit records the doubt first (see _submit_in_doubt).
                if not _submit_may_have_run(exc):
                    await self._update(task, submit_started_at=None, _final=True)
                raise
            self.stats["submits"] += 1
            fields = dict(execute_id=sub.execute_id, submitted_at=self.clock.now(),
                          debug_url=sub.debug_url, attempts=task["attempts"] + 1,
                          run_workflow_id=workflow)
            stored = await self.store(queue.store_run_id, task["id"], owner=self.owner,
                                      mark=task["submit_started_at"], **fields)
            if stored != "owned":
                # Coze runs it either way: keep its id where the next claim finds it
                log.warning("lease lost after Coze accepted a run; its id was %s", stored,
                            extra={"task_id": task["id"], "execute_id": sub.execute_id})
                raise LeaseLost(f"task {task['id']} was taken over")
            task.update(fields, submit_started_at=None)
            self._submit_sent[task["id"]] = (sub.execute_id, sent)
            return sub

        inner = asyncio.ensure_future(submit_and_store())
        self._submitting[task["id"]] = inner
        inner.add_done_callback(lambda f, tid=task["id"]: self._submitting.pop(tid, None)
                                if self._submitting.get(tid) is f else None)
        return asyncio.shield(inner)

    async def _submit_in_doubt(self, task: dict[str, Any], *, lost_answer: bool = False) -> bool:
        """A submit may have created a run nobody can see: a worker died during it
        (``lost_answer`` False), or its answer was lost after the request went out (timeout,
        dropped connection, 5xx).

        It is submitted again (losing the task would be worse), and the doubt is recorded so the
        report and the task's history show a possible duplicate run. False: the lease was lost.
        """
        now = self.clock.now()
        if lost_answer:
            message = ("the submit's answer was lost after the request went out (timeout, "
                       "dropped connection or server error); Coze may have run this task once more")
            log.warning("a submit's answer was lost; submitting again",
                        extra={"task_id": task["id"], "batch_id": task["batch_id"]})
        else:
            message = ("the worker died between submitting and storing the run id; Coze may "
                       "have run this task once more")
            log.warning("a worker died during this task's submit; submitting again",
                        extra={"task_id": task["id"], "batch_id": task["batch_id"]})
        await self.store(queue.record_attempt, task, stage="coze",
                         started_at=task["submit_started_at"], ended_at=now, outcome="in_doubt",
                         error_class="lost_submit_answer" if lost_answer
                         else "crash_during_submit", error_message=message)
        return await self._update(task, submit_started_at=None)

    def _workflow_for_submit(self, task: dict[str, Any]) -> str:
        """The batch's own workflow when it names another one; else primary or fallback."""
        batch_id = task["batch_id"]
        if batch_id not in self._batch_workflows:
            self._batch_workflows[batch_id] = queue.batch_field(self.db, batch_id, "workflow_id")
        own = self._batch_workflows[batch_id]
        selector = self._selector(task)
        if own and own not in (selector.primary, selector.fallback):
            return own
        workflow, switch = selector.current(self.clock.now())
        if switch is not None:
            self._announce(switch, task)
        return workflow

    def _batch_status(self, batch_id: str) -> str | None:
        return queue.batch_field(self.db, batch_id, "status")

    def _run_ended(self, task: dict[str, Any], ok: bool) -> None:
        selector = self._selector(task)
        workflow = task.get("run_workflow_id") or selector.primary
        switch = selector.record(workflow, ok, self.clock.now())
        if switch is not None:
            self._announce(switch, task)

    def _announce(self, switch: Any, task: dict[str, Any]) -> None:
        pipeline = self.routing.route(self._pipeline_of(task["batch_id"])).name
        switch = dataclasses.replace(switch, pipeline=pipeline)
        log.warning("workflow switch: %s", switch.reason,
                    extra={"to_fallback": switch.to_fallback, "pipeline": pipeline})
        hook = getattr(self.notifier, "workflow_switched", None)
        if hook is not None:
            hook(switch)

    async def _wait_run(self, task: dict[str, Any]) -> Any:
        """Poll until the run ends (see :meth:`_poll_delay`); never poll a run that has ended."""
        execute_id = task["execute_id"]
        submitted = task["submitted_at"] or self.clock.now()
        workflow = task.get("run_workflow_id") or self._selector(task).primary
        self._polling.add(task["id"])
        try:
            return await self._poll_until_ended(task, execute_id, submitted, workflow)
        finally:
            self._polling.discard(task["id"])

    async def _poll_until_ended(self, task: dict[str, Any], execute_id: str, submitted: float,
                                workflow: str) -> Any:
        polls = 0
        running_sent = None            # when the last poll that saw the run Running went out
        while True:
            elapsed = self.clock.now() - submitted
            await self.clock.sleep(self._poll_delay(elapsed, polls, workflow,
                                                    lane=self._lane(task)))
            sent = self.clock.now()
            try:
                status = await self._call(task, lambda coze: coze.poll(workflow, execute_id),
                                          kind="poll")
            except CozeError as exc:
                if not self._keep_waiting(exc, submitted):
                    raise
                continue
            polls += 1
            self.stats["polls"] += 1
            now = self.clock.now()
            if status.status in ("Success", "Fail"):
                if status.status == "Success":
                    self._observe(task, workflow, status, running_sent, now)
                return status
            running_sent = sent
            if now - submitted > self.config.run_timeout:
                raise RunFailed("run_timeout", f"run timed out: still Running after "
                                f"{self.config.run_timeout:.0f}s", debug_url=task.get("debug_url"))

    def _keep_waiting(self, exc: CozeError, submitted: float) -> bool:
        """Should a failed poll leave the run alone and poll again later?

        Yes when Coze is merely unreachable, overloaded or rate limiting (retries exhausted for
        now): the run goes on at Coze and its result must not be thrown away. No for fatal errors
        and for answers about the run itself (e.g. 4314 execution not found), and once the run
        is past ``run_timeout``.
        """
        decision = getattr(exc, "decision", None)
        transient = decision is not None and decision.action in ("retry", "fail") and \
            decision.error_class in ("network", "server", "rate_limited")
        if not transient or self.clock.now() - submitted > self.config.run_timeout:
            return False
        log.warning("Coze unreachable while waiting on a run; waiting on",
                    extra={"error": _msg(exc)})
        return True

    #: Target mean detection delay, as a fraction of the mean run time (adaptive polling).
    poll_target = 0.03
    #: Share of the Coze QPS budget that submits and polls of ``max_coze`` runs may plan to use
    #: (polls get what submits leave: ``max_coze / mean run time`` of them per second).
    poll_qps_share = 0.85
    #: Successful runs needed before polls are placed by the learned run-time model.
    poll_min_samples = 8
    #: The longest wait before a run's first poll, in ``poll.maximum``: a workflow that now fails
    #: early (or was edited to run shorter) is noticed within it, whatever was learned before.
    poll_first_wait_cap = 3.0

    def _poll_delay(self, elapsed: float, polls: int, workflow: str | None = None, *,
                    lane: _Lane | None = None) -> float:
        """Seconds to wait before the next poll of a run submitted ``elapsed`` seconds ago.

        * A pinned policy (``first == maximum`` and ``multiplier == 1``) polls at that fixed
          interval, like the seeds did.
        * Until ``poll_min_samples`` runs have succeeded: geometric, from ``poll.first`` growing
          by ``poll.multiplier`` up to ``poll.maximum``.
        * Then polls follow the run-time distribution of the run's workflow (a lognormal
          fitted to its last 200 successful runs, kept in the store so a new worker starts from
          them; see :class:`~pipeline.runtimes.RunTimeModel`): none while a run is unlikely to
          have ended, dense where runs typically end, sparse in the tail, so that the expected
          delay between a run ending and the worker noticing stays about ``poll_target`` of the
          mean run time, with as few polls as that allows, and within ``poll_qps_share`` of the
          QPS budget together with the submits. Intervals are at least
          ``max(min(poll.first, floor), target * elapsed)`` (``target``: the model's, raised
          when the QPS budget binds; ``floor``: ``target`` of the median run time, so short runs
          are polled a fraction of a second apart and minute-long ones no more often than
          ``poll.first``) and at most ``poll.maximum``, except the waits before the earliest
          likely end, which may last until it but never more than ``poll_first_wait_cap``
          times ``poll.maximum``. Run times older than 14 days are not loaded.
        """
        p = self.config.poll
        if p.multiplier == 1.0 and p.first == p.maximum:
            return p.first
        model = self._run_time_model(workflow or self.workflow_id, lane)
        if model is None:
            return min(p.maximum, p.first * (p.multiplier ** polls))
        floor = max(min(p.first, model.floor), model.target * elapsed)
        cap = max(p.maximum, min(model.early - elapsed, self.poll_first_wait_cap * p.maximum))
        return model.next_delay(elapsed, floor, cap)

    def _observe(self, task: dict[str, Any], workflow: str, status: Any,
                 running_sent: float | None, end_seen: float) -> None:
        """Learn the run time of a run that just succeeded (see :func:`run_seconds`)."""
        sent = self._submit_sent.get(task["id"])
        seconds = run_seconds(
            create_time=getattr(status, "create_time", None),
            update_time=getattr(status, "update_time", None),
            submit_sent=sent[1] if sent and sent[0] == task["execute_id"] else None,
            submit_answered=task["submitted_at"] or end_seen,
            running_sent=running_sent, end_seen=end_seen)
        if seconds is None:   # resumed after a restart, and Coze gave no times: unknown
            return
        self.runtimes.add(workflow, seconds)
        self.store.submit(stored_runtimes.record, workflow, seconds, now=end_seen, keep=KEEP,
                          execute_id=task["execute_id"]).add_done_callback(_warn_failed)

    def _run_time_model(self, workflow: str, lane: _Lane | None = None) -> RunTimeModel | None:
        """The workflow's fitted model (None until ``poll_min_samples`` run times are known),
        planned within the run limit and QPS budget of ``lane``'s account (default: the
        configured ``max_coze`` and ``coze_qps``)."""
        slots = max(1, lane.max_runs if lane is not None else self.config.max_coze)
        budget = self.poll_qps_share * (lane.account.qps if lane is not None
                                        else self.config.coze_qps)

        def polls_per_run_second(mean: float) -> float:
            # what the submits leave of the budget, but never less than a quarter of it
            return max(budget / 4, budget - slots / max(mean, 1e-3)) / slots

        return self.runtimes.model(workflow, target=self.poll_target,
                                   max_poll_rate=polls_per_run_second,
                                   min_samples=self.poll_min_samples)

    async def _call(self, task: dict[str, Any], make_call, *, kind: str) -> Any:
        """One Coze API call of ``kind`` (``submit`` or ``poll``): behind the task's account's
        breaker, retried by the classifier's rules. The breaker counts the two kinds apart."""
        lane = self._lane(task)

        async def attempt():
            try:
                result = await make_call(lane.coze)
            except CozeError as exc:
                if exc.scope == "call" and (isinstance(exc, CozeNetworkError)
                                            or (exc.http_status or 0) >= 500):
                    await self._breaker("record_failure", f"{exc.code}: {exc.message}", kind,
                                        lane=lane)
                raise
            st = lane.breaker.state()
            if st.state != "closed" or (st.submit_failures if kind == "submit" else st.failures):
                await self._breaker("record_success", kind, lane=lane)  # a write only on change
            return result

        async def guarded():
            await self._gate(lane)
            if lane.breaker.state().state != "half_open":
                return await attempt()
            async with lane.probe_lock:  # half-open: one probe at a time, not every waiter
                await self._gate(lane)
                return await attempt()

        def on_retry(decision: Decision, exc: BaseException, attempt: int) -> None:
            # queued on the store thread, in order, not awaited (tenacity's hook is sync)
            now = self.clock.now()
            self.store.submit(queue.record_attempt, task, stage="coze", started_at=now,
                              ended_at=now, outcome="retry", error_class=decision.error_class,
                              error_code=getattr(exc, "code", None), error_message=_msg(exc),
                              execute_id=task.get("execute_id")).add_done_callback(_warn_failed)
            fields = dict(error_class=decision.error_class,
                          error_code=getattr(exc, "code", None), error_message=_msg(exc))
            self.store.submit(queue.update_task, task["id"], owner=self.owner,
                              **fields).add_done_callback(_warn_failed)
            task.update(fields)
            self.notifier.task_retrying(task, decision, exc)

        return await call_with_retry(guarded, rules=self.config.rules, policy=self.config.retry,
                                     clock=self.clock, on_retry=on_retry,
                                     resubmits=task["resubmits"])

    def _lane(self, task: dict[str, Any]) -> _Lane:
        """The Coze account of the task's batch's pipeline."""
        lane = self._lane_of.get(task["id"])
        if lane is None:
            route = self.routing.route(self._pipeline_of(task["batch_id"]))
            lane = self.lanes[route.account]
        return lane

    def _pipeline_of(self, batch_id: str) -> str | None:
        if batch_id not in self._batch_pipelines:
            self._batch_pipelines[batch_id] = queue.batch_field(self.db, batch_id, "pipeline")
        return self._batch_pipelines[batch_id]

    def _selector(self, task: dict[str, Any]) -> WorkflowSelector:
        return self.selectors[self.routing.route(self._pipeline_of(task["batch_id"])).name]

    async def _breaker_allows(self, lane: _Lane | None = None) -> bool:
        """May a Coze call go out now on the account (default: the first one)? Reads on the
        loop; the open -> half_open write (once the open time has passed) goes through the
        store thread."""
        lane = lane or next(iter(self.lanes.values()))
        st = lane.breaker.state()
        if st.state != "open":
            return True
        retry_at = lane.breaker.retry_at()
        if retry_at is None or self.clock.now() < retry_at:
            return False
        return await self._breaker("allow", lane=lane)

    async def _breaker(self, method: str, *args: Any, lane: _Lane | None = None) -> Any:
        """Call a breaker method that may write, on the store thread; report state changes."""
        lane = lane or next(iter(self.lanes.values()))
        changes: list[tuple[Any, Any]] = []

        def call(db: sqlite_utils.Database) -> Any:
            breaker = Breaker(db, lane.breaker.service, lane.breaker.policy, self.clock.now,
                              on_change=lambda before, after: changes.append((before, after)))
            return getattr(breaker, method)(*args)

        result = await self.store(call)
        for before, after in changes:
            self._breaker_changed(before, after)
        return result

    async def _gate(self, lane: _Lane | None = None) -> None:
        """Wait while the account's breaker is open (a manual trip waits for a human)."""
        lane = lane or next(iter(self.lanes.values()))
        while not await self._breaker_allows(lane):
            retry_at = lane.breaker.retry_at()
            wait = 1.0 if retry_at is None else max(0.05, retry_at - self.clock.now())
            await self.clock.sleep(min(wait, 5.0))

    async def _handle_error(self, task: dict[str, Any], exc: BaseException, stage: str,
                            started: float) -> Any:
        """Record the failure and act on the classifier's decision.

        Returns a :class:`_Resubmit` (submit a new run after its wait) or ``_STOPPED``. A run that
        ended in Fail with a ``retry`` decision (e.g. 5000 or a model rate limit inside the run)
        is submitted again after the backoff, bounded by ``retry.max_attempts`` runs.
        """
        decision = getattr(exc, "decision", None)
        if decision is None:
            attempt = max(1, task["attempts"]) if isinstance(exc, RunFailed) else 1
            decision = classify(exc, self.config.rules, attempt=attempt,
                                resubmits=task["resubmits"], elapsed=0.0,
                                policy=self.config.retry)
        now = self.clock.now()
        code = getattr(exc, "code", None)
        await self.store(queue.record_attempt, task, stage=stage, started_at=started, ended_at=now,
                         outcome=decision.action, error_class=decision.error_class,
                         error_code=code, error_message=_msg(exc),
                         node=getattr(exc, "node", None), execute_id=task.get("execute_id"))
        new_run = decision.action == "resubmit" or (
            decision.action == "retry" and isinstance(exc, RunFailed))
        if new_run:
            log.info("submitting a new run", extra={"task_id": task["id"],
                                                    "reason": decision.reason})
            resubmits = task["resubmits"] + (1 if decision.action == "resubmit" else 0)
            if not await self._update(task, execute_id=None, submitted_at=None,
                                      resubmits=resubmits, error_class=decision.error_class,
                                      error_code=code, error_message=_msg(exc)):
                return _STOPPED
            self.notifier.task_retrying(task, decision, exc)
            return _Resubmit(decision.wait if decision.action == "retry" else 0.0)
        if decision.action == "fatal":
            await self._fatal(task, decision, exc)
            return _STOPPED
        await self._fail(task, decision, exc, error_class=decision.error_class)
        return _STOPPED

    async def _fatal(self, task: dict[str, Any], decision: Decision, exc: BaseException) -> None:
        """Stop dispatching on the task's account: trip its breaker, block the open batches of
        its pipelines, hand the task back."""
        reason = f"{decision.error_class}: {_msg(exc)}"
        lane = self._lane(task)
        await self._breaker("trip", reason, lane=lane)
        ended_run = {"execute_id": None, "submitted_at": None} \
            if isinstance(exc, RunFailed) else {}  # never poll an ended run again after resume
        await self._update(task, error_class=decision.error_class,
                           error_code=getattr(exc, "code", None), error_message=_msg(exc),
                           **ended_run)
        await self._release(task["id"])

        async def block_and_tell() -> None:
            blocked = await self.store(queue.block_open_batches, now=self.clock.now(),
                                       reason=reason, pipelines=lane.pipelines)
            for batch_id in blocked:
                self.notifier.batch_blocked(batch_id, decision, exc)

        # Shielded: once the block is written, the main loop may cancel this very task (its
        # batch is blocked now) before the answer is back; the HIGH card must still go out,
        # and a second fatal task finds the batch already blocked and announces nothing.
        await asyncio.shield(asyncio.ensure_future(block_and_tell()))
        self._enforce_batch_states()
        self._wake.set()

    async def _synthesis_stage(self, task: dict[str, Any], coze_output: Any) -> None:
        params = _load(task["params"]) or {}
        for attempt in (1, 2):
            started = self.clock.now()
            try:
                result = await self.synth.run(task["batch_id"], task["task_key"], params,
                                              coze_output)
            except SynthesisError as exc:
                outcome = "retry" if attempt == 1 else "fail"
                await self.store(queue.record_attempt, task, stage="synthesis", started_at=started,
                                 ended_at=self.clock.now(), outcome=outcome,
                                 error_class="synthesis", error_code=exc.code,
                                 error_message=_msg(exc))
                if attempt == 2:
                    self.synth.discard(task["batch_id"], task["task_key"])  # failed for good
                    await self._fail(task, None, exc, error_class="synthesis")
                    return
                continue
            ended = self.clock.now()
            await self.store(queue.record_attempt, task, stage="synthesis", started_at=started,
                             ended_at=ended, outcome="success",
                             output_bytes=_bytes_of(result))
            await self._succeed(task, {"workflow": coze_output, "synthesis": result},
                          synthesis=ended - started)
            return

    # ---- outcomes ------------------------------------------------------------------------------

    async def _succeed(self, task: dict[str, Any], output: Any, *,
                       synthesis: float | None) -> None:
        if await self._update(task, status="succeeded", stage="done", output=_dump(output),
                        finished_at=self.clock.now(), synthesis_seconds=synthesis,
                        error_class=None, error_code=None, error_message=None,
                        lease_owner=None, lease_until=None, _final=True):
            self.notifier.task_finished(task, None, None)
            self.notifier.batch_progress(task["batch_id"])

    async def _fail(self, task: dict[str, Any], decision: Decision | None, exc: BaseException,
                    *, error_class: str) -> None:
        if await self._update(task, status="failed", error_class=error_class,
                        error_code=str(getattr(exc, "code", "") or "") or None,
                        error_message=_msg(exc), error_node=getattr(exc, "node", None),
                        finished_at=self.clock.now(), lease_owner=None, lease_until=None,
                        _final=True):
            self.notifier.task_finished(task, decision, exc)
            self.notifier.batch_progress(task["batch_id"])

    async def _update(self, task: dict[str, Any], _final: bool = False, **fields: Any) -> bool:
        """Write fields while holding the lease; mirror them into ``task``. False: lease lost."""
        ok = await self.store(queue.update_task, task["id"], owner=self.owner, **fields)
        if ok:
            task.update(fields)
        elif not _final:
            log.warning("lease lost; dropping task", extra={"task_id": task["id"]})
        return ok

    def _breaker_changed(self, before, after) -> None:
        log.warning("breaker %s: %s -> %s", after.service, before.state, after.state)
        self.notifier.breaker_changed(after.service, before.state, after.state, after.reason)


def _submit_may_have_run(exc: BaseException) -> bool:
    """Could Coze have created a run for a submit that raised ``exc``?

    No only for a refusal it answered (a 4xx or a Coze error code) and for a request that never
    left this machine (connection refused, DNS, connect timeout).
    """
    if isinstance(exc, CozeNetworkError):
        return exc.sent
    if isinstance(exc, CozeError):
        return (exc.http_status or 0) >= 500 or exc.code == "bad_response"
    return True


class _Marker:
    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


_STOPPED = _Marker("STOPPED")


class _Resubmit:
    """Submit a new run for the task after ``wait`` seconds."""

    def __init__(self, wait: float) -> None:
        self.wait = wait


def _warn_failed(fut: "asyncio.Future") -> None:
    """Done-callback of a store write nobody awaits: say when it failed."""
    if not fut.cancelled() and fut.exception() is not None:
        log.warning("store write failed: %s", fut.exception())


def _load(text: Any) -> Any:
    if text is None or not isinstance(text, str):
        return text
    try:
        return json.loads(text)
    except ValueError:
        return text


def _dump(value: Any) -> str | None:
    return None if value is None else json.dumps(value, ensure_ascii=False)


def _bytes_of(value: Any) -> int | None:
    """Bytes of a stage's output for the per-node log: a rendered video's file size when the
    result names one (``{"video": path}``), else the UTF-8 bytes of the value as JSON."""
    if isinstance(value, dict) and isinstance(value.get("video"), str):
        try:
            return os.path.getsize(value["video"])
        except OSError:
            pass
    if value is None:
        return None
    return len((value if isinstance(value, str) else _dump(value)).encode("utf-8"))


def _msg(exc: BaseException) -> str:
    return str(getattr(exc, "message", None) or exc)[:500]

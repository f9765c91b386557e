"""The worker against the Coze simulator over real HTTP, on a real SQLite file."""
from __future__ import annotations

import asyncio
import dataclasses
import json


from pipeline.breaker import all_states, reset_all
from pipeline.config import PipelineConfig, PollPolicy, RetryPolicy
from pipeline.coze import CozeClient
from pipeline.synthesis import file_name
from pipeline.ratelimit import RateLimiter
from pipeline.standins.simulator import CozeSimulator, Script
from pipeline.worker import Worker
from storage import queue

FAST = PipelineConfig(
    max_coze=4, max_synthesis=2, coze_qps=500, lease_seconds=5, idle_interval=0.02,
    poll=PollPolicy(first=0.02, multiplier=1.5, maximum=0.1),
    retry=RetryPolicy(max_attempts=4, initial=0.01, maximum=0.05, max_total=5),
)


class Recorder:
    """A notifier that records what the worker told it."""

    def __init__(self):
        self.events = []

    def task_retrying(self, task, decision, error):
        self.events.append(("retrying", task["task_key"], decision.action))

    def task_finished(self, task, decision, error):
        self.events.append(("finished", task["task_key"], task["status"]))

    def batch_blocked(self, batch_id, decision, error):
        self.events.append(("blocked", batch_id, decision.error_class))

    def breaker_changed(self, service, before, after, reason):
        self.events.append(("breaker", service, after))

    def batch_progress(self, batch_id):
        pass

    def batch_finished(self, batch_id):
        self.events.append(("batch_done", batch_id))


def run(coro):
    return asyncio.run(coro)


async def _drain(db, sim, config=FAST, notifier=None, tmp_path=None, timeout=30):
    async with CozeClient(sim.base_url, sim.token,
                          limiter=RateLimiter(config.coze_qps, burst=50)) as coze:
        cfg = dataclasses.replace(config, output_dir=str(tmp_path or "var/test-output"))
        worker = Worker(db, cfg, coze, "wf1", notifier=notifier)
        await asyncio.wait_for(worker.run(drain=True), timeout)
        worker.synth.close()
        return worker


def _batch(db, n, prefix="t"):
    return queue.create_batch(db, [{"task_key": f"{prefix}{i}", "params": {"topic": f"x{i}"}}
                                   for i in range(n)], now=0, source="cli")


def test_batch_runs_every_task_once_within_the_concurrency_limit(db, tmp_path):
    async def go():
        sim = CozeSimulator(default_duration=lambda key: 0.05 + (hash(key) % 5) * 0.02)
        await sim.start()
        try:
            batch = _batch(db, 20)
            worker = await _drain(db, sim, tmp_path=tmp_path)
            return sim, batch, worker
        finally:
            await sim.stop()

    sim, batch, worker = run(go())
    counts = queue.batch_counts(db, batch)
    assert counts["succeeded"] == 20 and counts["total"] == 20
    assert sim.peak_in_flight <= 4
    assert all(sim.task(f"t{i}").submits == 1 for i in range(20))
    assert not sim.polls_after_final
    rows = queue.tasks_of(db, batch)
    out = json.loads(rows[0]["output"])
    assert out["synthesis"]["manifest"].endswith(f"{file_name('t0')}.json")
    assert queue.get_batch(db, batch)["status"] == "done"
    # the workflow received the task id and the file's parameters
    assert worker.stats["submits"] == 20


def test_plugin_timeout_fails_fast_is_resubmitted_once_and_never_polled_after_fail(db, tmp_path):
    async def go():
        sim = CozeSimulator(default_duration=0.05)
        sim.script("t0", Script(outcome="Fail", error_code="720701002", duration=0.05,
                                error_message="Access plugin server url timed out", node="tts"))
        await sim.start()
        try:
            batch = _batch(db, 3)
            rec = Recorder()
            await _drain(db, sim, notifier=rec, tmp_path=tmp_path)
            return sim, batch, rec
        finally:
            await sim.stop()

    sim, batch, rec = run(go())
    t0 = queue.find_task(db, "t0")
    assert t0["status"] == "failed"
    assert t0["error_class"] == "plugin_timeout"
    assert t0["error_code"] == "720701002"
    assert t0["resubmits"] == 1
    assert sim.task("t0").submits == 2          # the first run and one resubmit, no more
    # each ended run is polled exactly once (the poll that sees the end), never again
    assert sim.task("t0").late_polls == len(sim.task("t0").runs) == 2
    assert not sim.polls_after_final
    assert queue.batch_counts(db, batch)["succeeded"] == 2   # the others are not stalled
    assert ("finished", "t0", "failed") in rec.events


def test_a_run_that_fails_once_succeeds_on_resubmit(db, tmp_path):
    async def go():
        sim = CozeSimulator(default_duration=0.03)
        sim.script("t0", Script(fail_first_n_runs=1, duration=0.03))
        await sim.start()
        try:
            _batch(db, 1)
            await _drain(db, sim, tmp_path=tmp_path)
            return sim
        finally:
            await sim.stop()

    sim = run(go())
    t0 = queue.find_task(db, "t0")
    assert t0["status"] == "succeeded"
    assert t0["resubmits"] == 1 and sim.task("t0").submits == 2
    outcomes = [r["outcome"] for r in db.query(
        "SELECT outcome FROM attempts WHERE task_id = ? AND stage = 'coze' ORDER BY id",
        [t0["id"]])]
    assert outcomes == ["resubmit", "success"]


def test_rate_limited_submit_is_retried_and_bad_request_is_not(db, tmp_path):
    async def go():
        sim = CozeSimulator(default_duration=0.03)
        sim.script("t0", Script(http_429_first_n=2, retry_after=0.05, duration=0.03))
        sim.script("t1", Script(code_on_submit=4000))
        await sim.start()
        try:
            _batch(db, 2)
            await _drain(db, sim, tmp_path=tmp_path)
            return sim
        finally:
            await sim.stop()

    sim = run(go())
    assert queue.find_task(db, "t0")["status"] == "succeeded"
    assert sim.task("t0").submits == 3
    t1 = queue.find_task(db, "t1")
    assert t1["status"] == "failed" and t1["error_class"] == "bad_request"
    assert sim.task("t1").submits == 1


def test_bad_token_blocks_the_batch_at_once_until_resume(db, tmp_path):
    async def go():
        sim = CozeSimulator(default_duration=0.05)
        sim.set_token_valid(False)
        await sim.start()
        rec = Recorder()
        try:
            batch = _batch(db, 10)
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            await _drain(db, sim, notifier=rec, tmp_path=tmp_path)   # drains: nothing runnable
            took = loop.time() - t0
            blocked = queue.get_batch(db, batch)
            submits_blocked = sum(sim.task(f"t{i}").submits for i in range(10))
            # a human fixes the token and presses Resume
            sim.set_token_valid(True)
            reset_all(db, now=0)
            queue.set_batch_status(db, batch, "running", now=0)
            await _drain(db, sim, notifier=rec, tmp_path=tmp_path)
            return batch, blocked, took, submits_blocked, rec
        finally:
            await sim.stop()

    batch, blocked, took, submits_blocked, rec = run(go())
    assert blocked["status"] == "blocked"
    assert "auth" in blocked["blocked_reason"]
    assert took < 1.0
    assert submits_blocked <= FAST.max_coze       # dispatching stopped at the first answer
    assert [e for e in rec.events if e[0] == "blocked"] == [("blocked", batch, "auth")]
    assert queue.batch_counts(db, batch)["succeeded"] == 10
    assert all(s.state == "closed" for s in all_states(db))


def test_cancel_stops_waiting_and_keeps_finished_work(db, tmp_path):
    async def go():
        sim = CozeSimulator(default_duration=0.05)
        sim.script("t5", Script(duration=30))
        await sim.start()
        try:
            batch = _batch(db, 6)
            async with CozeClient(sim.base_url, sim.token) as coze:
                worker = Worker(db, dataclasses.replace(FAST, output_dir=str(tmp_path)), coze,
                                "wf1")
                task = asyncio.create_task(worker.run(drain=True))
                while queue.batch_counts(db, batch)["succeeded"] < 5:
                    await asyncio.sleep(0.02)
                queue.set_batch_status(db, batch, "cancelled", now=1)
                await asyncio.wait_for(task, 5)
            return batch
        finally:
            await sim.stop()

    batch = run(go())
    counts = queue.batch_counts(db, batch)
    assert counts["succeeded"] == 5 and counts["cancelled"] == 1


def test_synthesis_failure_is_retried_once_then_fails_the_task(db, tmp_path):
    async def go():
        sim = CozeSimulator(default_duration=0.02)
        await sim.start()
        try:
            _batch(db, 2)
            cfg = dataclasses.replace(FAST, synthesis_command="false")
            await _drain(db, sim, config=cfg, tmp_path=tmp_path)
        finally:
            await sim.stop()

    run(go())
    t = queue.find_task(db, "t0")
    assert t["status"] == "failed" and t["error_class"] == "synthesis"
    outcomes = [r["outcome"] for r in db.query(
        "SELECT outcome FROM attempts WHERE task_id = ? AND stage = 'synthesis' ORDER BY id",
        [t["id"]])]
    assert outcomes == ["retry", "fail"]


def test_restarted_worker_waits_on_the_stored_run_instead_of_resubmitting(db, tmp_path):
    """A task whose lease ran out with an execute_id is resumed, not submitted again."""
    async def go():
        sim = CozeSimulator(default_duration=0.2)
        await sim.start()
        try:
            batch = _batch(db, 1)
            async with CozeClient(sim.base_url, sim.token) as coze:
                sub = await coze.submit("wf1", {"task_id": "t0"})
            # as if a worker claimed it, stored the id, and died
            [task] = queue.claim_tasks(db, owner="deadhost:1:x", now=0, lease=1, limit=1)
            queue.update_task(db, task["id"], execute_id=sub.execute_id, submitted_at=0)
            await _drain(db, sim, tmp_path=tmp_path)
            return sim, batch
        finally:
            await sim.stop()

    sim, batch = run(go())
    assert queue.find_task(db, "t0")["status"] == "succeeded"
    assert sim.task("t0").submits == 1


def test_a_run_that_fails_with_a_retryable_code_gets_a_new_run_after_backoff(db, tmp_path):
    """5000 inside the run is transient: a new run, bounded by retry.max_attempts runs."""
    async def go():
        sim = CozeSimulator(default_duration=0.02)
        sim.script("ok_later", Script(fail_first_n_runs=2, error_code="5000",
                                      error_message="internal error", duration=0.02))
        sim.script("never", Script(outcome="Fail", error_code="5000",
                                   error_message="internal error", duration=0.02))
        await sim.start()
        try:
            queue.create_batch(db, [{"task_key": "ok_later"}, {"task_key": "never"}], now=0,
                               source="cli")
            await _drain(db, sim, tmp_path=tmp_path)
            return sim
        finally:
            await sim.stop()

    sim = run(go())
    ok = queue.find_task(db, "ok_later")
    assert ok["status"] == "succeeded" and sim.task("ok_later").submits == 3
    assert ok["resubmits"] == 0  # a retry is not a plugin-timeout resubmit
    never = queue.find_task(db, "never")
    assert never["status"] == "failed" and never["error_class"] == "server"
    assert sim.task("never").submits == FAST.retry.max_attempts


def test_a_run_still_running_past_the_timeout_is_resubmitted_once_then_failed(db, tmp_path):
    async def go():
        sim = CozeSimulator(default_duration=30)
        await sim.start()
        try:
            queue.create_batch(db, [{"task_key": "slow"}], now=0, source="cli")
            await _drain(db, sim, config=dataclasses.replace(FAST, run_timeout=0.2),
                         tmp_path=tmp_path)
            return sim
        finally:
            await sim.stop()

    sim = run(go())
    slow = queue.find_task(db, "slow")
    assert slow["status"] == "failed" and slow["error_code"] == "run_timeout"
    assert slow["resubmits"] == 1 and sim.task("slow").submits == 2

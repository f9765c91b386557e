"""The worker under the failure modes a review found: each once lost or repeated work."""
from __future__ import annotations

import asyncio
import dataclasses
import time

import pytest

from pipeline.breaker import Breaker
from pipeline.coze import CozeClient
from pipeline.standins.simulator import CozeSimulator, Script
from pipeline.synthesis import Synthesizer
from pipeline.worker import Worker
from storage import queue
from tests.test_worker import FAST, _drain


def test_a_run_failing_with_permission_denied_inside_fails_the_task_not_the_batch(db, tmp_path):
    async def go():
        sim = CozeSimulator(default_duration=0.02)
        sim.script("bad", Script(outcome="Fail", error_code="403", duration=0.02,
                                 error_message="plugin call failed: permission denied"))
        await sim.start()
        try:
            batch = queue.create_batch(db, [{"task_key": "bad"}, {"task_key": "ok"}], now=0,
                                       source="cli")
            await _drain(db, sim, tmp_path=tmp_path)
            return sim, batch
        finally:
            await sim.stop()

    sim, batch = asyncio.run(go())
    assert queue.get_batch(db, batch)["status"] == "done"
    assert queue.find_task(db, "bad")["status"] == "failed"
    assert queue.find_task(db, "ok")["status"] == "succeeded"
    assert not sim.polls_after_final


def test_coze_down_while_runs_are_going_keeps_their_results(db, tmp_path):
    """Polls fail for longer than the retry budget; the runs finish at Coze meanwhile."""
    cfg = dataclasses.replace(FAST, retry=dataclasses.replace(FAST.retry, max_attempts=2),
                              breaker=dataclasses.replace(FAST.breaker, open_seconds=0.3))

    async def go():
        sim = CozeSimulator(default_duration=0.3)
        await sim.start()
        try:
            batch = queue.create_batch(db, [{"task_key": f"t{i}"} for i in range(3)], now=0,
                                       source="cli")
            async with CozeClient(sim.base_url, sim.token) as coze:
                worker = Worker(db, dataclasses.replace(cfg, output_dir=str(tmp_path)), coze,
                                "wf")
                job = asyncio.create_task(worker.run(drain=True))
                while sum(sim.task(f"t{i}").submits for i in range(3)) < 3:
                    await asyncio.sleep(0.01)
                sim.set_down(True)
                await asyncio.sleep(1.0)           # far past the runs' end and the retry budget
                sim.set_down(False)
                await asyncio.wait_for(job, 20)
            return sim, batch
        finally:
            await sim.stop()

    sim, batch = asyncio.run(go())
    assert queue.batch_counts(db, batch)["succeeded"] == 3
    assert all(sim.task(f"t{i}").submits == 1 for i in range(3))


def test_cancelling_a_task_while_its_submit_is_on_the_wire_never_submits_twice(db, tmp_path):
    """A batch blocked, cancelled or a shutdown during the submit round trip: the id is kept."""
    async def go():
        sim = CozeSimulator(default_duration=0.2)
        await sim.start()
        try:
            queue.create_batch(db, [{"task_key": "a"}], now=0, source="cli")

            class SlowAnswer(CozeClient):
                async def submit(self, workflow_id, parameters):
                    result = await super().submit(workflow_id, parameters)
                    await asyncio.sleep(0.3)        # Coze accepted; the answer is slow
                    return result

            async with SlowAnswer(sim.base_url, sim.token) as coze:
                worker = Worker(db, dataclasses.replace(FAST, output_dir=str(tmp_path)), coze,
                                "wf")
                stop = asyncio.Event()
                job = asyncio.create_task(worker.run(stop=stop))
                while sim.task("a").submits == 0:
                    await asyncio.sleep(0.01)
                stop.set()                           # shut down mid-submit
                await asyncio.wait_for(job, 5)
            assert queue.find_task(db, "a")["execute_id"]
            await _drain(db, sim, tmp_path=tmp_path)
            return sim
        finally:
            await sim.stop()

    sim = asyncio.run(go())
    assert queue.find_task(db, "a")["status"] == "succeeded"
    assert sim.task("a").submits == 1


def test_a_worker_never_takes_over_its_own_live_task(db):
    queue.create_batch(db, [{"task_key": "a"}], now=0, source="cli")
    [task] = queue.claim_tasks(db, owner="me", now=0, lease=1, limit=1)
    assert queue.claim_tasks(db, owner="me", now=5, lease=1, limit=1) == []   # late renewal
    assert [t["id"] for t in queue.claim_tasks(db, owner="other", now=5, lease=1,
                                               limit=1)] == [task["id"]]


def test_opsbot_run_works_only_on_its_own_batch(db, tmp_path):
    chat = queue.create_batch(db, [{"task_key": "chat0"}], now=0, source="chat")

    async def go():
        sim = CozeSimulator(default_duration=0.02)
        await sim.start()
        try:
            mine = queue.create_batch(db, [{"task_key": "cli0"}], now=0, source="cli")
            async with CozeClient(sim.base_url, sim.token) as coze:
                worker = Worker(db, dataclasses.replace(FAST, output_dir=str(tmp_path)), coze,
                                "wf", batch_ids=(mine,))
                await asyncio.wait_for(worker.run(drain=True), 10)
            return mine
        finally:
            await sim.stop()

    mine = asyncio.run(go())
    assert queue.batch_counts(db, mine)["succeeded"] == 1
    assert queue.find_task(db, "chat0")["status"] == "queued"
    assert queue.get_batch(db, chat)["status"] == "queued"


def test_drain_stops_when_only_a_human_can_unblock_the_breaker(db, tmp_path):
    queue.create_batch(db, [{"task_key": "a"}], now=0, source="chat")   # made after the trip
    Breaker(db, "coze", FAST.breaker, time.time).trip("auth: token invalid")

    async def go():
        sim = CozeSimulator()
        await sim.start()
        try:
            started = time.monotonic()
            await _drain(db, sim, tmp_path=tmp_path, timeout=5)
            return time.monotonic() - started, sim
        finally:
            await sim.stop()

    took, sim = asyncio.run(go())
    assert took < 2 and sim.total_requests == 0
    assert queue.find_task(db, "a")["status"] == "queued"


def test_half_open_lets_one_probe_through_then_closes(db, tmp_path):
    cfg = dataclasses.replace(FAST, breaker=dataclasses.replace(FAST.breaker, open_seconds=0.2))
    br = Breaker(db, "coze", cfg.breaker, time.time)
    for _ in range(FAST.breaker.failure_threshold):
        br.record_failure("500")
    assert br.state().state == "open"

    async def go():
        sim = CozeSimulator(default_duration=0.05)
        await sim.start()
        try:
            queue.create_batch(db, [{"task_key": f"t{i}"} for i in range(8)], now=0,
                               source="cli")
            await _drain(db, sim, config=cfg, tmp_path=tmp_path)
            return sim
        finally:
            await sim.stop()

    sim = asyncio.run(go())
    assert br.state().state == "closed"
    assert all(sim.task(f"t{i}").submits == 1 for i in range(8))
    # half-open: one probe claimed and sent alone; the other 7 were claimed only after the
    # breaker closed (3 successes: the probe's submit and its polls)
    first_submits = sorted(r.time for r in sim.requests if r.path == "/v1/workflow/run")
    answers_before_second = [r for r in sim.requests if r.time < first_submits[1]]
    assert len(answers_before_second) >= 3


def test_a_hung_synthesis_job_is_killed_and_the_pool_keeps_working(tmp_path):
    async def go():
        synth = Synthesizer("tests.synth_jobs:slow_or_fast", workers=1,
                            output_dir=tmp_path, timeout=0.5)
        try:
            results = []
            for key in ("slow", "fast1", "crash", "fast2"):
                try:
                    results.append(await synth.run("b", key, {}, {"x": 1}))
                except Exception as exc:  # noqa: BLE001
                    results.append(getattr(exc, "code", type(exc).__name__))
            return results
        finally:
            synth.close()

    results = asyncio.run(go())
    assert results[0] == "timeout" and results[2] == "crashed"
    assert results[1] == {"ok": "fast1"} and results[3] == {"ok": "fast2"}


def test_a_submit_cut_short_by_a_crash_is_made_again_and_the_doubt_recorded(db, tmp_path):
    queue.create_batch(db, [{"task_key": "a"}], now=0, source="cli")
    # as a worker that died after marking its submit and before storing the run id
    [task] = queue.claim_tasks(db, owner="deadhost:1:x", now=0, lease=0.01, limit=1)
    queue.update_task(db, task["id"], submit_started_at=0.5)

    async def go():
        sim = CozeSimulator(default_duration=0.02)
        await sim.start()
        try:
            await _drain(db, sim, tmp_path=tmp_path)
            return sim
        finally:
            await sim.stop()

    sim = asyncio.run(go())
    row = queue.find_task(db, "a")
    assert row["status"] == "succeeded" and row["submit_started_at"] is None
    outcomes = [r[0] for r in db.execute(
        "SELECT outcome FROM attempts WHERE task_id = ? ORDER BY id", [row["id"]])]
    assert outcomes[0] == "in_doubt" and outcomes[-1] == "success"
    assert sim.task("a").submits == 1


def test_a_submit_whose_answer_is_lost_records_the_doubt_before_submitting_again(db, tmp_path):
    """Coze creates the run, then the connection drops before the answer: the worker cannot
    know the run exists, so the next submit is preceded by an ``in_doubt`` attempt."""
    queue.create_batch(db, [{"task_key": "a"}], now=0, source="cli")

    async def go():
        sim = CozeSimulator(default_duration=0.02)
        sim.script("a", Script(drop_answer_first_n=1, duration=0.02))
        await sim.start()
        try:
            await _drain(db, sim, tmp_path=tmp_path)
            return sim
        finally:
            await sim.stop()

    sim = asyncio.run(go())
    row = queue.find_task(db, "a")
    assert row["status"] == "succeeded" and row["submit_started_at"] is None
    assert len(sim.task("a").runs) == 2          # the lost run went on at Coze
    outcomes = [r[0] for r in db.execute(
        "SELECT outcome FROM attempts WHERE task_id = ? AND stage = 'coze' ORDER BY id",
        [row["id"]])]
    assert outcomes.count("in_doubt") == 1 and outcomes.count("success") == 1, outcomes
    assert outcomes.index("in_doubt") < outcomes.index("success")
    assert row["execute_id"] == sim.task("a").runs[1]


def test_a_refused_connection_is_retried_without_doubt(db, tmp_path):
    """Nothing listens: the request never left, so no ``in_doubt`` attempt is recorded."""
    import socket

    from pipeline.errors import CozeNetworkError
    cfg = dataclasses.replace(FAST, retry=dataclasses.replace(FAST.retry, max_attempts=2),
                              output_dir=str(tmp_path))
    queue.create_batch(db, [{"task_key": "a"}], now=0, source="cli")
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()

    async def go():
        async with CozeClient(f"http://127.0.0.1:{port}", "tok") as coze:
            try:
                await coze.submit("wf", {})
            except CozeNetworkError as exc:
                assert exc.sent is False
            await Worker(db, cfg, coze, "wf").run(drain=True)

    asyncio.run(go())
    row = queue.find_task(db, "a")
    assert row["status"] == "failed" and row["submit_started_at"] is None
    assert not db.execute("SELECT 1 FROM attempts WHERE outcome = 'in_doubt'").fetchall()


def test_opsbot_run_never_finishes_the_service_workers_batch(db, tmp_path):
    """The service's batch has just had its last task end; before its own worker finishes it
    (and announces it), an ``opsbot run`` on its own batch must leave it alone."""
    from pipeline.notify import NullNotifier
    svc = queue.create_batch(db, [{"task_key": "svc0"}], now=0, source="chat")
    [t] = queue.claim_tasks(db, owner="svc", now=0, lease=60, limit=1)
    db.execute("UPDATE batches SET status = 'running' WHERE id = ?", [svc])
    db.execute("UPDATE tasks SET status = 'succeeded' WHERE id = ?", [t["id"]])
    db.conn.commit()
    finished = []

    class Recording(NullNotifier):
        def batch_finished(self, batch_id):
            finished.append(batch_id)

    async def go():
        sim = CozeSimulator(default_duration=0.02)
        await sim.start()
        try:
            mine = queue.create_batch(db, [{"task_key": "cli0"}], now=0, source="cli")
            async with CozeClient(sim.base_url, sim.token) as coze:
                worker = Worker(db, dataclasses.replace(FAST, output_dir=str(tmp_path)), coze,
                                "wf", batch_ids=(mine,), notifier=Recording())
                await asyncio.wait_for(worker.run(drain=True), 10)
            return mine
        finally:
            await sim.stop()

    mine = asyncio.run(go())
    assert queue.get_batch(db, mine)["status"] == "done" and finished == [mine]
    assert queue.get_batch(db, svc)["status"] == "running"
    assert queue.finish_batches(db, now=9, batch_ids=(mine,)) == []
    assert queue.finish_batches(db, now=9) == [svc]


def test_a_run_accepted_after_the_lease_was_lost_keeps_its_id(db, tmp_path):
    """The lease is taken while the submit is on the wire: the id is still stored (adopted), so
    the next claim waits on that run instead of submitting a second one."""
    queue.create_batch(db, [{"task_key": "a"}], now=0, source="cli")

    async def go():
        sim = CozeSimulator(default_duration=0.05)
        sim.script("a", Script(submit_delay=0.5, duration=0.05))
        await sim.start()
        try:
            async with CozeClient(sim.base_url, sim.token) as coze:
                worker = Worker(db, dataclasses.replace(FAST, output_dir=str(tmp_path)), coze,
                                "wf")
                job = asyncio.create_task(worker.run(drain=True))
                while not sim.task("a").runs:
                    await asyncio.sleep(0.01)
                # as another worker that took the lease over, then died before looking at it
                db.execute("UPDATE tasks SET lease_owner = 'otherhost:1:x', lease_until = ?",
                           [time.time() + 1.0])
                db.conn.commit()
                await asyncio.wait_for(job, 15)
            return sim
        finally:
            await sim.stop()

    sim = asyncio.run(go())
    row = queue.find_task(db, "a")
    assert row["status"] == "succeeded"
    assert sim.task("a").submits == 1 and row["execute_id"] == sim.task("a").runs[0]
    assert not db.execute("SELECT 1 FROM attempts WHERE outcome = 'in_doubt'").fetchall()


def test_store_run_id_owned_adopted_lost_and_waits_out_a_lock(db, db_path):
    import threading

    from storage.db import open_db, transaction
    queue.create_batch(db, [{"task_key": "a"}, {"task_key": "b"}], now=0, source="cli")
    a, b = queue.claim_tasks(db, owner="w1", now=0, lease=1, limit=2)
    for t in (a, b):
        queue.update_task(db, t["id"], owner="w1", submit_started_at=0.25)
    assert queue.store_run_id(db, a["id"], owner="w1", mark=0.25, execute_id="e1") == "owned"
    # b's lease was taken over: adopted while nobody submitted since, else lost
    queue.update_task(db, b["id"], lease_owner="w2")
    assert queue.store_run_id(db, b["id"], owner="w1", mark=0.5, execute_id="x") == "lost"
    assert queue.store_run_id(db, b["id"], owner="w1", mark=0.25, execute_id="e2") == "adopted"
    row = queue.find_task(db, "b")
    assert (row["execute_id"], row["submit_started_at"], row["lease_owner"]) == ("e2", None, "w2")
    assert queue.store_run_id(db, b["id"], owner="w1", mark=0.25, execute_id="e3") == "lost"
    # a write lock held past the busy timeout: tried again until it lands
    queue.update_task(db, a["id"], execute_id=None, submit_started_at=0.75)
    short = open_db(db_path, migrate=False)
    short.conn.execute("PRAGMA busy_timeout = 20")
    held, done = threading.Event(), threading.Event()

    def hold():
        other = open_db(db_path, migrate=False)
        with transaction(other):
            held.set()
            done.wait(0.4)
        other.conn.close()

    holder = threading.Thread(target=hold)
    holder.start()
    held.wait(5)
    try:
        import sqlite3
        with pytest.raises(sqlite3.OperationalError):
            queue.store_run_id(short, a["id"], owner="w1", mark=0.75, execute_id="e4", tries=1)
        assert queue.store_run_id(short, a["id"], owner="w1", mark=0.75, execute_id="e4",
                                  pause=0.05) == "owned"
    finally:
        done.set()
        holder.join()
        short.conn.close()
    assert queue.find_task(db, "a")["execute_id"] == "e4"


def test_a_task_whose_failure_cannot_be_written_is_handed_back_not_left_hanging(db, db_path,
                                                                                tmp_path):
    """The store is locked past its busy timeout when the run fails: recording the failure
    raises. The task is handed back, so this worker's drain claims it again and ends."""
    import threading

    from storage.db import open_db, transaction
    queue.create_batch(db, [{"task_key": "a"}], now=0, source="cli")
    held, done = threading.Event(), threading.Event()

    def hold():
        other = open_db(db_path, migrate=False)
        with transaction(other):
            held.set()
            done.wait(1.5)
        other.conn.close()

    async def go():
        sim = CozeSimulator(default_duration=0.3)
        sim.script("a", Script(outcome="Fail", error_code="4000", duration=0.3,
                               error_message="invalid parameter"))
        await sim.start()
        holder = threading.Thread(target=hold)
        try:
            async with CozeClient(sim.base_url, sim.token) as coze:
                worker = Worker(db, dataclasses.replace(FAST, output_dir=str(tmp_path)), coze,
                                "wf")
                await worker.store(lambda d: d.execute("PRAGMA busy_timeout = 20"))
                job = asyncio.create_task(worker.run(drain=True))
                while not queue.find_task(db, "a")["execute_id"]:
                    await asyncio.sleep(0.01)
                holder.start()
                held.wait(5)
                await asyncio.wait_for(job, 15)
            return sim
        finally:
            done.set()
            if holder.is_alive():
                holder.join()
            await sim.stop()

    sim = asyncio.run(go())
    row = queue.find_task(db, "a")
    assert row["status"] == "failed" and row["error_code"] == "4000"
    assert sim.task("a").submits == 1

"""Failures that once reached further than they should: the breaker blind to failing submits,
a paused batch still resubmitting."""
from __future__ import annotations

import asyncio
import dataclasses

from pipeline.breaker import Breaker
from pipeline.config import BreakerPolicy, PollPolicy
from pipeline.coze import CozeClient
from pipeline.standins.simulator import CozeSimulator, Script
from pipeline.worker import Worker
from storage import queue
from tests.test_worker import FAST, Recorder


def test_breaker_counts_submit_failures_apart_from_poll_successes(db):
    now = [0.0]
    br = Breaker(db, "coze", BreakerPolicy(3, 60, 2), lambda: now[0])
    for _ in range(2):
        br.record_failure("500", kind="submit")
        br.record_success(kind="poll")       # polls of running runs keep answering
    assert br.state().state == "closed" and br.state().submit_failures == 2
    br.record_failure("500", kind="submit")
    assert br.state().state == "open"
    now[0] = 60
    assert br.allow() and br.state().state == "half_open"
    br.record_success(kind="poll")
    br.record_success(kind="poll")
    assert br.state().state == "half_open"   # polls say nothing about the submits
    br.record_success(kind="submit")
    br.record_success(kind="submit")
    assert br.state().state == "closed" and br.state().submit_failures == 0
    # and the other way round: a submit success does not clear failing polls
    for _ in range(2):
        br.record_failure("network", kind="poll")
        br.record_success(kind="submit")
    br.record_failure("network", kind="poll")
    assert br.state().state == "open"


def test_submits_failing_while_polls_succeed_open_the_breaker(db, tmp_path):
    """Runs already going are polled fine; every new submit answers 500. Before, each poll's
    success reset the count and the breaker never opened."""
    cfg = dataclasses.replace(FAST, output_dir=str(tmp_path), skip_synthesis=True,
                              poll=PollPolicy(first=0.005, multiplier=1.0, maximum=0.005))

    async def go():
        sim = CozeSimulator(default_duration=3.0)
        for key in ("bad0", "bad1", "bad2"):
            sim.script(key, Script(http_500_first_n=1000))
        await sim.start()
        rec = Recorder()
        try:
            queue.create_batch(db, [{"task_key": "long0"}, {"task_key": "long1"}], now=0,
                               source="cli")
            async with CozeClient(sim.base_url, sim.token) as coze:
                worker = Worker(db, cfg, coze, "wf1", notifier=rec)
                stop = asyncio.Event()
                job = asyncio.create_task(worker.run(stop=stop))
                while sum(sim.task(k).polls for k in ("long0", "long1")) < 4:
                    await asyncio.sleep(0.01)
                queue.create_batch(db, [{"task_key": k} for k in ("bad0", "bad1", "bad2")],
                                   now=0, source="cli")
                before = sum(sim.task(k).polls for k in ("long0", "long1"))
                for _ in range(300):
                    if ("breaker", "coze", "open") in rec.events:
                        break
                    await asyncio.sleep(0.01)
                polls = sum(sim.task(k).polls for k in ("long0", "long1"))
                stop.set()
                await asyncio.wait_for(job, 10)
            return rec, before, polls, sim
        finally:
            await sim.stop()

    rec, before, polls, sim = asyncio.run(go())
    assert ("breaker", "coze", "open") in rec.events
    # polls kept succeeding while the submits failed (their successes used to reset the count);
    # how many depends on the machine's load, not on the code under test
    assert polls > before >= 4
    assert sum(sim.task(k).submits for k in ("bad0", "bad1", "bad2")) >= \
        FAST.breaker.failure_threshold


def test_pausing_a_batch_stops_the_resubmit_of_a_run_in_flight(db, tmp_path):
    """The run in flight ends in a plugin timeout while the batch is paused: no new run until
    the batch is resumed, then exactly one."""
    cfg = dataclasses.replace(FAST, output_dir=str(tmp_path), skip_synthesis=True)

    async def go():
        sim = CozeSimulator(default_duration=0.02)
        sim.script("t0", Script(fail_first_n_runs=1, duration=0.4))
        await sim.start()
        try:
            batch = queue.create_batch(db, [{"task_key": "t0"}], now=0, source="cli")
            async with CozeClient(sim.base_url, sim.token) as coze:
                worker = Worker(db, cfg, coze, "wf1")
                stop = asyncio.Event()
                job = asyncio.create_task(worker.run(stop=stop))
                while sim.task("t0").submits < 1:
                    await asyncio.sleep(0.01)
                queue.set_batch_status(db, batch, "paused", now=1)
                while sim.task("t0").late_polls < 1:      # the worker saw the run Fail
                    await asyncio.sleep(0.01)
                await asyncio.sleep(0.3)
                paused = (sim.task("t0").submits, queue.find_task(db, "t0")["status"])
                queue.set_batch_status(db, batch, "running", now=2)
                while queue.find_task(db, "t0")["status"] != "succeeded":
                    await asyncio.sleep(0.01)
                stop.set()
                await asyncio.wait_for(job, 10)
            return paused, sim
        finally:
            await sim.stop()

    (submits_while_paused, status_while_paused), sim = asyncio.run(go())
    assert submits_while_paused == 1
    assert status_while_paused == "queued"          # handed back, not held by the worker
    assert sim.task("t0").submits == 2
    row = queue.find_task(db, "t0")
    assert row["resubmits"] == 1


def test_a_breaker_opened_by_submits_is_probed_by_submits(db, tmp_path):
    """Half-open after failing submits: polls cannot close it, so the next probe is the next
    submit, sent while the previous probe's run is still going, not after it ends."""
    import time

    cfg = dataclasses.replace(FAST, output_dir=str(tmp_path), skip_synthesis=True,
                              breaker=BreakerPolicy(failure_threshold=3, open_seconds=0.1,
                                                    success_threshold=3))
    br = Breaker(db, "coze", cfg.breaker, time.time)
    for _ in range(3):
        br.record_failure("500", kind="submit")
    assert br.state().state == "open"

    async def go():
        sim = CozeSimulator(default_duration=1.0)
        await sim.start()
        try:
            queue.create_batch(db, [{"task_key": f"t{i}"} for i in range(6)], now=0,
                               source="cli")
            async with CozeClient(sim.base_url, sim.token) as coze:
                worker = Worker(db, cfg, coze, "wf1")
                await asyncio.wait_for(worker.run(drain=True), 20)
            return sim
        finally:
            await sim.stop()

    sim = asyncio.run(go())
    assert br.state().state == "closed"
    submits = sorted(r.time for r in sim.requests if r.path == "/v1/workflow/run")
    assert len(submits) == 6
    assert submits[2] - submits[0] < 0.9     # three probes before the first run ended


def test_a_stale_breaker_success_never_closes_a_manual_trip_made_meanwhile(db, db_path):
    """Two processes share the breaker row. B's success lands while A (a fatal error) trips
    the breaker: B must decide on the state A committed, not on what it read before."""
    import threading
    import time as _time

    from storage.db import open_db
    policy = BreakerPolicy(failure_threshold=1, success_threshold=1, open_seconds=0.0)
    a = Breaker(db, "coze", policy, lambda: 10.0)
    a.record_failure("HTTP 500")
    assert a.allow() and a.state().state == "half_open"
    other = open_db(db_path, migrate=False)
    b = Breaker(other, "coze", policy, lambda: 11.0)
    # A trips inside its own write transaction; B's success comes while it is open
    db.conn.execute("BEGIN IMMEDIATE")
    db.conn.execute("UPDATE breakers SET state = 'open', opened_at = 10.5,"
                    " reason = 'manual: auth: token invalid' WHERE service = 'coze'")
    done = threading.Thread(target=b.record_success, kwargs={"kind": "poll"})
    done.start()
    _time.sleep(0.3)          # B has read the row (half_open) and waits for the write lock
    db.conn.execute("COMMIT")
    done.join(10)
    st = a.state()
    assert (st.state, st.reason) == ("open", "manual: auth: token invalid")
    assert not a.allow() and a.retry_at() is None
    # and a stale failure does not turn the manual trip into an automatic one
    b.record_failure("HTTP 500")
    assert a.state().reason == "manual: auth: token invalid"
    other.conn.close()


def test_two_workers_on_one_store_share_the_accounts_coze_concurrency(db, db_path, tmp_path):
    """The service worker and ``opsbot run`` each allow ``max_coze`` runs; together they must
    not exceed it (one Coze account). Every task still runs once and succeeds."""
    from storage.db import open_db
    cfg = dataclasses.replace(FAST, max_coze=2, output_dir=str(tmp_path), skip_synthesis=True)
    batch = queue.create_batch(db, [{"task_key": f"t{i}"} for i in range(10)], now=0,
                               source="cli")
    other = open_db(db_path, migrate=False)

    async def go():
        sim = CozeSimulator(default_duration=0.15)
        await sim.start()
        try:
            async with CozeClient(sim.base_url, sim.token) as coze:
                workers = [Worker(db, cfg, coze, "wf"), Worker(other, cfg, coze, "wf")]
                await asyncio.wait_for(asyncio.gather(*(w.run(drain=True) for w in workers)),
                                       30)
            return sim, workers
        finally:
            await sim.stop()

    sim, workers = asyncio.run(go())
    other.conn.close()
    assert queue.batch_counts(db, batch)["succeeded"] == 10
    assert all(sim.task(f"t{i}").submits == 1 for i in range(10))
    assert all(w.stats["submits"] for w in workers)     # both took part
    assert sim.peak_in_flight <= 2, sim.peak_in_flight

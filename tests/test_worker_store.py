"""Another process holding the store's write lock must not freeze the worker's event loop.

A second process takes the write lock (``transaction(db)``: SQLite's ``BEGIN IMMEDIATE``, the
PostgreSQL backend's advisory write lock) for 5 s while the worker has runs in
flight, submits to make and leases to renew. The loop's lag is measured by a periodic task;
the leases must survive (no task lost, none submitted twice).
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import sys
import textwrap

import pytest

from pipeline.config import PollPolicy
from pipeline.coze import CozeClient
from pipeline.standins.simulator import CozeSimulator
from pipeline.worker import Worker
from storage import queue
from tests.test_worker import FAST

pytestmark = pytest.mark.slow

# Started ahead (its imports and connection take a moment), it takes the lock when told to.
HOLDER = textwrap.dedent("""
    import sys, time
    from storage.db import open_db, transaction
    db = open_db(sys.argv[1], migrate=False)
    print("ready", flush=True)
    sys.stdin.readline()
    with transaction(db):
        db.execute("INSERT INTO kv (key, value, updated_at) VALUES ('holder', 'x', 0)")
        print("locked", flush=True)
        time.sleep(float(sys.argv[2]))
    print("released", flush=True)
""")


async def _start_holder(db_path, seconds):
    holder = await asyncio.create_subprocess_exec(
        sys.executable, "-c", HOLDER, str(db_path), str(seconds),
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
    assert (await holder.stdout.readline()).strip() == b"ready"
    return holder


async def _lock(holder):
    holder.stdin.write(b"lock\n")
    await holder.stdin.drain()
    assert (await holder.stdout.readline()).strip() == b"locked"


def test_a_write_lock_held_elsewhere_for_5s_does_not_stall_the_loop(db, db_path, tmp_path,
                                                                    caplog):
    cfg = dataclasses.replace(FAST, output_dir=str(tmp_path), skip_synthesis=True,
                              lease_seconds=3.0, max_coze=4,
                              poll=PollPolicy(first=0.05, multiplier=1.0, maximum=0.05))

    async def go():
        sim = CozeSimulator(default_duration=lambda key: 0.5 if key.startswith("q") else 2.5)
        await sim.start()
        loop = asyncio.get_running_loop()
        lags: list[tuple[float, float]] = []

        async def probe():
            while True:
                before = loop.time()
                await asyncio.sleep(0.01)
                lags.append((before, loop.time() - before - 0.01))

        try:
            batch = queue.create_batch(
                db, [{"task_key": f"q{i}"} for i in range(6)]
                + [{"task_key": f"s{i}"} for i in range(2)], now=0, source="cli")
            holder = await _start_holder(db_path, 5)
            async with CozeClient(sim.base_url, sim.token) as coze:
                worker = Worker(db, cfg, coze, "wf1")
                job = asyncio.create_task(worker.run(drain=True))
                # the long runs' ids are stored (a run is polled only once its id is: a submit
                # answered while the lock is held waits for it, on either backend)
                while not all(queue.find_task(db, k)["execute_id"] for k in ("s0", "s1")):
                    await asyncio.sleep(0.01)
                await _lock(holder)
                locked_at = loop.time()
                prober = asyncio.create_task(probe())
                polls_before = sim.total_requests
                assert (await holder.stdout.readline()).strip() == b"released"
                released_at = loop.time()
                polls_during = sim.total_requests - polls_before
                prober.cancel()
                await holder.wait()
                await asyncio.wait_for(job, 30)
            return batch, sim, lags, locked_at, released_at, polls_during
        finally:
            await sim.stop()

    with caplog.at_level(logging.WARNING, logger="opsbot.worker"):
        batch, sim, lags, locked_at, released_at, polls_during = asyncio.run(go())
    assert released_at - locked_at > 4.5
    during = [lag for at, lag in lags if locked_at <= at <= released_at]
    assert max(during) < 0.1, f"loop stalled {max(during):.3f}s"
    assert len(during) > 100                       # the probe kept running all along
    assert polls_during > 20                       # runs were polled while the lock was held
    assert queue.batch_counts(db, batch)["succeeded"] == 8
    assert all(sim.task(k).submits == 1 for k in [f"q{i}" for i in range(6)] + ["s0", "s1"])
    assert not [r for r in caplog.records if "lease lost" in r.getMessage()]


def test_store_thread_keeps_order_and_finishes_writes_of_cancelled_callers(db):
    import threading

    from storage import pg
    from storage.db import StoreThread, path_of, transaction

    def put(conn_db, key, seen):
        seen.append((key, threading.get_ident(), conn_db.conn is db.conn))
        with transaction(conn_db):
            conn_db.execute("INSERT INTO kv (key, value, updated_at) VALUES (?, 'v', 0)", [key])
        return key

    async def go():
        store = StoreThread(db)
        seen: list = []
        waiter = asyncio.create_task(store(put, "a", seen))
        await asyncio.sleep(0)
        waiter.cancel()                       # the caller goes away; its write must not
        results = await asyncio.gather(*(store(put, k, seen) for k in "bcd"))
        store.close()
        return seen, results

    seen, results = asyncio.run(go())
    assert results == ["b", "c", "d"]
    assert [k for k, _, _ in seen] == ["a", "b", "c", "d"]          # in order, "a" included
    assert {t for _, t, _ in seen} != {threading.get_ident()}       # not on the loop's thread
    # its own connection; on PostgreSQL the store's pool, which every thread shares
    assert all(same is pg.is_url(path_of(db)) for _, _, same in seen)
    assert [r[0] for r in db.execute("SELECT key FROM kv ORDER BY key")] == list("abcd")


@pytest.mark.backend("sqlite", reason="a private in-memory SQLite store")
def test_store_thread_of_an_in_memory_store_runs_inline():
    import threading

    from storage.db import StoreThread, open_db

    async def go():
        memory = StoreThread(open_db(":memory:"))   # cannot be opened twice: runs inline
        inline: list = []
        await memory(lambda mdb: inline.append(threading.get_ident()))
        return inline

    assert asyncio.run(go()) == [threading.get_ident()]


def test_opsbot_runs_batch_hold_renewal_does_not_stall_the_loop_under_a_lock(db, db_path,
                                                                            tmp_path):
    """``opsbot run`` renews its hold on the batch every ``lease_seconds / 3``: under a write
    lock held elsewhere for 5 s that write waits on the store thread, not on the loop."""
    import io

    from pipeline.runner import run_batch
    cfg = dataclasses.replace(FAST, output_dir=str(tmp_path), skip_synthesis=True,
                              lease_seconds=3.0, max_coze=4,
                              poll=PollPolicy(first=0.05, multiplier=1.0, maximum=0.05))

    async def go():
        sim = CozeSimulator(default_duration=lambda key: 0.5 if key.startswith("q") else 2.5)
        await sim.start()
        loop = asyncio.get_running_loop()
        lags: list[tuple[float, float]] = []

        async def probe():
            while True:
                before = loop.time()
                await asyncio.sleep(0.01)
                lags.append((before, loop.time() - before - 0.01))

        try:
            holder = await _start_holder(db_path, 5)
            job = asyncio.create_task(run_batch(
                db, cfg, tasks=[{"task_key": f"q{i}"} for i in range(6)]
                + [{"task_key": f"s{i}"} for i in range(2)], coze_base_url=sim.base_url,
                coze_token=sim.token, workflow_id="wf1", results_path=tmp_path / "r.json",
                stream=io.StringIO(), progress_every=0.05))
            while sum(sim.task(f"q{i}").submits for i in range(6)) < 2:
                await asyncio.sleep(0.01)
            await _lock(holder)
            locked_at = loop.time()
            prober = asyncio.create_task(probe())
            assert (await holder.stdout.readline()).strip() == b"released"
            released_at = loop.time()
            prober.cancel()
            await holder.wait()
            result = await asyncio.wait_for(job, 30)
            return result, lags, locked_at, released_at
        finally:
            await sim.stop()

    result, lags, locked_at, released_at = asyncio.run(go())
    assert released_at - locked_at > 4.5
    during = [lag for at, lag in lags if locked_at <= at <= released_at]
    assert max(during) < 0.1, f"loop stalled {max(during):.3f}s"
    assert len(during) > 100
    assert result.counts["succeeded"] == 8 and result.exit_code == 0

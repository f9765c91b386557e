"""A run adopted by the worker that lost its lease is waited on, never submitted again.

Worker A's lease runs out while its submit is on the wire; worker B claims the task, sees the
submit mark and no run id, and records the doubt. If A's answer lands now, A stores the run id
("adopted", see ``storage.queue.store_run_id``). B must then not submit a second run: its
``mark_submit`` finds the id and hands the task back, and the next claim polls A's run.
"""
from __future__ import annotations

import asyncio
import dataclasses

from pipeline.coze import CozeClient
from pipeline.standins.simulator import CozeSimulator
from pipeline.worker import Worker
from storage import pg, queue
from storage.db import path_of
from tests.test_worker import FAST


def test_mark_submit_refuses_a_task_whose_run_id_was_stored_meanwhile(db):
    queue.create_batch(db, [{"task_key": "a"}, {"task_key": "b"}], now=0, source="cli")
    a, b = queue.claim_tasks(db, owner="w1", now=0, lease=30, limit=2)
    assert queue.mark_submit(db, a["id"], owner="w1", now=1) == "marked"
    queue.update_task(db, b["id"], owner="w1", execute_id="run-of-the-old-owner")
    assert queue.mark_submit(db, b["id"], owner="w1", now=1) == "adopted"
    assert queue.find_task(db, "b")["submit_started_at"] is None   # nothing written
    assert queue.mark_submit(db, b["id"], owner="w2", now=1) == "lost"
    assert queue.mark_submit(db, b["id"], owner="w1", now=1, max_in_flight=1) == "full"


def test_a_run_adopted_between_claim_and_submit_is_polled_not_submitted_again(db, tmp_path):
    queue.create_batch(db, [{"task_key": "a"}], now=0, source="cli")
    (task,) = queue.claim_tasks(db, owner="dead-worker", now=0, lease=0.01, limit=1)
    queue.update_task(db, task["id"], owner="dead-worker", submit_started_at=0.5)

    async def go():
        sim = CozeSimulator(default_duration=0.05)
        await sim.start()
        try:
            async with CozeClient(sim.base_url, sim.token) as coze:
                # the old owner's submit reached Coze: its run exists
                old_run = (await coze.submit("wf", {"task_id": "a"})).execute_id
                # ... and its id is stored the moment the new owner records its doubt
                when = "NEW.submit_started_at IS NULL AND NEW.execute_id IS NULL"
                adopt = f"UPDATE tasks SET execute_id = '{old_run}' WHERE id = NEW.id"
                if pg.is_url(path_of(db)):   # a trigger runs a function there
                    db.execute("CREATE FUNCTION adopt() RETURNS trigger LANGUAGE plpgsql"
                               f" AS $$ BEGIN {adopt}; RETURN NULL; END $$")
                    db.execute("CREATE TRIGGER adopt AFTER UPDATE OF submit_started_at ON"
                               f" tasks FOR EACH ROW WHEN ({when}) EXECUTE FUNCTION adopt()")
                else:
                    db.execute("CREATE TRIGGER adopt AFTER UPDATE OF submit_started_at ON"
                               f" tasks WHEN {when} BEGIN {adopt}; END")
                db.conn.commit()
                worker = Worker(db, dataclasses.replace(FAST, output_dir=str(tmp_path)), coze,
                                "wf")
                await asyncio.wait_for(worker.run(drain=True), 20)
            return sim, old_run
        finally:
            await sim.stop()

    sim, old_run = asyncio.run(go())
    row = queue.find_task(db, "a")
    assert row["status"] == "succeeded"
    assert sim.task("a").submits == 1, "a second run was submitted for a run already stored"
    assert row["execute_id"] == old_run


def test_a_runs_success_is_recorded_once_when_a_successor_polls_it_again(db):
    """Killed after recording a run's success but before moving the task on, a worker leaves
    the task to a successor that polls the same run: the report counts one success."""
    queue.create_batch(db, [{"task_key": "a"}], now=0, source="cli")
    (task,) = queue.claim_tasks(db, owner="w1", now=0, lease=30, limit=1)
    for _ in range(2):
        queue.record_attempt(db, task, stage="coze", started_at=1, ended_at=2,
                             outcome="success", execute_id="run-1")
    queue.record_attempt(db, task, stage="coze", started_at=3, ended_at=4, outcome="success",
                         execute_id="run-2")        # another run of the task: its own success
    queue.record_attempt(db, task, stage="coze", started_at=5, ended_at=6, outcome="failed",
                         execute_id="run-2")
    rows = db.execute("SELECT execute_id, outcome FROM attempts ORDER BY id").fetchall()
    assert [tuple(r) for r in rows] == [("run-1", "success"), ("run-2", "success"),
                                        ("run-2", "failed")]

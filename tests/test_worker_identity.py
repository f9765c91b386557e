"""Worker identities and stages, in process, on a real SQLite file and the Coze simulator.

A worker's id is unique per process start; the fast recovery after a kill -9 judges a lease owner
by its PID only inside this worker's own PID namespace; a Coze-only worker leaves finished runs
queued at stage synthesis for a synthesis-only worker."""
from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import socket
import subprocess
import sys
import time

import pytest
from hypothesis import given, strategies as st

from pipeline.coze import CozeClient
from pipeline.ratelimit import RateLimiter
from pipeline.standins.simulator import CozeSimulator
from pipeline.worker import STAGES, Worker, make_owner, parse_stages
from pipeline.workerid import new_identity, pid_namespace, process_start
from storage import queue
from storage import workers as stored_workers
from tests.test_worker import FAST, _batch


def test_worker_ids_are_unique_and_name_host_and_pid():
    ids = {make_owner() for _ in range(2000)}
    assert len(ids) == 2000
    host, pid, rest = next(iter(ids)).split(":", 2)
    assert (host, pid) == (socket.gethostname(), str(os.getpid()))
    assert len(rest) == 32 and int(rest, 16) >= 0      # a whole uuid4, not a few hex digits


def test_identity_records_this_process():
    me = new_identity()
    assert me.pid == os.getpid() and me.hostname == socket.gethostname()
    if os.path.exists("/proc/self/ns/pid"):
        assert me.pid_ns == pid_namespace() and me.pid_ns.endswith("]")
        assert me.proc_start == process_start(os.getpid()) and me.proc_start > 0


@pytest.mark.parametrize("text, stages", [
    ("coze", {"coze"}), ("synthesis", {"synthesis"}), ("coze,synthesis", set(STAGES)),
    ("synthesis, coze", set(STAGES)), ("all", set(STAGES)), ("coze coze", {"coze"})])
def test_stages_parse(text, stages):
    assert parse_stages(text) == stages


@pytest.mark.parametrize("text", ["", " , ", "gpu", "coze,gpu", "all,coze", "Coze", "synth"])
def test_bad_stages_are_refused_by_name(text):
    with pytest.raises(ValueError, match="choose from coze, synthesis or all"):
        parse_stages(text)


@given(st.text(max_size=30))
def test_stage_parsing_never_accepts_an_unknown_name(text):
    try:
        stages = parse_stages(text)
    except ValueError:
        return
    assert stages and stages <= set(STAGES)


@pytest.mark.parametrize("argv", [["worker", "--stages", "gpu"], ["worker", "--stages", ""]])
def test_the_cli_refuses_unknown_stages_with_exit_2(argv, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPSBOT_", "COZE_"))}
    env.update(OPSBOT_DB=str(tmp_path / "x.db"), PYTHONPATH=os.getcwd())
    out = subprocess.run([sys.executable, "-m", "bot.ops.cli", *argv], env=env, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 2
    assert "--stages" in out.stderr and "choose from coze, synthesis or all" in out.stderr


def test_a_worker_refuses_unknown_stages(db):
    with pytest.raises(ValueError):
        Worker(db, FAST, None, "wf1", stages=["coze", "gpu"])
    with pytest.raises(ValueError):
        Worker(db, FAST, None, "wf1", stages=[])


# ---- fast recovery only inside this PID namespace ---------------------------------------------

def _dead_pid() -> tuple[int, int | None]:
    """The pid (and start time) of a process that has ended."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    start = process_start(proc.pid)
    proc.kill()
    proc.wait()
    return proc.pid, start


def _held_by(db, owner, *, pid, pid_ns, proc_start, register=True, stopped=False):
    b = _batch(db, 2, prefix=owner[-4:])
    queue.claim_tasks(db, owner=owner, now=100, lease=1000, limit=2, batch_ids=[b])
    if register:
        stored_workers.register(db, id=owner, hostname=socket.gethostname(), pid=pid,
                                pid_ns=pid_ns, proc_start=proc_start, stages=STAGES, now=100)
        if stopped:
            stored_workers.stopped(db, owner, now=101)
    return b


def _lease_untils(db, batch):
    return [t["lease_until"] for t in queue.tasks_of(db, batch)]


@pytest.mark.skipif(pid_namespace() is None, reason="no /proc: PID namespaces are unknown")
def test_recovery_trusts_pids_only_in_its_own_pid_namespace(db):
    pid, start = _dead_pid()
    here = pid_namespace()
    same_ns = _held_by(db, "h:1:same" + "0" * 28, pid=pid, pid_ns=here, proc_start=start)
    # another container: same hostname, its own PID namespace; its pid means nothing here
    other_ns = _held_by(db, "h:1:othr" + "0" * 28, pid=pid, pid_ns="other-boot/pid:[1]",
                        proc_start=start)
    # an owner with no row (e.g. an older worker): never judged by its pid
    legacy = _held_by(db, f"{socket.gethostname()}:{pid}:abcdef", pid=pid, pid_ns=here,
                      proc_start=start, register=False)
    # alive, in this namespace: this very process
    alive = _held_by(db, "h:1:live" + "0" * 28, pid=os.getpid(), pid_ns=here,
                     proc_start=process_start(os.getpid()))
    # its pid was reused by another process (this one): a different start time
    reused = _held_by(db, "h:1:reus" + "0" * 28, pid=os.getpid(), pid_ns=here,
                      proc_start=(process_start(os.getpid()) or 0) + 12345)
    # stopped cleanly (its row says so), wherever it ran
    stopped = _held_by(db, "h:1:stop" + "0" * 28, pid=pid, pid_ns="other-boot/pid:[1]",
                       proc_start=start, stopped=True)
    worker = Worker(db, FAST, None, "wf1")
    assert asyncio.run(worker.recover_dead_owners()) == 6
    worker.store.close()
    assert _lease_untils(db, same_ns) == [0, 0]
    assert _lease_untils(db, reused) == [0, 0]
    assert _lease_untils(db, stopped) == [0, 0]
    for kept in (other_ns, legacy, alive):
        assert _lease_untils(db, kept) == [1100, 1100]
    # what was not recovered comes back by lease expiry: not before, and then to anyone
    assert not [t for t in queue.claim_tasks(db, owner="x", now=1099, lease=5, limit=20)
                if t["batch_id"] in (other_ns, legacy, alive)]
    late = queue.claim_tasks(db, owner="x", now=1101, lease=5, limit=20)
    assert {t["batch_id"] for t in late} == {other_ns, legacy, alive}


# ---- stages -----------------------------------------------------------------------------------

async def _worker(db, sim, stages, tmp_path, **kw):
    coze = CozeClient(sim.base_url, sim.token, limiter=RateLimiter(500, burst=50))
    cfg = dataclasses.replace(FAST, output_dir=str(tmp_path / "out"), **kw)
    return coze, Worker(db, cfg, coze, "wf1", stages=stages)


def test_a_coze_worker_and_a_synthesis_worker_share_a_batch(db, tmp_path):
    async def go():
        sim = CozeSimulator(default_duration=0.05)
        await sim.start()
        try:
            batch = _batch(db, 8)
            coze, only_coze = await _worker(db, sim, {"coze"}, tmp_path)
            async with coze:
                await asyncio.wait_for(only_coze.run(drain=True), 30)
            only_coze.synth.close()
            after_coze = queue.tasks_of(db, batch)
            synth_attempts = db.execute("SELECT COUNT(*) FROM attempts WHERE"
                                        " stage = 'synthesis'").fetchone()[0]
            coze2, only_synth = await _worker(db, sim, {"synthesis"}, tmp_path)
            async with coze2:
                await asyncio.wait_for(only_synth.run(drain=True), 30)
            only_synth.synth.close()
            return sim, batch, after_coze, synth_attempts, only_coze, only_synth
        finally:
            await sim.stop()

    sim, batch, after_coze, synth_attempts, only_coze, only_synth = asyncio.run(go())
    # the Coze worker drained its stage and stopped: every task waits for synthesis, unleased
    assert {(t["status"], t["stage"], t["lease_owner"]) for t in after_coze} == \
        {("queued", "synthesis", None)}
    assert all(json.loads(t["coze_output"]) for t in after_coze)
    assert synth_attempts == 0
    assert queue.batch_counts(db, batch)["succeeded"] == 8
    assert only_synth.stats["submits"] == 0 and only_synth.stats["claimed"] == 8
    assert only_coze.stats["submits"] == 8
    assert all(sim.task(f"t{i}").submits == 1 for i in range(8))
    for stage in ("coze", "synthesis"):
        rows = db.execute("SELECT task_id, COUNT(*) FROM attempts WHERE stage = ? AND"
                          " outcome = 'success' GROUP BY task_id", [stage]).fetchall()
        assert len(rows) == 8 and {n for _, n in rows} == {1}, stage
    for t in queue.tasks_of(db, batch):   # results name absolute paths (valid on every machine)
        path = json.loads(t["output"])["synthesis"].get("manifest") or \
            json.loads(t["output"])["synthesis"].get("video")
        assert path and os.path.isabs(path) and os.path.exists(path)
    rows = stored_workers.get(db, [only_coze.owner, only_synth.owner])
    assert rows[only_coze.owner]["stages"] == "coze"
    assert rows[only_synth.owner]["stages"] == "synthesis"
    assert all(r["stopped_at"] is not None for r in rows.values())


def test_a_synthesis_worker_never_claims_coze_work(db, tmp_path):
    async def go():
        sim = CozeSimulator(default_duration=0.05)
        await sim.start()
        try:
            batch = _batch(db, 3)
            coze, only_synth = await _worker(db, sim, {"synthesis"}, tmp_path)
            stop = asyncio.Event()
            async with coze:
                runner = asyncio.create_task(only_synth.run(stop=stop))
                await asyncio.sleep(0.5)     # plenty of idle intervals (0.02 s)
                stop.set()
                await asyncio.wait_for(runner, 10)
            only_synth.synth.close()
            return sim, batch, only_synth
        finally:
            await sim.stop()

    sim, batch, only_synth = asyncio.run(go())
    assert all(sim.task(f"t{i}").submits == 0 for i in range(3))
    assert only_synth.stats["claimed"] == 0 and only_synth.stats["submits"] == 0
    assert {t["status"] for t in queue.tasks_of(db, batch)} == {"queued"}


def test_a_running_worker_keeps_a_heartbeat(db, tmp_path):
    async def go():
        sim = CozeSimulator(default_duration=0.05)
        await sim.start()
        try:
            coze, worker = await _worker(db, sim, {"coze", "synthesis"}, tmp_path,
                                         lease_seconds=0.3)
            stop = asyncio.Event()
            async with coze:
                runner = asyncio.create_task(worker.run(stop=stop))
                await asyncio.sleep(0.05)
                first = stored_workers.get(db, [worker.owner])[worker.owner]
                await asyncio.sleep(0.5)     # a few renewals (every lease/3)
                later = stored_workers.get(db, [worker.owner])[worker.owner]
                live = stored_workers.live(db, now=time.time(), within=5.0)
                stop.set()
                await asyncio.wait_for(runner, 10)
            worker.synth.close()
            return worker, first, later, live
        finally:
            await sim.stop()

    worker, first, later, live = asyncio.run(go())
    assert first["stopped_at"] is None and later["heartbeat_at"] > first["heartbeat_at"]
    assert [r["id"] for r in live] == [worker.owner]
    assert stored_workers.get(db, [worker.owner])[worker.owner]["stopped_at"] is not None
    assert stored_workers.live(db, now=time.time(), within=60) == []


def test_silent_workers_are_forgotten_unless_they_hold_tasks(db):
    for wid, beat in (("old", 0.0), ("old-holding", 0.0), ("recent", 7 * 86400.0)):
        stored_workers.register(db, id=wid, hostname="h", pid=1, pid_ns=None, proc_start=None,
                                stages=STAGES, now=beat)
    b = _batch(db, 1)
    queue.claim_tasks(db, owner="old-holding", now=0, lease=5, limit=1, batch_ids=[b])
    assert stored_workers.prune(db, now=7 * 86400 + 1) == 1
    assert sorted(stored_workers.get(db, ["old", "old-holding", "recent"])) == \
        ["old-holding", "recent"]

"""Several `opsbot worker` processes on one SQLite file, with the Coze simulator as its own process.

* a Coze-only worker and a synthesis-only worker together finish a batch, each task exactly once,
  each doing only its stage;
* a worker killed with SIGKILL in another PID namespace (a container on the same host: same
  hostname, its own PIDs) keeps its tasks until their leases run out; then a worker with another
  identity on the same hostname takes them over and waits on the same Coze runs;
* killed in this worker's own PID namespace, its tasks are taken over at once."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from storage import queue
from storage import workers as stored_workers
from storage.db import open_db
from tests.test_crash import _stats

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent

# a synthesis command that says which process ran it: the worker is its parent
SYNTH = (f"{sys.executable} -c \"import json, os, sys; "
         f"json.dump({{'worker_pid': os.getppid()}}, open(sys.argv[1], 'w'))\" {{output}}")


@pytest.fixture
def simulator():
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline.standins.simulator", "--port", "0", "--duration", "3",
         "--seed", "5"], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline().strip()
    assert line.startswith("listening "), line
    yield line.split()[1]
    proc.terminate()
    proc.wait(10)


def _env(tmp_path, db_path, base_url, *, lease=4.0, synth=""):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FEISHU_", "COZE_",
                                                                       "OPSBOT_", "BITABLE_"))}
    cfg = tmp_path / "opsbot.toml"
    synth_line = f"synthesis_command = {json.dumps(synth)}\n" if synth else ""
    cfg.write_text(
        f"[pipeline]\nmax_coze = 8\nlease_seconds = {lease}\nidle_interval = 0.05\n"
        f"output_dir = \"{tmp_path / 'out'}\"\n{synth_line}"
        "[pipeline.poll]\nfirst = 0.05\nmultiplier = 1.5\nmaximum = 0.2\n", encoding="utf-8")
    env.update(OPSBOT_DB=str(db_path), COZE_BASE_URL=base_url, COZE_API_TOKEN="sim-token",
               COZE_WORKFLOW_ID="wf-scale", OPSBOT_CONFIG=str(cfg), PYTHONPATH=str(ROOT))
    return env


def _worker(env, *args, prefix=()):
    return subprocess.Popen([*prefix, sys.executable, "-m", "bot.ops.cli", "worker", *args],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _exactly_once(db, batch, stats, n):
    assert queue.batch_counts(db, batch)["succeeded"] == n
    submits = {k: v["submits"] for k, v in stats["tasks"].items()}
    assert submits == {f"s{i}": 1 for i in range(n)}
    for stage in ("coze", "synthesis"):
        rows = db.execute("SELECT task_id, COUNT(*) FROM attempts WHERE stage = ? AND"
                          " outcome = 'success' GROUP BY task_id", [stage]).fetchall()
        assert len(rows) == n and {c for _, c in rows} == {1}, stage


def test_a_coze_worker_and_a_synthesis_worker_finish_a_batch(tmp_path, simulator):
    db_path = tmp_path / "scale.db"
    db = open_db(db_path)
    n = 12
    batch = queue.create_batch(db, [{"task_key": f"s{i}", "params": {"i": i}} for i in range(n)],
                               now=time.time(), source="cli")
    env = _env(tmp_path, db_path, simulator, synth=SYNTH)
    synth = _worker(env, "--drain", "--stages", "synthesis")
    coze = _worker(env, "--drain", "--stages", "coze")
    _, err = coze.communicate(timeout=120)
    assert coze.returncode == 0, err.decode()[-2000:]
    _, err = synth.communicate(timeout=120)
    assert synth.returncode == 0, err.decode()[-2000:]
    _exactly_once(db, batch, _stats(simulator), n)
    # every synthesis ran in the synthesis worker's process, none in the Coze worker's
    # (its file lies in output_dir, and the result names it by an absolute path)
    for t in queue.tasks_of(db, batch):
        manifest = Path(json.loads(t["output"])["synthesis"]["manifest"])
        assert manifest.is_absolute() and manifest.parent.parent == tmp_path / "out"
        assert json.loads(manifest.read_text())["worker_pid"] == synth.pid
    rows = list(db.query("SELECT pid, stages, stopped_at FROM workers ORDER BY started_at"))
    assert sorted((r["pid"], r["stages"]) for r in rows) == \
        sorted([(synth.pid, "synthesis"), (coze.pid, "coze")])
    assert all(r["stopped_at"] for r in rows)


def _can_unshare() -> bool:
    try:
        return subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", "true"],
                              capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def _wait_running(db, batch, n, timeout=30):
    """Until all ``n`` tasks run under one owner with their execute_id stored."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rows = queue.tasks_of(db, batch)
        if all(r["status"] == "running" and r["execute_id"] for r in rows) and \
                len({r["lease_owner"] for r in rows}) == 1:
            return rows
        time.sleep(0.05)
    raise AssertionError(f"tasks not all running: {[r['status'] for r in rows]}")


def _kill_and_take_over(tmp_path, simulator, *, prefix, lease):
    db_path = tmp_path / "takeover.db"
    db = open_db(db_path)
    n = 6
    batch = queue.create_batch(db, [{"task_key": f"s{i}", "params": {"i": i}} for i in range(n)],
                               now=time.time(), source="cli")
    env = _env(tmp_path, db_path, simulator, lease=lease)
    first = _worker(env, "--stages", "coze", prefix=prefix)
    held = _wait_running(db, batch, n)
    dead_owner = held[0]["lease_owner"]
    first.send_signal(signal.SIGKILL)     # with --kill-child, the worker dies with it
    first.wait(10)
    killed_at = time.time()
    lease_until = max(r["lease_until"] for r in held)
    second = _worker(env, "--drain")
    owners_seen = []
    while second.poll() is None and time.time() < killed_at + 60:
        owners_seen.append((time.time(), {r["lease_owner"] for r in queue.tasks_of(db, batch)
                                          if r["status"] == "running"}))
        time.sleep(0.05)
    _, err = second.communicate(timeout=60)
    assert second.returncode == 0, err.decode()[-2000:]
    _exactly_once(db, batch, _stats(simulator), n)
    rows = stored_workers.get(db, [dead_owner])
    [new_owner] = [r["id"] for r in db.query("SELECT id FROM workers WHERE id != ?",
                                             [dead_owner])]
    return db, rows[dead_owner], new_owner, killed_at, lease_until, owners_seen


@pytest.mark.skipif(not _can_unshare(), reason="cannot make a PID namespace here (unshare "
                                               "needs CAP_SYS_ADMIN): the container case is "
                                               "not exercised")
def test_a_killed_worker_in_another_pid_namespace_is_taken_over_after_its_lease(
        tmp_path, simulator):
    db, dead, new_owner, killed_at, lease_until, seen = _kill_and_take_over(
        tmp_path, simulator, lease=4.0,
        prefix=("unshare", "--pid", "--fork", "--kill-child", "--mount-proc"))
    me = open_db(tmp_path / "takeover.db", migrate=False)
    row = stored_workers.get(me, [new_owner])[new_owner]
    # same hostname, different identity, different PID namespace: judged by its lease alone
    assert dead["hostname"] == row["hostname"] == socket.gethostname()
    assert dead["id"] != new_owner and dead["pid_ns"] != row["pid_ns"]
    assert dead["stopped_at"] is None
    # until its lease ran out, the dead worker's tasks stayed its own
    before = [owners for t, owners in seen if t < lease_until - 0.3]
    assert before and all(owners == {dead["id"]} for owners in before)
    assert any(new_owner in owners for _, owners in seen)


def test_a_killed_worker_in_this_pid_namespace_is_taken_over_at_once(tmp_path, simulator):
    db, dead, new_owner, killed_at, lease_until, seen = _kill_and_take_over(
        tmp_path, simulator, lease=60.0, prefix=())
    assert dead["id"] != new_owner
    # the lease had almost a minute left; the new worker took the tasks over long before
    taken = [t for t, owners in seen if new_owner in owners]
    assert taken and taken[0] < lease_until - 30

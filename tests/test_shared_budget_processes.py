"""Two real processes, one Coze account: the service worker and `opsbot run` on one store.

The simulator runs in this process and records every request with its time. A worker
(`opsbot worker --drain`) works a chat batch while `opsbot run` works its own batch from a file.
The rate measured at the simulator stays within the account's budget, no task runs twice, and
neither process touches the other's tasks (the CLI runs with --skip-synthesis, the worker does
synthesis: the attempts show who ran what).
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.standins.simulator import CozeSimulator
from storage import queue
from storage.db import open_db

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent
QPS = 8


def _env(db_path, base_url, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FEISHU_", "COZE_",
                                                                       "OPSBOT_", "BITABLE_"))}
    cfg = tmp_path / "opsbot.toml"
    cfg.write_text(
        f"[pipeline]\ncoze_qps = {QPS}\nmax_coze = 8\nlease_seconds = 10\nidle_interval = 0.05\n"
        f"output_dir = \"{tmp_path / 'out'}\"\n"
        "[pipeline.poll]\nfirst = 0.3\nmultiplier = 1.5\nmaximum = 1.0\n", encoding="utf-8")
    env.update(OPSBOT_DB=str(db_path), COZE_BASE_URL=base_url, COZE_API_TOKEN="sim-token",
               COZE_WORKFLOW_ID="wf-shared", OPSBOT_CONFIG=str(cfg), PYTHONPATH=str(ROOT))
    return env


def test_worker_and_cli_share_one_budget_and_never_touch_each_others_tasks(tmp_path):
    sim = CozeSimulator(default_duration=0.5, seed=5)
    base_url = sim.start_in_thread()
    db_path = tmp_path / "shared.db"
    db = open_db(db_path)
    n_chat, n_cli = 8, 24     # the worker has room to spare while the CLI's tasks wait
    chat = queue.create_batch(db, [{"task_key": f"s{i}", "params": {"i": i}}
                                   for i in range(n_chat)], now=time.time(), source="chat")
    batch_file = tmp_path / "tasks.csv"
    batch_file.write_text("task_id,topic\n" + "".join(f"c{i},topic {i}\n" for i in range(n_cli)),
                          encoding="utf-8")
    env = _env(db_path, base_url, tmp_path)
    try:
        cli = subprocess.Popen([sys.executable, "-m", "bot.ops.cli", "run", str(batch_file),
                                "--skip-synthesis", "--results", str(tmp_path / "out.json")],
                               cwd=ROOT, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 30
        while not db.execute("SELECT 1 FROM batches WHERE source = 'cli'").fetchone():
            assert time.monotonic() < deadline and cli.poll() is None, "opsbot run did not start"
            time.sleep(0.05)
        worker = subprocess.Popen([sys.executable, "-m", "bot.ops.cli", "worker", "--drain"],
                                  cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE, text=True)
        cli_out, cli_err = cli.communicate(timeout=180)
        _, worker_err = worker.communicate(timeout=180)
    finally:
        for proc in (locals().get("worker"), locals().get("cli")):
            if proc is not None and proc.poll() is None:
                proc.kill()
        sim.stop_thread()
    assert cli.returncode == 0, cli_err[-3000:]
    assert worker.returncode == 0, worker_err[-3000:]

    # one budget: both processes together stay within QPS requests per second. Each process
    # hands out at most QPS per second at the moment a request leaves (test_shared_budget); one
    # more is allowed here for the time a request takes to reach the simulator's log.
    times = [r.time for r in sim.requests]
    assert len(times) >= 2 * (n_chat + n_cli)            # a submit and a poll per task at least
    assert sim.max_rps(1.0) <= QPS + 1, sim.max_rps(1.0)
    assert sim.max_rps(5.0) <= 5 * QPS + 1
    span = max(times) - min(times)
    assert len(times) / span > QPS * 0.6                 # and the budget was what bound them

    # no task ran twice
    keys = [f"s{i}" for i in range(n_chat)] + [f"c{i}" for i in range(n_cli)]
    assert all(sim.task(k).submits == 1 and len(sim.task(k).runs) == 1 for k in keys)

    # each process ran its own batch, and only its own
    db = open_db(db_path)
    cli_batch = next(b["id"] for b in queue.list_batches(db, limit=5) if b["source"] == "cli")
    assert queue.batch_counts(db, chat)["succeeded"] == n_chat
    assert queue.batch_counts(db, cli_batch)["succeeded"] == n_cli
    synth = dict(db.execute("SELECT batch_id, COUNT(*) FROM attempts WHERE stage = 'synthesis'"
                            " GROUP BY batch_id").fetchall())
    assert synth.get(chat) == n_chat and cli_batch not in synth

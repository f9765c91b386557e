"""Three `opsbot worker` processes on one PostgreSQL database (the test server of
tests/pg_server.py; this test runs in the PostgreSQL pass only), with the Coze simulator as its
own process: two workers are killed with SIGKILL while they hold every task mid-run; the third
takes the tasks over by lease expiry and finishes them, each task exactly once, each Coze run
submitted once."""
from __future__ import annotations

import signal
import time

import pytest

from storage import queue
from storage.db import open_db
from tests.test_crash import _stats
from tests.test_worker_scale import SYNTH, _env, _exactly_once, _worker
from tests.test_worker_scale import simulator  # noqa: F401 - the fixture

pytestmark = [pytest.mark.slow, pytest.mark.backend("postgresql")]


def _all_running(db, batch, n, in_flight, timeout=30):
    """Until all ``n`` tasks are held (under any owners) and ``in_flight`` of them have their
    run submitted (execute_id stored): the account's run limit is shared by every worker, so
    the rest wait for a slot, held but not yet submitted."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rows = queue.tasks_of(db, batch)
        if len(rows) == n and all(r["status"] == "running" for r in rows) \
                and sum(1 for r in rows if r["execute_id"]) >= in_flight:
            return rows
        time.sleep(0.05)
    raise AssertionError(f"tasks not all running: {[r['status'] for r in rows]}")


def test_a_third_worker_finishes_what_two_killed_workers_held(db_path, tmp_path,
                                                              simulator):  # noqa: F811
    url = str(db_path)
    db = open_db(url)
    try:
        n = 6
        batch = queue.create_batch(db, [{"task_key": f"s{i}", "params": {"i": i}}
                                        for i in range(n)], now=time.time(), source="cli")
        env = _env(tmp_path, url, simulator, lease=3.0, synth=SYNTH)
        cfg = tmp_path / "opsbot.toml"     # three runs per worker: both killed ones hold tasks
        cfg.write_text(cfg.read_text().replace("max_coze = 8", "max_coze = 3"))
        killed = [_worker(env), _worker(env)]
        held = _all_running(db, batch, n, in_flight=3)
        assert len({r["lease_owner"] for r in held}) == 2
        for proc in killed:
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
        dead = {r["lease_owner"] for r in held}
        last = _worker(env, "--drain")
        _, err = last.communicate(timeout=90)
        assert last.returncode == 0, err.decode()[-2000:]
        _exactly_once(db, batch, _stats(simulator), n)
        [(finisher,)] = db.execute("SELECT id FROM workers WHERE stopped_at IS NOT NULL")
        assert finisher not in dead
        assert {r["lease_owner"] for r in queue.tasks_of(db, batch)} <= {finisher, None}
        assert len(list(db.query("SELECT id FROM workers"))) == 3
    finally:
        db.conn.close()

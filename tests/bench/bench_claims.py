"""Claim throughput on PostgreSQL: 1, 2 and 4 claimer processes on one queue, with the claim that
took the global write lock (before) and the one-statement ``SKIP LOCKED`` claim (after).

    python -m tests.bench.bench_claims              # 3,000 tasks per run
    python -m tests.bench.bench_claims --quick      # 600 tasks per run

Each run gets a fresh database on a throwaway server (tests/pg_server.py; or the server named by
``OPSBOT_TEST_POSTGRES_URL``) holding one batch of queued tasks. The claimers are separate
processes, each with its own store (as workers on separate machines), started together; each
claims ``--limit`` tasks at a time until the queue is empty and marks each claimed task
succeeded (its own transaction, as a worker finishing it), so the running set stays small as in
a real queue. Figures: tasks claimed (and finished) per second of wall time from the start to
the last claimer done, and whether every task was claimed exactly once. "global lock" runs
SQLite's claim (read the due ids, then update them; ``storage.queue._claim_select_update``)
inside the exclusive write lock, which is what every claim on PostgreSQL did before, and
finishes under that lock too; "skip locked" is ``storage.queue.claim_tasks`` and
``storage.queue.update_task`` as they are now.
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import time
from collections import Counter

from storage import queue
from storage.db import open_db, transaction

MODES = ("global lock", "skip locked")


def _claim(db, mode: str, owner: str, now: float, limit: int) -> list[dict]:
    if mode == "skip locked":
        return queue.claim_tasks(db, owner=owner, now=now, lease=600.0, limit=limit)
    with transaction(db) as conn:   # exclusive: the old claim, one claimer at a time
        return queue._claim_select_update(conn, owner=owner, now=now, lease=600.0,
                                          limit=limit, stage=None, wanted=())


def _finish(db, mode: str, owner: str, task_id: int) -> None:
    if mode == "skip locked":
        assert queue.update_task(db, task_id, owner=owner, status="succeeded")
        return
    with transaction(db) as conn:   # exclusive, as every write was before
        conn.execute("UPDATE tasks SET status = 'succeeded' WHERE id = ? AND lease_owner = ?"
                     " AND status = 'running'", [task_id, owner])


def _claimer(url: str, mode: str, owner: str, limit: int, start, out) -> None:
    db = open_db(url, migrate=False)
    ids: list[int] = []
    start.wait()
    began = time.monotonic()
    while rows := _claim(db, mode, owner, 200.0, limit):
        ids += [r["id"] for r in rows]
        for row in rows:
            _finish(db, mode, owner, row["id"])
    out.put((owner, began, time.monotonic(), ids))
    db.conn.close()


def run(server: str, mode: str, claimers: int, tasks: int, limit: int) -> tuple[float, bool]:
    """Claims per second, and whether every task was claimed exactly once."""
    from tests.pg_server import fresh_database
    url = fresh_database(server)
    db = open_db(url)
    queue.create_batch(db, [{"task_key": f"t{i}", "params": {}} for i in range(tasks)],
                       now=100.0, source="cli")
    ctx = mp.get_context("fork")
    start, out = ctx.Barrier(claimers), ctx.Queue()
    procs = [ctx.Process(target=_claimer, args=(url, mode, f"w{i}", limit, start, out))
             for i in range(claimers)]
    for p in procs:
        p.start()
    results = [out.get(timeout=600) for _ in procs]
    for p in procs:
        p.join(60)
    db.conn.close()
    elapsed = max(r[2] for r in results) - min(r[1] for r in results)
    counts = Counter(i for r in results for i in r[3])
    exact = len(counts) == tasks and set(counts.values()) == {1}
    return tasks / elapsed, exact


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.bench.bench_claims")
    ap.add_argument("--quick", action="store_true", help="600 tasks per run")
    ap.add_argument("--tasks", type=int, default=None)
    ap.add_argument("--limit", type=int, default=1, help="tasks per claim (default 1)")
    ap.add_argument("--claimers", type=int, nargs="+", default=[1, 2, 4])
    args = ap.parse_args(argv)
    tasks = args.tasks or (600 if args.quick else 3000)
    server = os.environ.get("OPSBOT_TEST_POSTGRES_URL", "")
    local = None
    if not server:
        from tests.pg_server import Server
        local = Server()
        server = local.start()
    try:
        print(f"{tasks} tasks per run, {args.limit} per claim, {os.cpu_count()} cores; "
              f"claims/s (every task claimed exactly once?)")
        print(f"{'claimers':>8}  " + "  ".join(f"{m:>18}" for m in MODES))
        for n in args.claimers:
            cells = []
            for mode in MODES:
                rate, exact = run(server, mode, n, tasks, args.limit)
                cells.append(f"{rate:>12,.0f} ({'yes' if exact else 'NO'})")
            print(f"{n:>8}  " + "  ".join(f"{c:>18}" for c in cells))
    finally:
        if local is not None:
            local.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

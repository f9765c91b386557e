"""Overhead benchmark: worker CPU time per task and peak memory, runs that end at once.

    python -m tests.bench.bench_overhead            # 10,000 tasks
    python -m tests.bench.bench_overhead --quick    # 2,000 tasks

The simulator runs in its own process (``python -m pipeline.standins.simulator --port 0 --duration 0``),
so this process holds only the worker: its ``time.process_time()`` over ``Worker.run`` is the
worker's CPU (HTTP client, SQLite, asyncio, the worker's own logic), divided by the number of
tasks. Peak memory is this process's ``ru_maxrss`` (interpreter and imports included).
Synthesis is skipped; the rate limit is raised out of the way (100,000 QPS) and polls are
placed 1 ms after submit (``PollPolicy(first=0.001, maximum=0.01)``) so that the run measures
the worker, not waits. ``--profile FILE`` writes a cProfile of the worker run.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pipeline.config import PipelineConfig, PollPolicy
from pipeline.coze import CozeClient
from pipeline.ratelimit import RateLimiter
from pipeline.worker import Worker
from storage import queue
from storage.db import open_db


def start_simulator() -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.standins.simulator", "--port", "0",
                             "--duration", "0"], stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline().strip()
    if not line.startswith("listening "):
        proc.kill()
        raise RuntimeError(f"simulator did not start: {line!r}")
    return proc, line.split(" ", 1)[1]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.bench.bench_overhead",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="2,000 tasks instead of 10,000")
    ap.add_argument("--tasks", type=int, default=None)
    ap.add_argument("--profile", metavar="FILE", help="write a cProfile of the worker run")
    args = ap.parse_args(argv)
    n = args.tasks or (2_000 if args.quick else 10_000)
    config = PipelineConfig(max_coze=16, max_synthesis=4, coze_qps=100_000.0, skip_synthesis=True,
                            poll=PollPolicy(first=0.001, multiplier=1.5, maximum=0.01))
    proc, base_url = start_simulator()
    try:
        with tempfile.TemporaryDirectory(prefix="opsbot-bench-") as tmp:
            db = open_db(Path(tmp) / "overhead.db")
            batch = queue.create_batch(db, [{"task_key": f"t{i:05d}", "params": {"topic": i}}
                                            for i in range(n)], now=time.time(), source="cli")

            async def go() -> Worker:
                limiter = RateLimiter(config.coze_qps, burst=100)
                async with CozeClient(base_url, "sim-token", limiter=limiter) as coze:
                    worker = Worker(db, config, coze, "wf-bench")
                    await worker.run(drain=True)
                    return worker

            profiler = None
            if args.profile:
                import cProfile
                profiler = cProfile.Profile()
            cpu, wall = time.process_time(), time.perf_counter()
            if profiler:
                profiler.enable()
            worker = asyncio.run(go())
            if profiler:
                profiler.disable()
                profiler.dump_stats(args.profile)
            cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
            counts = queue.batch_counts(db, batch)
            db.conn.close()
    finally:
        proc.terminate()
        proc.wait(10)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"{n} tasks, runs end at once, 16 in flight, synthesis skipped;"
          f" simulator in process {proc.pid}")
    print(f"succeeded {counts['succeeded']} / {counts['total']};"
          f" submits {worker.stats['submits']}, polls {worker.stats['polls']}")
    print(f"wall {wall:.1f} s ({n / wall:.0f} tasks/s)")
    print(f"worker CPU {cpu:.2f} s = {cpu / n * 1000:.3f} ms per task")
    print(f"peak memory (ru_maxrss of the worker process) {peak_mb:.0f} MB")
    return 0 if counts["succeeded"] == n else 1


if __name__ == "__main__":
    sys.exit(main())

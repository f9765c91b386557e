"""Fast-fail benchmark: from a run ending in ``Fail`` (720701002) to the task marked failed.

    python -m tests.bench.bench_fastfail            # 32 tasks, half fail (about 40 s)
    python -m tests.bench.bench_fastfail --quick    # 16 tasks (about 15 s)

Real time, real HTTP, a real SQLite file, the default ``PipelineConfig`` (16 in flight, default
``PollPolicy``, the default rule: plugin timeouts resubmit once, then fail) with synthesis
skipped. Every other task's runs end in ``Fail`` 720701002 "Access plugin server url timed out"
after a scripted time (2-12 s; 1-6 s with ``--quick``); the others succeed, so the worker's
learned polling is in play as it would be in a real batch. For each failing task:

* first run: its end (simulator), the poll that saw ``Fail``, and the resubmit (the new run's
  submit time);
* second run: its end, the poll that saw ``Fail``, and ``finished_at`` of the task in the store
  (status ``failed``).

"interval" is the poll interval in effect when the run ended (time between the last poll that
saw ``Running`` and the one that saw ``Fail``): the goal is end -> failed < 1 s + interval.
The seeds, for comparison, kept waiting on a failed run until their 20-minute timeout.
"""
from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import tempfile
from pathlib import Path

from pipeline.config import PipelineConfig
from pipeline.coze import CozeClient
from pipeline.ratelimit import RateLimiter
from pipeline.standins.simulator import CozeSimulator, Script
from pipeline.worker import Worker
from storage import queue
from storage.db import open_db


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.bench.bench_fastfail",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="16 tasks, runs of 1-6 s")
    ap.add_argument("--seed", type=int, default=3)
    args = ap.parse_args(argv)
    n, lo, hi = (16, 1.0, 6.0) if args.quick else (32, 2.0, 12.0)
    rng = random.Random(args.seed)
    keys = [f"t{i:03d}" for i in range(n)]
    durations = {k: rng.uniform(lo, hi) for k in keys}
    failing = keys[1::2]
    config = PipelineConfig(skip_synthesis=True)

    with tempfile.TemporaryDirectory(prefix="opsbot-bench-") as tmp:
        db = open_db(Path(tmp) / "fastfail.db")

        async def go() -> CozeSimulator:
            sim = CozeSimulator(default_duration=lambda key: durations[key])
            for k in failing:
                sim.script(k, Script(outcome="Fail", error_code="720701002", duration=durations[k],
                                     error_message="Access plugin server url timed out"))
            await sim.start()
            try:
                queue.create_batch(db, [{"task_key": k, "params": {}} for k in keys],
                                   now=0, source="cli")
                limiter = RateLimiter(config.coze_qps, burst=int(config.coze_qps))
                async with CozeClient(sim.base_url, sim.token, limiter=limiter) as coze:
                    await Worker(db, config, coze, "wf-bench").run(drain=True)
            finally:
                await sim.stop()
            return sim

        sim = asyncio.run(go())
        tasks = {k: queue.find_task(db, k) for k in keys}
        db.conn.close()

    polls: dict[str, list[float]] = {}
    for rec in sim.requests:
        if "/run_histories/" in rec.path:
            polls.setdefault(rec.path.rsplit("/", 1)[1], []).append(rec.time)

    def run_figures(execute_id: str) -> tuple[float, float, float]:
        run = sim.runs[execute_id]
        end = run.submitted + run.duration
        times = polls[execute_id]
        seen = times[-1]
        before = times[-2] if len(times) > 1 else run.submitted
        return end, seen, seen - before

    print(f"{n} tasks ({len(failing)} failing with 720701002), runs of {lo:g}-{hi:g} s,"
          f" default PipelineConfig (max_resubmits=1), synthesis skipped")
    print(f"{'task':<6} {'run 1: end->seen':>17} {'seen->resubmit':>15} {'interval':>9}"
          f" {'run 2: end->seen':>17} {'seen->failed':>13} {'end->failed':>12} {'interval':>9}")
    to_failed, slack, resub, process = [], [], [], []
    ok = True
    for k in failing:
        t, st = tasks[k], sim.task(k)
        if t["status"] != "failed" or len(st.runs) != 2:
            print(f"{k}: status {t['status']}, {len(st.runs)} runs (expected failed after 2)")
            ok = False
            continue
        end1, seen1, iv1 = run_figures(st.runs[0])
        resubmitted = sim.runs[st.runs[1]].submitted
        end2, seen2, iv2 = run_figures(st.runs[1])
        failed_at = t["finished_at"]
        to_failed.append(failed_at - end2)
        slack.append(failed_at - end2 - iv2)
        resub.append(resubmitted - seen1)
        process.append(failed_at - seen2)
        print(f"{k:<6} {seen1 - end1:>16.3f}s {resubmitted - seen1:>14.3f}s {iv1:>8.2f}s"
              f" {seen2 - end2:>16.3f}s {failed_at - seen2:>12.3f}s {failed_at - end2:>11.3f}s"
              f" {iv2:>8.2f}s")
    late = sum(sim.polls_after_final.values())
    if to_failed:
        print(f"run end -> task failed: mean {statistics.fmean(to_failed):.2f} s,"
              f" max {max(to_failed):.2f} s; (end -> failed) - interval: max {max(slack):+.3f} s"
              f" (goal: < +1 s)")
        print(f"Fail seen -> task failed: max {max(process) * 1000:.1f} ms;"
              f" Fail seen -> resubmitted: max {max(resub) * 1000:.1f} ms")
    print(f"polls of a run already seen ended: {late}; seeds: 20 min per failed run")
    return 0 if ok and late == 0 else 1


if __name__ == "__main__":
    sys.exit(main())

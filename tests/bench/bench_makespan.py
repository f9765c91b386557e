"""Makespan benchmark: a batch against the Coze simulator versus the ideal schedule.

    python -m tests.bench.bench_makespan            # 200 tasks (about a minute)
    python -m tests.bench.bench_makespan --quick    # 60 tasks
    python -m tests.bench.bench_makespan --scales --synthesis 0   # cold / warm / fixed 30 s
                                                    # at median run times 4 s, 30 s, 90 s, 10 min

Method (see tests/bench/README.md):

* Run times are drawn once from a fixed-seed lognormal (median 90 s, sigma 0.5 by default) and
  scripted into the simulator per task. Every policy sees the same draws.
* Time is *virtual*: the worker, the simulator, the rate limiter and the synthesis stub run in one
  event loop whose clock jumps to the next timer whenever the loop would otherwise sleep
  (:class:`VirtualLoop`). HTTP still goes over real loopback sockets, SQLite is a real file, and
  nothing is scaled: a 30 s poll interval is 30 s of virtual time, a 90 s run is 90 s. What costs
  real time (HTTP, SQLite, Python) costs zero virtual time, for the worker and the ideal alike.
* Synthesis is a stub that takes a fixed time (5 s by default; ``--synthesis 0`` skips the stage)
  with the configured 4 workers. The ideal schedule includes it.
* Ideal: list scheduling in task order on ``max_coze`` slots, every run noticed the instant it
  ends, then synthesis on ``max_synthesis`` workers in order of run end.
* Baseline: the seeds' fixed 30 s polling, i.e. ``PollPolicy(first=30, multiplier=1,
  maximum=30)`` (an interval pinned like this is never adapted by the worker).
* Warm (``--scales``): after a cold batch, a second batch (new draws, seed + 1) runs in a new
  loop with a new client, simulator and worker on the same SQLite file: a restart that keeps
  the run times learned in the store. Fixed 30 s runs the second batch's draws.
"""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import heapq
import math
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from pipeline.clock import Clock
from pipeline.config import PipelineConfig, PollPolicy
from pipeline.coze import CozeClient
from pipeline.ratelimit import RateLimiter
from pipeline.standins.simulator import CozeSimulator
from pipeline.worker import Worker
from storage import queue
from storage.db import open_db

EPOCH = 1_750_000_000.0


# ---- virtual time -------------------------------------------------------------------------

class VirtualLoop(asyncio.SelectorEventLoop):
    """An event loop whose clock jumps: when it would block for a timer, time advances instead.

    I/O is still real: before jumping, the selector is polled without blocking, and when only
    I/O can make progress (no timer pending) the loop blocks on it as usual. Work handed to a
    thread with ``run_in_executor`` (the worker's store calls) stops the clock too: while any is
    out, the loop blocks for real until it comes back, so a store write costs no virtual time.
    """

    def __init__(self) -> None:
        super().__init__()
        self._virtual = 0.0
        self._threads = 0
        real_select = self._selector.select

        def select(timeout: float | None = None):
            if timeout is None:
                return real_select(None)
            events = real_select(0)
            if events or timeout <= 0:
                return events
            if self._threads:   # a thread's answer wakes the selector through the self-pipe
                return real_select(None)
            self._virtual += timeout
            return []

        self._selector.select = select  # type: ignore[method-assign]

    def run_in_executor(self, executor, func, *args):
        fut = super().run_in_executor(executor, func, *args)
        self._threads += 1

        def done(_):
            self._threads -= 1

        fut.add_done_callback(done)
        return fut

    def time(self) -> float:
        return self._virtual


class LoopClock(Clock):
    """The pipeline's clock on top of the running loop's (virtual) time."""

    def __init__(self, loop: asyncio.AbstractEventLoop, epoch: float = EPOCH) -> None:
        self.loop = loop
        self.epoch = epoch

    def now(self) -> float:
        return self.epoch + self.loop.time()

    def monotonic(self) -> float:
        return self.loop.time()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(0.0, seconds))


def run_virtual(coro_factory) -> Any:
    loop = VirtualLoop()
    try:
        asyncio.set_event_loop(loop)
        return loop.run_until_complete(coro_factory(loop))
    finally:
        asyncio.set_event_loop(None)
        loop.close()


class FixedSynth:
    """Synthesis stub: ``seconds`` of clock time per task, ``workers`` at once."""

    def __init__(self, clock: Clock, seconds: float, workers: int) -> None:
        self.clock = clock
        self.seconds = seconds
        self.semaphore = asyncio.Semaphore(workers)

    async def run(self, batch_id: str, task_key: str, params: dict, coze_output: Any) -> dict:
        async with self.semaphore:
            await self.clock.sleep(self.seconds)
        return {"manifest": f"{task_key}.json"}

    def close(self) -> None:
        pass


# ---- workload and ideal -------------------------------------------------------------------

def draw_durations(n: int, *, seed: int, median: float, sigma: float) -> list[float]:
    rng = random.Random(seed)
    return [median * math.exp(rng.gauss(0.0, sigma)) for _ in range(n)]


def ideal_makespan(durations: list[float], slots: int, synth_workers: int,
                   synth_seconds: float) -> float:
    """List scheduling in task order; every run noticed the instant it ends."""
    free = [0.0] * slots
    ends = []
    for d in durations:
        start = heapq.heappop(free)
        ends.append(start + d)
        heapq.heappush(free, start + d)
    if synth_seconds <= 0:
        return max(ends)
    workers = [0.0] * synth_workers
    finish = 0.0
    for end in sorted(ends):
        start = max(end, heapq.heappop(workers))
        heapq.heappush(workers, start + synth_seconds)
        finish = max(finish, start + synth_seconds)
    return finish


# ---- one run ------------------------------------------------------------------------------

def base_config(poll: PollPolicy, synth_seconds: float, qps: float = 20.0,
                **overrides: Any) -> PipelineConfig:
    return dataclasses.replace(PipelineConfig(
        max_coze=16, max_synthesis=4, coze_qps=qps, lease_seconds=60.0, poll=poll,
        skip_synthesis=synth_seconds <= 0), **overrides)


def run_batch(config: PipelineConfig, durations: list[float], synth_seconds: float,
              workdir: Path, name: str, poll_target: float | None = None,
              store: str | None = None) -> dict[str, Any]:
    """Run one batch in virtual time, in a new worker process's worth of state (a new loop,
    client, simulator and worker); return its figures. ``store`` names the SQLite file (default:
    one of its own): a second batch on the same store is a restart that keeps what was learned."""
    keys = [f"{name}-{i:04d}" for i in range(len(durations))]
    by_key = dict(zip(keys, durations))
    db = open_db(workdir / f"{store or name}.db")
    wall = time.perf_counter()

    async def go(loop: asyncio.AbstractEventLoop) -> dict[str, Any]:
        clock = LoopClock(loop)
        sim = CozeSimulator(clock=clock, default_duration=lambda key: by_key[key])
        await sim.start()
        try:
            batch = queue.create_batch(db, [{"task_key": k, "params": {"topic": k}} for k in keys],
                                       now=clock.now(), source="cli")
            limiter = RateLimiter(config.coze_qps, clock, burst=max(1, int(config.coze_qps)))
            async with CozeClient(sim.base_url, sim.token, limiter=limiter) as coze:
                worker = Worker(db, config, coze, "wf-bench", clock=clock,
                                synthesizer=FixedSynth(clock, synth_seconds, config.max_synthesis))
                if poll_target is not None:
                    worker.poll_target = poll_target
                started = clock.now()
                await worker.run(drain=True)
            return {"sim": sim, "batch": batch, "started": started, "worker": worker}
        finally:
            await sim.stop()

    out = run_virtual(go)
    sim, batch, started = out["sim"], out["batch"], out["started"]
    rows = queue.tasks_of(db, batch)
    assert all(r["status"] == "succeeded" for r in rows), "every task should succeed"
    makespan = max(r["finished_at"] for r in rows) - started
    # detection delay: from the run's true end to the poll that saw it
    delays = []
    for r in rows:
        run = sim.runs[r["execute_id"]]
        seen = r["submitted_at"] + r["coze_seconds"]
        delays.append(seen - (run.submitted + run.duration))
    db.conn.close()
    n = len(rows)
    return {
        "name": name,
        "makespan": makespan,
        "calls_per_task": sim.total_requests / n,
        "submits_per_task": sum(t.submits for t in sim.tasks.values()) / n,
        "polls_per_task": sum(t.polls for t in sim.tasks.values()) / n,
        "late_polls": sum(sim.polls_after_final.values()),
        "peak_in_flight": sim.peak_in_flight,
        "max_rps": sim.max_rps(),
        "delay_mean": statistics.fmean(delays),
        "delay_p95": sorted(delays)[int(0.95 * (n - 1))],
        "wall": time.perf_counter() - wall,
    }


FIXED_30 = PollPolicy(first=30.0, multiplier=1.0, maximum=30.0)
SCALES = (4.0, 30.0, 90.0, 600.0)


def run_scales(args: argparse.Namespace, n: int) -> None:
    """Cold, warm (a second batch after a restart, same store) and fixed 30 s per median."""
    print(f"{n} tasks per batch, run times lognormal(sigma {args.sigma:g}), 16 in flight,"
          f" {args.qps:g} QPS, synthesis {args.synthesis:g} s; batch 1 seed {args.seed},"
          f" batch 2 seed {args.seed + 1}")
    print(f"{'median':>7} | {'cold ratio':>10} {'calls/task':>10} | {'warm ratio':>10}"
          f" {'calls/task':>10} {'delay p95':>9} | {'fixed 30 s':>10} {'calls/task':>10}"
          f" | {'wall':>5}")
    with tempfile.TemporaryDirectory(prefix="opsbot-bench-") as tmp:
        for median in args.scales:
            wall = time.perf_counter()
            first = draw_durations(n, seed=args.seed, median=median, sigma=args.sigma)
            second = draw_durations(n, seed=args.seed + 1, median=median, sigma=args.sigma)
            ideal1 = ideal_makespan(first, 16, 4, args.synthesis)
            ideal2 = ideal_makespan(second, 16, 4, args.synthesis)
            config = base_config(PollPolicy(), args.synthesis, args.qps)
            store = f"warm{median:g}"
            cold = run_batch(config, first, args.synthesis, Path(tmp), f"c{median:g}",
                             store=store)
            warm = run_batch(config, second, args.synthesis, Path(tmp), f"w{median:g}",
                             store=store)
            fixed = run_batch(base_config(FIXED_30, args.synthesis, args.qps), second,
                              args.synthesis, Path(tmp), f"f{median:g}")
            label = f"{median / 60:g} min" if median >= 60 else f"{median:g} s"
            print(f"{label:>7} | {cold['makespan'] / ideal1:>10.3f} {cold['calls_per_task']:>10.2f}"
                  f" | {warm['makespan'] / ideal2:>10.3f} {warm['calls_per_task']:>10.2f}"
                  f" {warm['delay_p95']:>8.2f}s | {fixed['makespan'] / ideal2:>10.3f}"
                  f" {fixed['calls_per_task']:>10.2f} | {time.perf_counter() - wall:>4.0f}s",
                  flush=True)
            for res in (cold, warm, fixed):
                if res["late_polls"]:
                    print(f"  !! {res['name']}: {res['late_polls']} polls of runs already"
                          f" seen ended")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.bench.bench_makespan",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="60 tasks instead of 200")
    ap.add_argument("--tasks", type=int, default=None)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--median", type=float, default=90.0, help="median run time, seconds")
    ap.add_argument("--sigma", type=float, default=0.5, help="lognormal sigma of run times")
    ap.add_argument("--synthesis", type=float, default=5.0,
                    help="seconds per synthesis job (0: skip the stage)")
    ap.add_argument("--qps", type=float, default=20.0,
                    help="Coze QPS budget (submits and polls), default 20")
    ap.add_argument("--sweep", action="store_true",
                    help="also run fixed 15/10/5 s polling and other adaptive targets")
    ap.add_argument("--scales", nargs="*", type=float, default=None, metavar="MEDIAN",
                    help="cold, warm (second batch after a restart on the same store) and fixed"
                         " 30 s polling per median run time (default: "
                         + " ".join(f"{m:g}" for m in SCALES) + ")")
    args = ap.parse_args(argv)
    n = args.tasks or (60 if args.quick else 200)
    if args.scales is not None:
        args.scales = args.scales or list(SCALES)
        run_scales(args, n)
        return 0
    durations = draw_durations(n, seed=args.seed, median=args.median, sigma=args.sigma)
    ideal = ideal_makespan(durations, 16, 4, args.synthesis)
    print(f"{n} tasks, run times lognormal(median {args.median:g} s, sigma {args.sigma:g}),"
          f" seed {args.seed}: mean {statistics.fmean(durations):.1f} s,"
          f" min {min(durations):.1f} s, max {max(durations):.1f} s;"
          f" 16 in flight, 4 synthesis workers x {args.synthesis:g} s, {args.qps:g} QPS")
    print(f"ideal makespan (list scheduling, every end noticed at once): {ideal:.1f} s")
    policies: list[tuple[str, PollPolicy, float | None]] = [
        (f"adaptive (default, target {Worker.poll_target:g})", PollPolicy(), None),
        ("fixed 30 s (seeds)", FIXED_30, None)]
    if args.sweep:
        policies += [(f"fixed {s:g} s", PollPolicy(first=s, multiplier=1.0, maximum=s), None)
                     for s in (15.0, 10.0, 5.0)]
        policies += [(f"adaptive, target {t:g}", PollPolicy(), t) for t in (0.02, 0.05)]
        policies += [(f"adaptive, target {t:g}, max {m:g} s", PollPolicy(maximum=m), t)
                     for t, m in ((0.1, 30.0), (0.2, 60.0))]
    print(f"{'policy':<32} {'makespan':>9} {'ratio':>6} {'calls/task':>10} {'polls/task':>10}"
          f" {'delay mean':>10} {'delay p95':>9} {'peak':>4} {'max rps':>7} {'wall':>6}")
    with tempfile.TemporaryDirectory(prefix="opsbot-bench-") as tmp:
        for i, (label, poll, target) in enumerate(policies):
            res = run_batch(base_config(poll, args.synthesis, args.qps), durations, args.synthesis,
                            Path(tmp), f"p{i}", poll_target=target)
            print(f"{label:<32} {res['makespan']:>8.1f}s {res['makespan'] / ideal:>6.3f}"
                  f" {res['calls_per_task']:>10.2f} {res['polls_per_task']:>10.2f}"
                  f" {res['delay_mean']:>9.2f}s {res['delay_p95']:>8.2f}s"
                  f" {res['peak_in_flight']:>4} {res['max_rps']:>7} {res['wall']:>5.1f}s",
                  flush=True)
            if res["late_polls"]:
                print(f"  !! {res['late_polls']} polls of runs already seen ended")
    return 0


if __name__ == "__main__":
    sys.exit(main())

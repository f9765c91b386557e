"""Scale-out benchmark: 1, 2 and 3 ``opsbot worker`` processes sharing one store and Coze.

    python -m tests.bench.bench_scale               # 90 tasks per run (about 4 min)
    python -m tests.bench.bench_scale --quick       # 36 tasks per run
    python -m tests.bench.bench_scale --synthesis 0 # the Coze stage alone
    python -m tests.bench.bench_scale --db pg       # on a throwaway PostgreSQL server
    python -m tests.bench.bench_scale --db postgresql://USER@HOST/DB   # on that server

Not a test: pytest never collects it (``bench_*.py``); it prints a table and asserts nothing
about speed.

**Setup.** One Coze simulator (``python -m pipeline.standins.simulator``, its own process) holds
three Coze accounts, three API tokens, each with a limit of ``--account-runs`` runs in flight
(4) and ``--account-qps`` requests per second (10); the simulator refuses more (code 4009 for
runs, HTTP 429 / 4020 for requests) and records, per token, the most runs in flight and the most
requests in any second. Tasks are spread evenly over three pipelines (``[[pipelines]]``), one
per account (``[coze.accounts.NAME]``). For each N in 1, 2, 3 the script starts N ``opsbot
worker`` processes (``python -m bot.ops.cli worker``: separate processes, each with its own
worker identity), all on one fresh store (a SQLite file by default; ``--db`` for PostgreSQL, a
fresh database per run), waits until all N have registered in the store, then queues the tasks
and times them from the moment they are queued to the last task's ``finished_at``. Run times are
drawn once, uniform in 1-3 s (``--seed``), and scripted per task, so every N sees the same work.

**What grows with workers.** The Coze limits do not: each account's run limit is counted across
every process on the store and its QPS budget is shared through the store, so one process can
already use what an account allows, and N processes together never use more (the table shows
both). What each process adds is its own synthesis slots: ``pipeline.max_synthesis`` (2 here)
jobs at once per process. The synthesis step is a stand-in that waits ``--synthesis`` seconds
(2) and uses almost no CPU, as a render on CPUs other than this 2-core machine's would, so the
number of processes, not this machine, bounds it. Throughput is then about
``min(N x max_synthesis / seconds, what the accounts' runs allow)``: it grows with workers until
the accounts are the bound. ``--synthesis 0`` skips synthesis and measures the Coze stage alone.

With settings that do not know ``[coze.accounts.NAME]`` / ``[[pipelines]]`` (before the many-
pipelines work), the script says so and falls back to what exists: one account (one token with
the same limits) and one pipeline, where ``pipeline.max_coze`` is the account's run limit
across every process on the store. ``--accounts 1`` forces this mode.

Columns: wall = first task queued -> last task finished; in flight = sum of the run times / wall
(the mean number of runs Coze was executing); synth = synthesis jobs x their seconds / wall (the
mean number of jobs at once); per account: the most runs in flight the simulator
saw (its limit in brackets), the most requests in any 1 s window (the QPS limit in brackets),
and the requests it refused (429: over QPS, 4009: over the run limit). "dup" counts tasks whose
workflow was submitted more than once.
"""
from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from storage import queue
from storage import workers as stored_workers
from storage.db import open_db

ROOT = Path(__file__).resolve().parents[2]
ACCOUNTS = (("studio", "drama"), ("agency", "ads"), ("newsroom", "news"))  # (account, pipeline)


@dataclass
class Run:
    workers: int
    tasks: int
    wall: float
    busy: float                    # sum of the run times
    synth_busy: float              # synthesis jobs x their seconds of waiting
    accounts: dict                 # token -> the simulator's record of it
    succeeded: int
    duplicates: int
    mode: str


def token_of(account: str) -> str:
    return f"pat_bench_{account}"


def accounts_supported(tmp: Path) -> str:
    """"" when bot.settings reads named Coze accounts and several pipelines, else why not."""
    from bot.settings import load_settings

    cfg = tmp / "probe.toml"
    cfg.write_text(_pipelines_toml("http://127.0.0.1:9", 4, 10.0), encoding="utf-8")
    try:
        settings = load_settings({"OPSBOT_CONFIG": str(cfg), "COZE_API_TOKEN": "pat_probe"})
        names = {getattr(spec, "name", None) for spec in getattr(settings, "pipelines", ())}
    except Exception as exc:  # noqa: BLE001 - any refusal means: not supported here
        return f"the settings refuse it ({type(exc).__name__}: {exc})"
    wanted = {pipeline for _, pipeline in ACCOUNTS}
    if not wanted <= names:
        return "the settings ignore [coze.accounts.NAME] / [[pipelines]]"
    if "pipeline" not in inspect.signature(queue.create_batch).parameters:
        return "batches carry no pipeline"
    return ""


def _pipelines_toml(base_url: str, runs: int, qps: float) -> str:
    lines = []
    for account, pipeline in ACCOUNTS:
        lines += [f"[coze.accounts.{account}]", f'api_token = "{token_of(account)}"',
                  f'base_url = "{base_url}"', f"max_runs = {runs}", f"qps = {qps:g}", ""]
    for account, pipeline in ACCOUNTS:
        lines += ["[[pipelines]]", f'name = "{pipeline}"', f'workflow_id = "wf-{pipeline}"',
                  f'coze_account = "{account}"', ""]
    return "\n".join(lines)


def synthesis_command(seconds: float) -> str:
    """A synthesis step that takes ``seconds`` of wall time and almost no CPU, then writes its
    result: a stand-in for a render done by CPUs this machine does not have."""
    code = (f"import json, sys, time; time.sleep({seconds:g}); "
            f"json.dump({{'seconds': {seconds:g}}}, open(sys.argv[1], 'w'))")
    return f'{sys.executable} -c "{code}" {{output}}'


def write_config(path: Path, *, mode: str, base_url: str, max_coze: int, runs: int, qps: float,
                 out: Path, synthesis: float, max_synthesis: int) -> None:
    if synthesis > 0:
        synth = (f"max_synthesis = {max_synthesis}\n"
                 f"synthesis_command = {json.dumps(synthesis_command(synthesis))}\n")
    else:
        synth = "skip_synthesis = true\n"
    text = (f"[pipeline]\nmax_coze = {max_coze}\ncoze_qps = {qps:g}\n{synth}"
            f"idle_interval = 0.05\nlease_seconds = 30\noutput_dir = \"{out}\"\n\n")
    if mode == "accounts":
        text += _pipelines_toml(base_url, runs, qps)
    path.write_text(text, encoding="utf-8")


def worker_env(db: str, base_url: str, config: Path, mode: str) -> dict:
    """The workers' environment: nothing of this shell's opsbot settings. One account: the
    single-pipeline variables. Three: the TOML names accounts and pipelines, and no
    COZE_WORKFLOW_ID, which would add a pipeline ``default`` on the default account."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("FEISHU_", "COZE_", "OPSBOT_", "BITABLE_"))}
    env.update(OPSBOT_DB=db, OPSBOT_CONFIG=str(config), COZE_BASE_URL=base_url,
               PYTHONPATH=str(ROOT))
    if mode == "single":
        env.update(COZE_API_TOKEN=token_of(ACCOUNTS[0][0]),
                   COZE_WORKFLOW_ID=f"wf-{ACCOUNTS[0][1]}")
    return env


def start_simulator(tokens: list[str], runs: int, qps: float, script: Path,
                    log: Path) -> tuple[subprocess.Popen, str]:
    first, *others = tokens
    cmd = [sys.executable, "-m", "pipeline.standins.simulator", "--port", "0",
           "--script", str(script), "--token", first, "--max-runs", str(runs),
           "--qps", f"{qps:g}"]
    for token in others:
        cmd += ["--account", f"{token}:{runs}:{qps:g}"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=log.open("w"),
                            text=True)
    line = proc.stdout.readline().strip()
    if not line.startswith("listening "):
        proc.kill()
        raise SystemExit(f"the simulator did not start: {line!r} {log.read_text()[-2000:]}")
    return proc, line.split()[1]


def sim_stats(base_url: str) -> dict:
    with urllib.request.urlopen(base_url + "/_sim/stats", timeout=30) as resp:
        return json.load(resp)


def wait_for(predicate, timeout: float, what: str, pause: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(pause)
    raise SystemExit(f"timed out after {timeout:.0f} s waiting for {what}")


def one_run(n: int, *, mode: str, durations: dict[str, float], db_location: str, tmp: Path,
            max_coze: int, runs: int, qps: float, synthesis: float, max_synthesis: int) -> Run:
    accounts = ACCOUNTS if mode == "accounts" else ACCOUNTS[:1]
    tokens = [token_of(a) for a, _ in accounts]
    script = tmp / f"sim-{n}.json"
    script.write_text(json.dumps({"tasks": {k: {"duration": d} for k, d in durations.items()}}))
    sim, base_url = start_simulator(tokens, runs, qps, script, tmp / f"sim-{n}.log")
    procs: list[subprocess.Popen] = []
    logs = []
    try:
        config = tmp / f"opsbot-{n}.toml"
        write_config(config, mode=mode, base_url=base_url, max_coze=max_coze, runs=runs,
                     qps=qps, out=tmp / "out", synthesis=synthesis, max_synthesis=max_synthesis)
        db = open_db(db_location)
        env = worker_env(db_location, base_url, config, mode)
        for i in range(n):
            log = tmp / f"worker-{n}-{i}.log"
            logs.append(log)
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "bot.ops.cli", "--log-level", "WARNING", "worker"],
                cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=log.open("w")))

        def registered():
            for proc, log in zip(procs, logs):
                if proc.poll() is not None:
                    raise SystemExit(f"a worker exited ({proc.returncode}):\n"
                                     f"{log.read_text()[-3000:]}")
            return len(stored_workers.live(db, now=time.time(), within=60)) >= n

        wait_for(registered, 120, f"{n} workers to register")
        keys = list(durations)
        batches = []
        queued_at = time.time()
        for index, (account, pipeline) in enumerate(accounts):
            mine = keys[index::len(accounts)]
            extra = {"pipeline": pipeline} if mode == "accounts" else {}
            batches.append(queue.create_batch(
                db, [{"task_key": k, "params": {}} for k in mine], now=queued_at, source="cli",
                workflow_id=f"wf-{pipeline}", **extra))

        def finished():
            for proc, log in zip(procs, logs):
                if proc.poll() is not None:
                    raise SystemExit(f"a worker exited ({proc.returncode}):\n"
                                     f"{log.read_text()[-3000:]}")
            rows = [t for b in batches for t in queue.tasks_of(db, b)]
            done = [t for t in rows if t["status"] in queue.FINAL]
            return rows if len(done) == len(rows) else None

        rows = wait_for(finished, 1800, "the tasks to finish", pause=0.25)
        stats = sim_stats(base_url)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc, log in zip(procs, logs):
            try:
                if proc.wait(60) != 0:
                    print(f"worker exited {proc.returncode}: {log.read_text()[-1500:]}",
                          file=sys.stderr)
            except subprocess.TimeoutExpired:
                proc.kill()
        sim.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            sim.wait(10)
    wall = max(t["finished_at"] for t in rows) - queued_at
    duplicates = sum(1 for k in durations if stats["tasks"].get(k, {}).get("submits", 0) > 1)
    return Run(workers=n, tasks=len(rows), wall=wall,
               busy=sum(r["duration"] for r in stats["runs"].values()),
               synth_busy=synthesis * sum(1 for t in rows if t["status"] == "succeeded"),
               accounts={t: stats["accounts"][t] for t in tokens},
               succeeded=sum(1 for t in rows if t["status"] == "succeeded"),
               duplicates=duplicates, mode=mode)


def fresh_store(tmp: Path, n: int, server: str | None) -> str:
    """A SQLite file of its own, or an empty database on the PostgreSQL ``server``."""
    if server is None:
        return str(tmp / f"scale-{n}.db")
    from tests.pg_server import fresh_database
    return fresh_database(server)


def print_table(results: list[Run], runs: int, qps: float) -> None:
    base = results[0].tasks / results[0].wall
    head = (f"{'workers':>7} {'tasks':>5} {'wall':>7} {'tasks/min':>9} {'speed-up':>8} "
            f"{'in flight':>9} {'synth':>5}  per account: max runs in flight [{runs}], "
            f"max req/s [{qps:g}], refused 429 / 4009")
    print(head)
    for r in results:
        per = "  ".join(
            f"{name}: {a['max_concurrent']:>2} {a['max_rps']:>3} {a['refused_qps']}/"
            f"{a['refused_run_limit']}" for name, a in
            ((t.removeprefix("pat_bench_"), a) for t, a in r.accounts.items()))
        rate = r.tasks / r.wall
        print(f"{r.workers:>7} {r.tasks:>5} {r.wall:>6.1f}s {rate * 60:>9.1f} "
              f"{rate / base:>7.2f}x {r.busy / r.wall:>9.2f} {r.synth_busy / r.wall:>5.2f}  {per}"
              + (f"  ({r.tasks - r.succeeded} not succeeded)" if r.succeeded != r.tasks else "")
              + (f"  dup {r.duplicates}" if r.duplicates else ""))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.bench.bench_scale",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="36 tasks per run")
    ap.add_argument("--tasks", type=int, default=None, help="tasks per run (default 90)")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--accounts", type=int, choices=(1, 3), default=None,
                    help="3: three accounts and pipelines (default when the settings know "
                         "them), 1: one account")
    ap.add_argument("--account-runs", type=int, default=4, help="each account's run limit")
    ap.add_argument("--account-qps", type=float, default=10.0, help="each account's QPS limit")
    ap.add_argument("--max-coze", type=int, default=4,
                    help="pipeline.max_coze: the default account's run limit (with one "
                         "account, that account's)")
    ap.add_argument("--synthesis", type=float, default=2.0,
                    help="seconds each synthesis job waits (0: synthesis skipped)")
    ap.add_argument("--max-synthesis", type=int, default=2,
                    help="pipeline.max_synthesis: synthesis jobs at once per process")
    ap.add_argument("--db", default="sqlite",
                    help="sqlite (default), pg (a throwaway PostgreSQL server), or a "
                         "postgresql:// URL whose user may create databases")
    ap.add_argument("--seed", type=int, default=11)
    args = ap.parse_args(argv)
    n_tasks = args.tasks or (36 if args.quick else 90)
    rng = random.Random(args.seed)
    durations = {f"s{i:03d}": round(rng.uniform(1.0, 3.0), 3) for i in range(n_tasks)}

    with tempfile.TemporaryDirectory(prefix="opsbot-bench-scale-") as tmp_name:
        tmp = Path(tmp_name)
        why_not = accounts_supported(tmp)
        mode = "accounts" if args.accounts in (None, 3) and not why_not else "single"
        if args.accounts == 3 and why_not:
            print(f"three accounts asked for, but {why_not}", file=sys.stderr)
            return 2
        server, pg = None, None
        if args.db == "pg":
            from tests.pg_server import Server
            pg = Server()
            server = pg.start()
        elif args.db.startswith("postgresql://"):
            server = args.db
        elif args.db != "sqlite":
            ap.error("--db: sqlite, pg or a postgresql:// URL")
        try:
            if mode == "single":
                print("one account, one pipeline: " + (
                    f"named accounts and several pipelines are not available here ({why_not})"
                    if why_not else "--accounts 1"))
            else:
                print("three accounts, three pipelines (one per account), tasks spread evenly")
            print(f"{n_tasks} tasks, run times uniform 1-3 s (mean "
                  f"{sum(durations.values()) / n_tasks:.2f} s, seed {args.seed}); each account: "
                  f"{args.account_runs} runs, {args.account_qps:g} QPS; pipeline.max_coze "
                  f"{args.max_coze}; store: "
                  f"{'SQLite file' if server is None else 'PostgreSQL'}; synthesis: "
                  + (f"{args.synthesis:g} s of waiting per task, {args.max_synthesis} at once per "
                     f"process" if args.synthesis > 0 else "skipped")
                  + f"; {os.cpu_count()} cores")
            results = []
            for n in args.workers:
                location = fresh_store(tmp, n, server)
                results.append(one_run(n, mode=mode, durations=durations, db_location=location,
                                       tmp=tmp, max_coze=args.max_coze, runs=args.account_runs,
                                       qps=args.account_qps, synthesis=args.synthesis,
                                       max_synthesis=args.max_synthesis))
                print(f"  {n} worker(s): {results[-1].wall:.1f} s", file=sys.stderr, flush=True)
            print_table(results, args.account_runs, args.account_qps)
        finally:
            if pg is not None:
                pg.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())

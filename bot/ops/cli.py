"""The ``opsbot`` console script: the entry point that builds Settings once and passes them down.

Subcommands: serve, worker, run, report, demo, doctor (see ``opsbot --help``). Exit codes: 0 ok,
1 the work ran but something failed (e.g. tasks failed), 2 bad usage or configuration.
"""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import sys
from pathlib import Path
from typing import Sequence

from bot.settings import Settings, SettingsError, load_settings


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="opsbot",
        description="Feishu chatbot that runs batches of Coze workflows. Configuration comes from "
                    "environment variables (see README) and the TOML file named by OPSBOT_CONFIG.")
    p.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING (default INFO)")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    s = sub.add_parser("serve", help="development web server (production: gunicorn, see Procfile)")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)

    w = sub.add_parser("worker", help="run the pipeline worker, outbox sender and scheduler")
    w.add_argument("--drain", action="store_true",
                   help="exit once nothing is queued or in flight")
    w.add_argument("--simulate", action="store_true",
                   help="use the built-in Coze simulator (no Coze account needed)")
    w.add_argument("--stages", type=_stages, default=None, metavar="STAGES",
                   help="only these stages: coze, synthesis or both, comma-separated "
                        "(default all); e.g. synthesis workers on machines with CPU to spare")

    r = sub.add_parser("run", help="run one batch from a CSV or JSONL file, with a progress bar")
    r.add_argument("file", help="CSV or JSONL with a task_id column; other columns are parameters")
    r.add_argument("--include", nargs="+", metavar="ID", help="only these task ids")
    r.add_argument("--exclude", nargs="+", metavar="ID", help="skip these task ids")
    r.add_argument("--results", default=None, metavar="PATH",
                   help="results JSON path (default var/results/<batch>.json)")
    r.add_argument("--config", default=None, metavar="JSON",
                   help="the seeds' JSON config (workflow_config.coze_config...)")
    r.add_argument("--max-coze", type=_positive, default=None, help="Coze runs in flight (16)")
    r.add_argument("--max-synthesis", type=_positive, default=None,
                   help="synthesis jobs at once (4)")
    r.add_argument("--skip-synthesis", action="store_true", help="stop after the Coze stage")
    r.add_argument("--simulate", action="store_true",
                   help="use the built-in Coze simulator (no Coze account needed)")
    r.add_argument("--pipeline", default=None, metavar="NAME",
                   help="the pipeline (workflow, Coze account) to run it on; default: the "
                        "default pipeline, or the only one")

    rep = sub.add_parser("report", help="the daily report, printed or sent to the alert chat")
    rep.add_argument("--date", default=None, metavar="YYYY-MM-DD",
                     help="the day to report (default yesterday)")
    rep.add_argument("--send", action="store_true", help="send it to FEISHU_ALERT_CHAT_ID")
    rep.add_argument("--pipeline", default=None, metavar="NAME",
                     help="that pipeline's batches only (sent to its alert chat)")

    sub.add_parser("demo", help="the whole loop on this machine with built-in simulators")
    sub.add_parser("doctor", help="check configuration, database, Feishu and Coze")
    return p


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _stages(text: str) -> frozenset[str]:
    from pipeline.worker import parse_stages

    try:
        return parse_stages(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def main(argv: Sequence[str] | None = None, env: dict | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not args.command:
        build_parser().print_help()
        return 2
    from bot.logs import setup_logging

    setup_logging(args.log_level)
    try:
        settings = load_settings(env if env is not None else os.environ)
    except SettingsError as exc:
        print(f"opsbot: configuration error: {exc}", file=sys.stderr)
        return 2
    from bot.logs import register_settings_secrets

    register_settings_secrets(settings)
    handler = globals()[f"cmd_{args.command}"]
    try:
        return handler(settings, args)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130


def cmd_serve(settings: Settings, args: argparse.Namespace) -> int:
    from bot.app import create_app

    create_app(settings).run(host=args.host, port=args.port, threaded=True)
    return 0


def cmd_worker(settings: Settings, args: argparse.Namespace) -> int:
    from bot.service import coze_problem, run_worker

    stages = args.stages or frozenset(("coze", "synthesis"))
    problem = coze_problem(settings) if "coze" in stages and not args.simulate else None
    if problem:
        hint = ("set COZE_API_TOKEN and COZE_WORKFLOW_ID" if not settings.many_pipelines
                else "see [[pipelines]] in the README")
        print(f"opsbot worker: {problem} ({hint}), or add --simulate to use the built-in "
              "simulator (`opsbot demo` shows the whole loop)", file=sys.stderr)
        return 2

    simulator = None
    if args.simulate:
        from pipeline.standins.simulator import CozeSimulator

        simulator = CozeSimulator(default_duration=1.0, seed=1)
    return asyncio.run(run_worker(settings, drain=args.drain, simulator=simulator,
                                  stages=stages))


def cmd_run(settings: Settings, args: argparse.Namespace) -> int:
    from pipeline.batchfile import BatchFileError, read_batch_file, select
    from pipeline.runner import run_batch, seeds_config, summary_table
    from storage.db import open_db

    try:
        tasks = select(read_batch_file(args.file), args.include, args.exclude)
        seeds = seeds_config(args.config) if args.config else {}
    except BatchFileError as exc:
        print(f"opsbot run: {exc}", file=sys.stderr)
        return 2
    if not tasks:
        print("opsbot run: nothing to run after --include/--exclude", file=sys.stderr)
        return 2
    names = ", ".join(s.name for s in settings.pipelines)
    spec = settings.find_pipeline(args.pipeline) if args.pipeline else settings.default_pipeline
    if spec is None:
        print(f"opsbot run: " + (f"no pipeline is called {args.pipeline!r}" if args.pipeline
                                 else "there are several pipelines: pass --pipeline NAME")
              + f" (pipelines: {names})", file=sys.stderr)
        return 2
    settings = settings.scoped(spec.name)     # its workflow, account, limits and fallback
    account = settings.account(spec.coze_account)
    on_account = tuple(s.name for s in settings.pipelines if s.coze_account == account.name)
    pipeline = settings.pipeline
    changes = {}
    if args.max_coze or seeds.get("max_coze"):
        changes["max_coze"] = args.max_coze or seeds["max_coze"]
    if args.max_synthesis or seeds.get("max_synthesis"):
        changes["max_synthesis"] = args.max_synthesis or seeds["max_synthesis"]
    if args.skip_synthesis:
        changes["skip_synthesis"] = True
    if seeds.get("poll_first"):
        # The seeds polled at a fixed interval; keep it as the cap of the adaptive schedule.
        changes["poll"] = dataclasses.replace(pipeline.poll, maximum=seeds["poll_first"])
    pipeline = dataclasses.replace(pipeline, **changes)
    token = settings.coze.api_token.get() or seeds.get("token", "")
    workflow_id = settings.coze.workflow_id or seeds.get("workflow_id", "")
    db = open_db(settings.db_path)

    async def go() -> int:
        base_url = settings.coze.base_url
        sim = None
        nonlocal token, workflow_id
        if args.simulate:
            from pipeline.standins.simulator import CozeSimulator

            sim = CozeSimulator(default_duration=0.5, seed=1)
            base_url = await sim.start()
            token, workflow_id = sim.token, workflow_id or "sim-workflow"
        elif not token or not workflow_id:
            print("opsbot run: no Coze account configured: set COZE_API_TOKEN and "
                  "COZE_WORKFLOW_ID (or pass --config with the seeds' JSON), or add --simulate "
                  "to use the built-in simulator", file=sys.stderr)
            return 2
        try:
            results_hint = Path(args.results) if args.results else None
            result = await run_batch(
                db, pipeline, tasks=tasks, coze_base_url=base_url, coze_token=token,
                workflow_id=workflow_id,
                results_path=results_hint or Path("var/results/pending.json"),
                pipeline=spec.name, account=account.name, account_pipelines=on_account,
                breaker_service=account.breaker_service)
        finally:
            if sim is not None:
                await sim.stop()
        path = result.results_path
        if results_hint is None:
            path = Path("var/results") / f"{result.batch_id}.json"
            result.results_path.replace(path)
        print(summary_table(db, result.batch_id))
        print(f"results: {path}")
        return result.exit_code

    return asyncio.run(go())


def cmd_report(settings: Settings, args: argparse.Namespace) -> int:
    from bot.ops.report_cli import run_report

    return run_report(settings, date=args.date, send=args.send, pipeline=args.pipeline)


def cmd_demo(settings: Settings, args: argparse.Namespace) -> int:
    from bot.ops.demo import run_demo

    return run_demo(settings)


def cmd_doctor(settings: Settings, args: argparse.Namespace) -> int:
    from bot.ops.doctor import run_doctor

    return run_doctor(settings)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

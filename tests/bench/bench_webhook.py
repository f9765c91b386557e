"""Webhook load benchmark: opsbot under gunicorn vs a minimal lark-oapi Flask handler.

    python -m tests.bench.bench_webhook            # 2,000 events per server
    python -m tests.bench.bench_webhook --quick    # 300 events per server

Both servers run under gunicorn with the Procfile's settings (2 workers, 4 threads each) on a
loopback port. opsbot gets a temporary SQLite file and the fake Feishu; by default it runs as deployed (the web
process verifies, decrypts, dedups and records; no worker runs here), and with ``--web-dispatch``
its in-web dispatcher also answers every message; the baseline is ``tests/bench/baseline_app.py`` (lark-oapi's
``EventDispatcherHandler``, a handler that does nothing). A second process builds every request
first (signed + encrypted ``im.message.receive_v1``, distinct message ids, so opsbot records
each one), then sends them over ``--connections`` keep-alive connections as fast as the server
answers, and reports throughput and latency. Goal: opsbot p99 < 100 ms and throughput within
80 % of the baseline's, while it does dedup and recording.
"""
from __future__ import annotations

import argparse
import http.client
import json
import multiprocessing as mp
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ENCRYPT_KEY = "bench-encrypt-key"
TOKEN = "bench-verification-token"
GUNICORN_ARGS = ["-w", "2", "--threads", "4", "--timeout", "30", "--graceful-timeout", "2"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_gunicorn(target: str, env_extra: dict[str, str]) -> tuple[subprocess.Popen, int]:
    port = free_port()
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("FEISHU_", "OPSBOT_", "BITABLE_", "COZE_"))}
    env.update(env_extra, PYTHONPATH=str(ROOT))
    gunicorn = Path(sys.executable).with_name("gunicorn")
    proc = subprocess.Popen([str(gunicorn), *GUNICORN_ARGS, "-b", f"127.0.0.1:{port}", target],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
            conn.request("GET", "/healthz")
            if conn.getresponse().status == 200:
                return proc, port
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise SystemExit(f"gunicorn {target} did not start")


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()


# --- the load process -------------------------------------------------------------------------

def build_requests(n: int, prefix: str) -> list[tuple[bytes, dict[str, str]]]:
    sys.path.insert(0, str(ROOT))
    from tests.helpers import message_event, signed_event
    out = []
    for i in range(n):
        event = message_event("help", message_id=f"om_{prefix}_{i}", event_id=f"ev_{prefix}_{i}",
                              token=TOKEN)
        out.append(signed_event(event, encrypt_key=ENCRYPT_KEY))
    return out


def drive(port: int, n: int, connections: int, prefix: str, results: mp.Queue) -> None:
    """Runs in a second process: send ``n`` requests over ``connections`` connections."""
    reqs = build_requests(n, prefix)
    warm = build_requests(connections * 5, prefix + "w")
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    lock = threading.Lock()
    it = iter(range(n))

    def worker(items) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        local, codes = [], {}
        for body, headers in items:
            t0 = time.perf_counter()
            conn.request("POST", "/webhook/event", body=body, headers=headers)
            resp = conn.getresponse()
            resp.read()
            local.append(time.perf_counter() - t0)
            codes[resp.status] = codes.get(resp.status, 0) + 1
        conn.close()
        with lock:
            latencies.extend(local)
            for k, v in codes.items():
                statuses[k] = statuses.get(k, 0) + v

    def run(batch) -> float:
        shards = [batch[i::connections] for i in range(connections)]
        threads = [threading.Thread(target=worker, args=(s,)) for s in shards]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return time.perf_counter() - t0

    run(warm)                     # connections, imports, first-request costs
    latencies.clear()
    statuses.clear()
    elapsed = run(reqs)
    results.put({"elapsed": elapsed, "latencies": latencies, "statuses": statuses})


def measure(port: int, n: int, connections: int, prefix: str) -> dict:
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    proc = ctx.Process(target=drive, args=(port, n, connections, prefix, results))
    proc.start()
    out = results.get(timeout=600)
    proc.join(30)
    lat = sorted(out["latencies"])
    return {"n": len(lat), "rps": len(lat) / out["elapsed"],
            "p50": 1000 * statistics.median(lat),
            "p99": 1000 * lat[min(len(lat) - 1, int(0.99 * len(lat)))],
            "max": 1000 * lat[-1], "statuses": out["statuses"]}


def show(name: str, r: dict) -> None:
    print(f"{name:<10} {r['n']:>6} req  {r['rps']:>8.0f} req/s  p50 {r['p50']:6.1f} ms  "
          f"p99 {r['p99']:6.1f} ms  max {r['max']:6.1f} ms  statuses {r['statuses']}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.bench_webhook")
    parser.add_argument("--events", type=int, default=2000)
    parser.add_argument("--connections", type=int, default=4)
    parser.add_argument("--quick", action="store_true", help="300 events per server")
    parser.add_argument("--web-dispatch", action="store_true",
                        help="OPSBOT_WEB_DISPATCH=1: the web process also answers every command "
                             "(default: it verifies, dedups and records; the worker answers)")
    args = parser.parse_args(argv)
    n = 300 if args.quick else args.events
    sys.path.insert(0, str(ROOT))
    from storage.db import open_db
    from tests.fake_feishu import FakeFeishu

    print(f"{n} signed+encrypted im.message.receive_v1 events per server, "
          f"{args.connections} keep-alive connections from a second process; "
          f"gunicorn {' '.join(GUNICORN_ARGS[:4])}; {os.cpu_count()} CPUs")
    with FakeFeishu() as fake, tempfile.TemporaryDirectory() as tmp:
        db_file = Path(tmp) / "bench.db"
        proc, port = start_gunicorn("bot.app:create_app()", {
            "FEISHU_APP_ID": fake.app_id, "FEISHU_APP_SECRET": fake.app_secret,
            "FEISHU_DOMAIN": fake.base_url, "FEISHU_VERIFICATION_TOKEN": TOKEN,
            "FEISHU_ENCRYPT_KEY": ENCRYPT_KEY, "OPSBOT_DB": str(db_file),
            "OPSBOT_WEB_DISPATCH": "1" if args.web_dispatch else "0"})
        try:
            opsbot = measure(port, n, args.connections, "ops")
        finally:
            time.sleep(1.0)
            stop(proc)
        db = open_db(db_file, migrate=False)
        recorded = db.execute("SELECT COUNT(*) FROM inbox WHERE key LIKE 'msg:om_ops_%'"
                              " AND key NOT LIKE 'msg:om_opsw_%'").fetchone()[0]
        handled = db.execute("SELECT COUNT(*) FROM inbox WHERE status = 'done'").fetchone()[0]
        replies = db.execute("SELECT COUNT(*) FROM outbox WHERE kind = 'reply'").fetchone()[0]
        db.conn.close()
        proc, port = start_gunicorn("tests.bench.baseline_app:create_app()", {
            "BASELINE_ENCRYPT_KEY": ENCRYPT_KEY, "BASELINE_VERIFICATION_TOKEN": TOKEN})
        try:
            baseline = measure(port, n, args.connections, "base")
        finally:
            stop(proc)
    show("opsbot", opsbot)
    show("baseline", baseline)
    ratio = opsbot["rps"] / baseline["rps"]
    print(f"opsbot recorded {recorded}/{n} events in its inbox (dedup key message_id); "
          f"handled by its dispatchers by the end: {handled} rows, {replies} replies queued")
    print(f"throughput ratio opsbot/baseline {ratio:.0%} (goal >= 80%); "
          f"opsbot p99 {opsbot['p99']:.1f} ms (goal < 100 ms)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

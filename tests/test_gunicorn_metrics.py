"""Real gunicorn with two web workers and the Procfile's config: the process-measured metrics
(webhook requests and latency) add up over the workers, whichever worker answers a scrape,
stale samples of an earlier run are wiped on start, and a worker's death does not make them fall.

Which worker answered is read from gunicorn's access log (``%(p)s`` is the worker's pid)."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from tests.test_gunicorn import free_port
from tests.test_metrics import parse

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]

STALE = """
from bot.metrics import WEBHOOK_LATENCY, WEBHOOK_REQUESTS
for _ in range(7):
    WEBHOOK_LATENCY.observe(0.001)
    WEBHOOK_REQUESTS.labels(status="400").inc()
"""


def _env(tmp_path: Path, prom_dir: Path) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("FEISHU_", "OPSBOT_", "BITABLE_", "COZE_", "PROMETHEUS_",
                                "prometheus_"))}
    env.update({"OPSBOT_DB": str(tmp_path / "opsbot.db"), "PYTHONPATH": str(ROOT),
                "PROMETHEUS_MULTIPROC_DIR": str(prom_dir)})
    return env


@pytest.fixture()
def web(tmp_path):
    prom_dir = tmp_path / "prom"
    prom_dir.mkdir()
    env = _env(tmp_path, prom_dir)
    # a previous run's samples: must not be counted
    subprocess.run([sys.executable, "-c", STALE], cwd=ROOT, env=env, check=True)
    assert list(prom_dir.glob("*.db"))
    port = free_port()
    access = tmp_path / "access.log"
    gunicorn = Path(sys.executable).with_name("gunicorn")
    proc = subprocess.Popen(
        [str(gunicorn), "-c", "python:bot.web.gunicorn_conf", "-w", "2", "-b", f"127.0.0.1:{port}",
         "--graceful-timeout", "2", "--logger-class", "gunicorn.glogging.Logger",
         "--access-logfile", str(access), "--access-logformat", "%(p)s %(U)s %(s)s",
         "bot.app:create_app()"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            if requests.get(base + "/healthz", timeout=1).status_code == 200:
                break
        except requests.RequestException:
            time.sleep(0.1)
    else:
        proc.kill()
        pytest.fail("gunicorn did not start: " + proc.stderr.read().decode()[-2000:])
    yield base, access, prom_dir
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()


def _served(access: Path, path: str, since: int = 0) -> list[str]:
    """pids of the workers that answered ``path`` (log lines after the first ``since``)."""
    lines = access.read_text().splitlines()[since:] if access.exists() else []
    return [line.split()[0].strip("<>") for line in lines if line.split()[1:2] == [path]]


def _wait_log(access: Path, path: str, n: int, since: int = 0) -> list[str]:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        pids = _served(access, path, since)
        if len(pids) >= n:
            return pids
        time.sleep(0.05)
    raise AssertionError(f"access log shows {len(_served(access, path, since))} of {n}")


def _scrape_until_both(base: str, access: Path) -> list[tuple[str, dict]]:
    """Scrapes until each worker has answered at least two; returns (pid, samples) pairs."""
    start = len(access.read_text().splitlines()) if access.exists() else 0
    results = []
    for _ in range(60):
        with ThreadPoolExecutor(max_workers=4) as pool:
            texts = list(pool.map(lambda _: requests.get(base + "/metrics", timeout=10).text,
                                  range(4)))
        results += [parse(t) for t in texts]
        pids = _wait_log(access, "/metrics", len(results), start)
        if all(pids.count(p) >= 2 for p in set(pids)) and len(set(pids)) == 2:
            return list(zip(pids, results))   # order within a batch may differ: values agree
    raise AssertionError("one web worker answered every scrape")


def _post_bad(base: str, n: int) -> list[int]:
    def post(_):
        return requests.post(base + "/webhook/event", data=b"{broken", timeout=10,
                             headers={"Content-Type": "application/json"}).status_code
    with ThreadPoolExecutor(max_workers=8) as pool:
        return list(pool.map(post, range(n)))


def test_counters_add_up_over_web_workers(web):
    base, access, prom_dir = web
    n = 0
    for _ in range(10):   # until both workers have answered webhooks
        statuses = _post_bad(base, 40)
        assert statuses == [400] * 40
        n += 40
        if len(set(_wait_log(access, "/webhook/event", n))) == 2:
            break
    else:
        pytest.fail("one web worker answered every webhook")
    scrapes = _scrape_until_both(base, access)
    for pid, s in scrapes:
        assert s[("opsbot_webhook_seconds_count", frozenset())] == n, pid
        assert s[("opsbot_webhook_seconds_bucket", frozenset({("le", "+Inf")}))] == n, pid
        assert s[("opsbot_webhook_requests_total", frozenset({("status", "400")}))] == n, pid
        assert ("opsbot_tasks", frozenset({("state", "queued")})) in s   # store gauges too


def test_a_dead_web_worker_does_not_make_counters_fall(web):
    base, access, prom_dir = web
    assert _post_bad(base, 30) == [400] * 30
    pids = set(_wait_log(access, "/webhook/event", 30))
    victim = int(sorted(pids)[0])
    os.kill(victim, 9)
    deadline = time.monotonic() + 15    # gunicorn forks a replacement
    while time.monotonic() < deadline:
        try:
            os.kill(victim, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    for pid, s in _scrape_until_both(base, access):
        assert str(victim) != pid
        assert s[("opsbot_webhook_seconds_count", frozenset())] == 30, pid
        assert s[("opsbot_webhook_requests_total", frozenset({("status", "400")}))] == 30, pid


def test_configure_uses_the_given_folder_or_makes_one_and_clean_removes_only_samples(tmp_path):
    from bot.web import gunicorn_metrics

    given = tmp_path / "given" / "deeper"
    env = {"PROMETHEUS_MULTIPROC_DIR": str(given)}
    assert gunicorn_metrics.configure(env) == str(given) and given.is_dir()
    (given / "counter_12.db").write_bytes(b"x")
    (given / "histogram_13.db").write_bytes(b"x")
    (given / "notes.txt").write_text("mine")
    assert gunicorn_metrics.clean(str(given)) == 2
    assert [p.name for p in given.iterdir()] == ["notes.txt"]

    env = {}
    made = gunicorn_metrics.configure(env)
    assert env["PROMETHEUS_MULTIPROC_DIR"] == made and Path(made).is_dir()
    gunicorn_metrics.on_exit(None)
    assert not Path(made).exists() and given.is_dir()   # only the folder it made is removed

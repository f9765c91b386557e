"""The Procfile's web line under real gunicorn: every line it writes, its access log and its
error log as well as ours, is one JSON object (bot.web.gunicorn_conf), with secrets redacted."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def web_line() -> str:
    for line in (ROOT / "Procfile").read_text().splitlines():
        if line.startswith("web:"):
            return line[len("web:"):].strip()
    raise AssertionError("no web line in the Procfile")


def test_the_procfile_web_process_logs_json_lines_only(tmp_path):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FEISHU_", "OPSBOT_",
                                                                     "BITABLE_", "COZE_"))}
    env.update(PORT=str(port), WEB_CONCURRENCY="1", OPSBOT_DB=str(tmp_path / "opsbot.db"),
               PYTHONPATH=str(ROOT), FEISHU_APP_SECRET="very-secret-value",
               PATH=str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", ""))
    command = web_line().replace("0.0.0.0", "127.0.0.1")
    assert "-c python:bot.web.gunicorn_conf" in command
    proc = subprocess.Popen(["sh", "-c", "exec " + command], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                with urllib.request.urlopen(base + "/healthz", timeout=1) as resp:
                    assert resp.status == 200
                break
            except OSError:
                assert time.monotonic() < deadline, "gunicorn did not start"
                time.sleep(0.1)
        req = urllib.request.Request(base + "/nope?token=very-secret-value",
                                     headers={"User-Agent": "probe/1"})
        try:
            urllib.request.urlopen(req, timeout=2)
        except urllib.error.HTTPError as exc:
            assert exc.code == 404
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=20)
    lines = [line for line in (out + err).splitlines() if line.strip()]
    docs = [json.loads(line) for line in lines]          # every line is JSON
    access = [d for d in docs if d["logger"] == "gunicorn.access"]
    assert {(d["method"], d["path"], d["status"]) for d in access} >= {
        ("GET", "/healthz", 200), ("GET", "/nope", 404)}
    probe = next(d for d in access if d["path"] == "/nope")
    assert probe["user_agent"] == "probe/1" and probe["duration_ms"] >= 0
    assert probe["level"] == "info" and probe["ts"].endswith("Z")
    assert any(d["logger"] == "gunicorn.error" and "Booting worker" in d["msg"] for d in docs)
    assert "very-secret-value" not in out + err

"""kill -9 the web process while Feishu's requests are in flight; the re-pushes are handled once.

Real gunicorn (2 workers) killed as a whole process group at seeded random moments while
signed messages arrive; a new gunicorn on the same SQLite file gets Feishu's re-pushes (new
event ids, same message ids); the worker then answers. Every message gets exactly one reply,
whether the kill came before or after the first delivery was recorded.
"""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests

from bot.standins.events import ADMIN, ENCRYPT_KEY, TOKEN, message_event, signed_event
from storage.db import open_db
from tests.fake_feishu import FakeFeishu
from tests.test_gunicorn import free_port

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def _env(fake, db_file):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FEISHU_", "OPSBOT_",
                                                                     "BITABLE_", "COZE_"))}
    env.update({"FEISHU_APP_ID": fake.app_id, "FEISHU_APP_SECRET": fake.app_secret,
                "FEISHU_DOMAIN": fake.base_url, "FEISHU_VERIFICATION_TOKEN": TOKEN,
                "FEISHU_ENCRYPT_KEY": ENCRYPT_KEY, "FEISHU_ADMIN_IDS": ADMIN,
                "OPSBOT_DB": str(db_file), "PYTHONPATH": str(ROOT)})
    return env


def _gunicorn(env):
    port = free_port()
    gunicorn = Path(sys.executable).with_name("gunicorn")
    proc = subprocess.Popen([str(gunicorn), "-w", "2", "-b", f"127.0.0.1:{port}",
                             "bot.app:create_app()"], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            if requests.get(base + "/healthz", timeout=1).status_code == 200:
                return proc, base
        except requests.RequestException:
            time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    pytest.fail("gunicorn did not start")


def _deliver(base, text, message_id, event_id):
    body, headers = signed_event(message_event(text, message_id=message_id, event_id=event_id))
    try:
        return requests.post(base + "/webhook/event", data=body, headers=headers,
                             timeout=5).status_code
    except requests.RequestException:
        return None  # the process died under the request: Feishu will push again


def test_web_killed_mid_request_then_repushes_are_handled_once(tmp_path):
    rng = random.Random(7)
    messages = [f"om_crash_{i}" for i in range(6)]
    with FakeFeishu() as fake:
        env = _env(fake, tmp_path / "opsbot.db")
        first_answers = []
        for mid in messages:
            proc, base = _gunicorn(env)
            t = threading.Thread(target=lambda m=mid, b=base: first_answers.append(
                _deliver(b, "help", m, f"ev-{m}-1")))
            t.start()
            time.sleep(rng.uniform(0.0, 0.03))
            os.killpg(proc.pid, signal.SIGKILL)       # master and workers, no goodbye
            proc.wait(10)
            t.join(10)
        proc, base = _gunicorn(env)
        worker = subprocess.Popen([sys.executable, "-m", "bot.ops.cli", "worker", "--simulate"],
                                  cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL)
        try:
            for attempt in (2, 3):                    # Feishu re-pushes with new event ids
                for mid in messages:
                    assert _deliver(base, "help", mid, f"ev-{mid}-{attempt}") == 200
            fake.wait_for_messages(len(messages), timeout=30)
            time.sleep(1.0)                           # room for a wrongful second reply
        finally:
            worker.terminate()
            worker.wait(15)
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(15)
        replies = sorted(m["reply_to"] for m in fake.messages)
        assert replies == sorted(messages)
    db = open_db(tmp_path / "opsbot.db", migrate=False)
    assert db.execute("SELECT COUNT(*) FROM inbox").fetchone()[0] == len(messages)
    assert db.execute("SELECT COUNT(*) FROM inbox WHERE status = 'done'").fetchone()[0] == \
        len(messages)

"""Real gunicorn, two worker processes, one SQLite file: a storm of duplicate deliveries of one
message gives exactly one inbox row and exactly one reply at the fake Feishu.

Both deployments are covered: the default, where the `opsbot worker` process answers commands,
and OPSBOT_WEB_DISPATCH=1, where the gunicorn workers answer them too."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from storage.db import open_db
from tests.fake_feishu import FakeFeishu
from tests.helpers import ADMIN, ENCRYPT_KEY, TOKEN, message_event, signed_event

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def fake():
    with FakeFeishu() as server:
        yield server


@pytest.fixture(scope="module", params=["worker answers", "web answers"])
def server(request, fake, tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("gunicorn")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FEISHU_", "OPSBOT_",
                                                                     "BITABLE_", "COZE_"))}
    env.update({"FEISHU_APP_ID": fake.app_id, "FEISHU_APP_SECRET": fake.app_secret,
                "FEISHU_DOMAIN": fake.base_url, "FEISHU_VERIFICATION_TOKEN": TOKEN,
                "FEISHU_ENCRYPT_KEY": ENCRYPT_KEY, "FEISHU_ADMIN_IDS": ADMIN,
                "OPSBOT_DB": str(tmp_path / "opsbot.db"), "PYTHONPATH": str(ROOT),
                "OPSBOT_WEB_DISPATCH": "1" if request.param == "web answers" else "0"})
    gunicorn = Path(sys.executable).with_name("gunicorn")
    proc = subprocess.Popen([str(gunicorn), "-w", "2", "-b", f"127.0.0.1:{port}",
                             "--graceful-timeout", "2", "bot.app:create_app()"],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        try:
            if requests.get(base + "/healthz", timeout=1).json() == {"ok": True}:
                break
        except requests.RequestException:
            time.sleep(0.1)
    else:
        proc.kill()
        pytest.fail("gunicorn did not start: " + proc.stderr.read().decode()[-2000:])
    worker = None
    if request.param == "worker answers":
        worker = subprocess.Popen([sys.executable, "-m", "bot.ops.cli", "worker", "--simulate"],
                                  cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL)
    fake.reset()
    yield base, tmp_path / "opsbot.db"
    for p in filter(None, (proc, worker)):
        p.terminate()
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()


def test_concurrent_duplicates_one_reply(server, fake):
    base, db_file = server
    deliveries = []
    for i in range(30):  # Feishu re-pushes can carry a new event_id: vary it
        body, headers = signed_event(message_event("help", message_id="om_storm",
                                                   event_id=f"ev-{i % 3}"))
        deliveries.append((body, headers))

    def deliver(item):
        body, headers = item
        return requests.post(base + "/webhook/event", data=body, headers=headers, timeout=10)

    with ThreadPoolExecutor(max_workers=15) as pool:
        statuses = [r.status_code for r in pool.map(deliver, deliveries)]
    assert statuses == [200] * 30

    fake.wait_for_messages(1, timeout=20)
    db = open_db(db_file, migrate=False)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if db.execute("SELECT COUNT(*) FROM outbox WHERE status = 'sent'").fetchone()[0] == 1 \
                and db.execute("SELECT COUNT(*) FROM inbox WHERE status = 'done'").fetchone()[0]:
            break
        time.sleep(0.05)
    time.sleep(0.3)  # room for a wrongful second reply to show up
    assert db.execute("SELECT COUNT(*) FROM inbox").fetchone()[0] == 1
    assert db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0] == 1
    assert len(fake.requests_to("/reply", "POST")) == 1
    assert [m["reply_to"] for m in fake.messages] == ["om_storm"]
    db.conn.close()


def test_bad_signature_over_real_socket(server):
    base, db_file = server
    body, headers = signed_event(message_event("help"))
    headers["X-Lark-Signature"] = "f" * 64
    resp = requests.post(base + "/webhook/event", data=body, headers=headers, timeout=5)
    assert resp.status_code == 401 and resp.json()["error"] == "bad_signature"
    too_big = requests.post(base + "/webhook/event", data=b"x" * 1_200_000,
                            headers={"Content-Type": "application/json"}, timeout=5)
    assert too_big.status_code == 413

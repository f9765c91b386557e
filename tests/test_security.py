"""Security: forged requests never reach a handler; non-admins change nothing; secrets never leak.

Real web app (test client, and a real socket for a few), real SQLite, the real lark-oapi client
against the fake Feishu, the real worker against the Coze simulator.
"""
from __future__ import annotations

import asyncio
import json
import logging
import threading
import time

import pytest
from aiohttp import web
from werkzeug.serving import make_server

from bot.chat import handlers
from bot.app import create_app
from bot.errors import FeishuError
from bot.feishu.client import FeishuClient
from bot.alerting.actions import ACTIONS, READ_ONLY
from bot.chat.handlers import process_inbox
from bot.logs import JsonFormatter
from bot.feishu.sender import OutboxSender
from bot.service import build_notifier
from bot.settings import CozeSettings, Secret, Settings
from pipeline.clock import Clock
from pipeline.config import PipelineConfig, PollPolicy, RetryPolicy
from pipeline.coze import CozeClient
from pipeline.errors import CozeError
from pipeline.standins.simulator import CozeSimulator, Script
from pipeline.worker import Worker
from storage import queue
from storage.db import transaction
from tests.fake_feishu import FakeFeishu
from tests import helpers
from tests.helpers import (ADMIN, USER, checked_answer, encrypt, legacy_card_action, sign,
                           sign_legacy, table_counts, url_verification)

APP_SECRET = "appsecret-Zq81xK2mWv"
TOKEN = "vtoken-Hh3kP0sLq9"
ENCRYPT_KEY = "enckey-Jd72nBx0Ro"
COZE_TOKEN = "pat_cozeTok3nQw81ZbX"
SECRETS = (APP_SECRET, TOKEN, ENCRYPT_KEY, COZE_TOKEN)
APP, TABLE = "app_tok", "tbl_1"


def message_event(text, **kw):
    kw.setdefault("token", TOKEN)
    return helpers.message_event(text, **kw)


def card_action_event(value, **kw):
    kw.setdefault("token", TOKEN)
    return helpers.card_action_event(value, **kw)


@pytest.fixture
def fake():
    with FakeFeishu(app_secret=APP_SECRET) as server:
        yield server


@pytest.fixture
def settings(fake, db_path, tmp_path):
    return Settings(
        feishu=fake.settings(verification_token=Secret(TOKEN), encrypt_key=Secret(ENCRYPT_KEY),
                             admin_ids=(ADMIN,), alert_chat_id="oc_alerts",
                             bitable_app_token=APP, bitable_table_id=TABLE),
        coze=CozeSettings(api_token=Secret(COZE_TOKEN), workflow_id="wf1"),
        db_path=db_path, max_body_bytes=100_000)


@pytest.fixture
def calls(monkeypatch):
    """Every call that reached a command or button handler."""
    seen = []
    real_card, real_msg = handlers.handle_card_action, handlers.handle_message

    def card(*a, **kw):
        seen.append("card")
        return real_card(*a, **kw)

    def msg(*a, **kw):
        seen.append("message")
        return real_msg(*a, **kw)
    monkeypatch.setattr(handlers, "handle_card_action", card)
    monkeypatch.setattr(handlers, "handle_message", msg)
    return seen


@pytest.fixture
def client(settings, db):
    return create_app(settings, db=db, feishu_client=FeishuClient(settings.feishu),
                      dispatch=False).test_client()


def signed(payload, *, key=ENCRYPT_KEY, timestamp=None):
    body = json.dumps({"encrypt": encrypt(json.dumps(payload), ENCRYPT_KEY)}).encode()
    return body, sign(body, key, timestamp=timestamp)


def _unsigned():
    body, _ = signed(message_event("run", token=TOKEN))
    return body, {"Content-Type": "application/json"}


def _wrong_signature():
    body, headers = signed(message_event("run", token=TOKEN))
    headers["X-Lark-Signature"] = "0" * 64
    return body, headers


def _signed_other_key():
    return signed(message_event("run", token=TOKEN), key="someone-elses-key")


def _tampered():
    body, headers = signed(message_event("run", token=TOKEN))
    other, _ = signed(message_event("cancel", token=TOKEN))
    return other, headers


def _encrypted_other_key():
    body = json.dumps({"encrypt": encrypt(json.dumps(message_event("run", token=TOKEN)),
                                          "someone-elses-key")}).encode()
    return body, sign(body, ENCRYPT_KEY)


def _legacy(sig_token):
    body = json.dumps(legacy_card_action({"action": "cancel", "batch_id": "bX"})).encode()
    return body, (sign_legacy(body, sig_token) if sig_token else
                  {"Content-Type": "application/json"})


FORGED = {
    "unsigned_event": (_unsigned, 401),
    "wrong_signature": (_wrong_signature, 401),
    "signed_with_another_key": (_signed_other_key, 401),
    "body_swapped_after_signing": (_tampered, 401),
    "encrypted_with_another_key": (_encrypted_other_key, 400),
    "stale_timestamp": (lambda: signed(message_event("run", token=TOKEN),
                                       timestamp=str(int(time.time()) - 2 * 86400)), 401),
    "wrong_token": (lambda: signed(message_event("run", token="guess")), 401),
    "no_token": (lambda: signed(message_event("run", token=None)), 401),
    "token_wrong_type": (lambda: signed(message_event("run", token=12345)), 401),
    "card_wrong_token": (lambda: signed(card_action_event({"action": "cancel", "batch_id": "bX"},
                                                          token="guess")), 401),
    "card_unsigned": (lambda: (signed(card_action_event(
        {"action": "cancel", "batch_id": "bX"}, token=TOKEN))[0], {}), 401),
    "legacy_card_unsigned": (lambda: _legacy(None), 401),
    "legacy_card_wrong_sha1": (lambda: _legacy("guess"), 401),
    "plaintext_event": (lambda: (json.dumps(message_event("run", token=TOKEN)).encode(),
                                 sign(json.dumps(message_event("run", token=TOKEN)).encode(),
                                      ENCRYPT_KEY)), 400),
}


@pytest.mark.parametrize("path", ["/webhook/event", "/webhook/card"])
@pytest.mark.parametrize("case", sorted(FORGED))
def test_forged_requests_never_reach_a_handler(client, db, settings, calls, case, path):
    bid = queue.create_batch(db, [{"task_key": "a"}], now=1.0, source="chat", batch_id="bX")
    before = table_counts(db)
    body, headers = FORGED[case][0]()
    resp = client.post(path, data=body, headers=headers)
    # 401 for a bad signature or token; 400 for what is malformed (or a legacy card sent to
    # the event URL, where only encrypted events are taken)
    assert resp.status_code == (FORGED[case][1] if path.endswith("card") else
                                FORGED[case][1] if "legacy" not in case else 400), resp.json
    assert resp.json["error"]
    process_inbox(db, settings, None, Clock(), "t")   # nothing was left to be handled later
    assert calls == []
    assert table_counts(db) == before
    assert queue.get_batch(db, bid)["status"] == "queued"


def test_url_verification_with_a_wrong_token_is_refused(client):
    for payload in (url_verification(token="guess"), url_verification(token="")):
        plain = client.post("/webhook/event", json=payload)
        enc = client.post("/webhook/event",
                          json={"encrypt": encrypt(json.dumps(payload), ENCRYPT_KEY)})
        assert plain.status_code == enc.status_code == 401
        assert "challenge" not in plain.json and "challenge" not in enc.json


def test_forged_requests_over_a_real_socket(settings, db, calls, fake):
    import requests
    app = create_app(settings, db=db, feishu_client=FeishuClient(settings.feishu))
    server = make_server("127.0.0.1", 0, app, threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{server.server_port}"
        for case, (build, status) in sorted(FORGED.items()):
            body, headers = build()
            resp = requests.post(base + "/webhook/event", data=body, headers=headers, timeout=5)
            assert 400 <= resp.status_code < 500, case
        time.sleep(0.2)   # the dispatcher would have run by now
        assert calls == [] and set(table_counts(db).values()) == {0}
        assert fake.messages == []
    finally:
        server.shutdown()


# --- non-admins -------------------------------------------------------------------------------

def snapshot(db):
    """Every row of the tables a command or button could change."""
    out = {}
    for table in ("batches", "tasks", "silences", "alerts", "breakers"):
        out[table] = [tuple(r) for r in db.execute(f"SELECT * FROM {table} ORDER BY rowid")]
    return out


def seed_state(db):
    """A batch with a failed task, a paused batch, a blocked batch, an open alert, a breaker."""
    b1 = queue.create_batch(db, [{"task_key": "k1"}, {"task_key": "k2"}], now=1, source="chat",
                            batch_id="b1111")
    b2 = queue.create_batch(db, [{"task_key": "p1"}], now=1, source="chat", batch_id="b2222")
    b3 = queue.create_batch(db, [{"task_key": "x1"}], now=1, source="chat", batch_id="b3333")
    with transaction(db) as conn:
        conn.execute("UPDATE tasks SET status = 'failed', finished_at = 2 WHERE task_key = 'k1'")
        conn.execute("UPDATE batches SET status = 'paused' WHERE id = ?", [b2])
        conn.execute("UPDATE batches SET status = 'blocked' WHERE id = ?", [b3])
        conn.execute("INSERT INTO breakers (service, state, failures, successes, opened_at,"
                     " reason, updated_at) VALUES ('coze', 'open', 5, 0, 1, 'manual: auth', 1)")
        conn.execute("INSERT INTO alerts (key, tier, status, count, first_at, last_at, batch_id,"
                     " task_id, details) VALUES ('b1111:coze:auth', 'MEDIUM', 'open', 1, 1, 1,"
                     " 'b1111', 1, '{\"kind\": \"task_failed\", \"task_ids\": [1]}')")
    return b1, b2, b3


@pytest.mark.parametrize("text", [
    "run", "retry k1", "retry 1", "retry batch b1111", "retry b1111", "cancel b1111",
    "cancel", "pause b1111", "resume b2222", "resume b3333", "silence b1111 1h", "silence *",
    "运行", "取消 b1111", "恢复 b3333", "/cancel b1111", "replay", "重发 1",
])
def test_non_admin_commands_change_nothing(client, db, settings, fake, text):
    seed_state(db)
    fake.seed_records(APP, TABLE, [{"task_id": "t1", "状态": "待处理"}])
    before = snapshot(db)
    resp = client.post("/webhook/event", **_req(message_event(text, sender=USER)))
    assert resp.status_code == 200
    process_inbox(db, settings, FeishuClient(settings.feishu), Clock(), "t")
    assert snapshot(db) == before
    [reply] = [json.loads(r[0])["card"] for r in db.execute("SELECT payload FROM outbox")]
    assert reply["header"]["title"]["content"] in ("没有权限", "Not allowed")
    shown = json.dumps(reply, ensure_ascii=False)
    assert ADMIN in shown and "<at" not in shown   # named, never @-mentioned on a refusal
    assert fake.requests_to("/records/search") == []


BUTTONS = [
    {"action": "retry", "task_id": 1}, {"action": "retry", "task_id": 1, "key": "b1111:coze:auth"},
    {"action": "retry_batch", "batch_id": "b1111"}, {"action": "ignore", "task_id": 1},
    {"action": "ignore", "key": "b1111:coze:auth"}, {"action": "silence", "key": "b1111"},
    {"action": "silence", "key": "*", "seconds": 86400}, {"action": "resume", "batch_id": "b2222"},
    {"action": "resume", "batch_id": "b3333", "key": "b1111:coze:auth"},
    {"action": "cancel", "batch_id": "b1111"},
]


def test_every_mutating_button_is_covered():
    names = {b["action"] for b in BUTTONS}
    assert set(ACTIONS) - READ_ONLY <= names


@pytest.mark.parametrize("legacy", [False, True])
@pytest.mark.parametrize("value", BUTTONS, ids=lambda v: "-".join(map(str, v.values())))
def test_non_admin_buttons_change_nothing(client, db, value, legacy):
    seed_state(db)
    before, counts = snapshot(db), table_counts(db)
    if legacy:
        body = json.dumps(legacy_card_action(value, operator=USER)).encode()
        resp = client.post("/webhook/card", data=body, headers=sign_legacy(body, TOKEN))
    else:
        resp = client.post("/webhook/card", **_req(card_action_event(value, operator=USER)))
    assert resp.status_code == 200
    assert resp.json["toast"]["type"] == "error"
    assert "card" not in resp.json
    assert snapshot(db) == before and table_counts(db) == counts


def test_admin_button_still_works(client, db):
    seed_state(db)
    resp = client.post("/webhook/card", **_req(card_action_event(
        {"action": "cancel", "batch_id": "b1111"}, operator=ADMIN)))
    assert checked_answer(resp.json)["toast"]["type"] == "success"
    assert queue.get_batch(db, "b1111")["status"] == "cancelled"


def _req(payload):
    body, headers = signed(payload)
    return {"data": body, "headers": headers}


# --- secrets ----------------------------------------------------------------------------------

class Capture(logging.Handler):
    """Every record, as raw text (message, extras, traceback) and as the JSON formatter's line."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.raw: list[str] = []
        self.lines: list[str] = []
        self.fmt = JsonFormatter()

    def emit(self, record):
        extras = {k: v for k, v in record.__dict__.items() if k not in ("args", "msg")}
        text = record.getMessage() + json.dumps(extras, default=str)
        if record.exc_info:
            text += logging.Formatter().formatException(record.exc_info)
        self.raw.append(text)
        self.lines.append(self.fmt.format(record))


@pytest.fixture
def captured():
    handler = Capture()
    root = logging.getLogger()
    old = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    yield handler
    root.removeHandler(handler)
    root.setLevel(old)


def leaks(text: str) -> list[str]:
    return [s for s in SECRETS if s in text]


async def _echo_auth(request):
    """A broken gateway that quotes the request's Authorization header back in its error."""
    return web.json_response({"code": 5000, "msg": "bad gateway for " +
                              request.headers.get("Authorization", "")}, status=502)


def test_secrets_never_appear_in_logs_cards_results_or_errors(client, db, settings, fake,
                                                                captured, tmp_path):
    errors: list[str] = []
    # 1. webhook traffic, good and bad
    client.post("/webhook/event", **_req(message_event("help", message_id="om_h")))
    for build, _ in FORGED.values():
        body, headers = build()
        client.post("/webhook/event", data=body, headers=headers)
    client.post("/webhook/event", json=url_verification(token=TOKEN))
    client.post("/webhook/card", **_req(card_action_event({"action": "cancel",
                                                           "batch_id": "nope"})))
    # 2. Feishu failing: token refused, 500s, permanent errors; the sender logs them
    fs = FeishuClient(settings.feishu)
    fake.fail("token", status=400, code=10014, msg="app secret invalid")
    fake.fail("reply", status=500, times=2)
    fake.fail("search", status=400, code=99991672, msg="no permission")
    fake.seed_records(APP, TABLE, [{"task_id": "t1", "状态": "待处理", "topic": "x"}])
    client.post("/webhook/event", **_req(message_event("run", message_id="om_run")))
    client.post("/webhook/event", **_req(message_event("run", message_id="om_run2")))
    process_inbox(db, settings, fs, Clock(), "t")
    sender = OutboxSender(db, fs, clock=Clock(), owner="t", base_backoff=0.0)
    for _ in range(4):
        sender.deliver_due()
    wrong = FeishuClient(settings.feishu.__class__(
        **{**settings.feishu.__dict__, "app_secret": Secret(APP_SECRET + "x")}))
    try:
        wrong.send_text("oc_a", "hi", "u-x")
    except FeishuError as exc:
        errors.append(str(exc))
        errors.append(repr(exc))

    # 3. Coze: a worker run with failures, a gateway echoing the token, a dead host
    async def coze_flow():
        sim = CozeSimulator(token=COZE_TOKEN, default_duration=0.02)
        sim.script("t1", Script(outcome="Fail", error_code="4000",
                                error_message=f"invalid parameter token={COZE_TOKEN}"))
        sim.script("t2", Script(http_500_first_n=1))
        await sim.start()
        echo = web.Application()
        echo.router.add_route("*", "/{tail:.*}", _echo_auth)
        runner = web.AppRunner(echo)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        echo_url = f"http://127.0.0.1:{runner.addresses[0][1]}"
        try:
            cfg = PipelineConfig(max_coze=4, coze_qps=500, lease_seconds=5, idle_interval=0.02,
                                 output_dir=str(tmp_path / "out"),
                                 poll=PollPolicy(first=0.02, multiplier=1.0, maximum=0.02),
                                 retry=RetryPolicy(max_attempts=2, initial=0.01, maximum=0.01))
            queue.create_batch(db, [{"task_key": f"t{i}", "params": {"i": i}} for i in range(4)],
                               now=time.time(), source="chat", chat_id="oc_chat")
            notifier, _ = build_notifier(db, settings, Clock())
            async with CozeClient(sim.base_url, COZE_TOKEN) as coze:
                worker = Worker(db, cfg, coze, "wf1", notifier=notifier)
                await asyncio.wait_for(worker.run(drain=True), 30)
                worker.synth.close()
            for url in (echo_url, "http://127.0.0.1:1"):
                async with CozeClient(url, COZE_TOKEN) as coze:
                    for call in (lambda: coze.submit("wf1", {}), lambda: coze.poll("wf1", "1")):
                        try:
                            await call()
                        except CozeError as exc:
                            errors.extend([str(exc), repr(exc), exc.message])
        finally:
            await runner.cleanup()
            await sim.stop()

    asyncio.run(coze_flow())
    sender.deliver_due()

    assert len(errors) >= 6 and any("502" in e for e in errors)
    assert [e for e in errors if leaks(e)] == []
    # logs: raw records (no redaction needed) and the JSON lines
    assert captured.raw, "nothing was logged"
    assert any("rejected" in r for r in captured.raw)
    assert [r for r in captured.raw if leaks(r)] == []
    assert [r for r in captured.lines if leaks(r)] == []
    # cards and every other outbox payload
    payloads = [r[0] for r in db.execute("SELECT payload || coalesce(last_error, '') FROM outbox")]
    assert len(payloads) >= 3 and [p for p in payloads if leaks(p)] == []
    # results: the task rows (output, errors), attempts, alerts and the result files
    for table in ("tasks", "attempts", "alerts", "batches", "breakers"):
        rows = [json.dumps(list(r), default=str) for r in db.execute(f"SELECT * FROM {table}")]
        assert [r for r in rows if leaks(r)] == [], table
    files = [p.read_text() for p in (tmp_path / "out").rglob("*") if p.is_file()]
    assert files and [f for f in files if leaks(f)] == []
    # what Feishu received
    sent = json.dumps([m["content"] for m in fake.messages], ensure_ascii=False)
    assert fake.messages and leaks(sent) == []

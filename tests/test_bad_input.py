"""Bad input against the real web app: every request gets a 4xx or a clear chat reply.

Never a 5xx, never a crash, nothing half-written (row counts before/after). Hypothesis generates
envelopes with wrong types in every field, and command texts; hand-picked cases cover broken
JSON / base64 / padding, replays, unknown events, injection in command arguments and in Bitable
fields. A few go over a real socket (the oversized body: a 50 MB Content-Length is refused with
413 before any body byte is sent).
"""
from __future__ import annotations

import base64
import copy
import json
import socket
import threading
import time

import pytest
from hypothesis import HealthCheck, given, settings as hsettings, strategies as st
from werkzeug.serving import make_server

from bot.app import create_app
from bot.chat.cards import elements
from bot.feishu.client import FeishuClient
from bot.chat.handlers import process_inbox
from bot.settings import Secret, Settings
from pipeline.clock import Clock
from storage import queue
from tests.fake_feishu import FakeFeishu
from tests.helpers import (ADMIN, ENCRYPT_KEY, TOKEN, USER, encrypt,
                           message_event, sign, signed_event, table_counts)

APP, TABLE = "app_tok", "tbl_1"
LIMIT = 200_000
INJECTIONS = [
    "'; DROP TABLE tasks; --", '" OR 1=1 --', "$(touch /tmp/opsbot-pwned)", "`id`",
    "; rm -rf / #", "| cat /etc/passwd", "<at id=all></at>", "<at id=ou_victim></at>",
    "[click](https://evil.example)", "**bold** <font color='red'>x</font>", "{key}{0}%s%n",
    "../../etc/passwd", "\x00\x01\x1b[31m", "a\u202eb", "@_all",
]


@pytest.fixture(scope="module")
def fake():
    with FakeFeishu() as server:
        yield server


@pytest.fixture
def settings(fake, db_path):
    return Settings(feishu=fake.settings(verification_token=Secret(TOKEN),
                                         encrypt_key=Secret(ENCRYPT_KEY), admin_ids=(ADMIN,),
                                         bitable_app_token=APP, bitable_table_id=TABLE),
                    db_path=db_path, max_body_bytes=LIMIT)


@pytest.fixture
def app(settings, db):
    return create_app(settings, db=db, feishu_client=FeishuClient(settings.feishu),
                      dispatch=False)


@pytest.fixture
def client(app):
    return app.test_client()


def handle_all(db, settings, fake):
    """Run the dispatcher's step by hand: handle recorded messages; return their reply cards."""
    client = FeishuClient(settings.feishu)
    process_inbox(db, settings, client, Clock(), "test", limit=100)
    return [json.loads(r[0])["card"] for r in
            db.execute("SELECT payload FROM outbox WHERE kind = 'reply' ORDER BY id")]


def card_markdown(card) -> str:
    """Every markdown/plain text in a card, joined."""
    return "\n".join(x["content"] for x in elements(card, "markdown", "plain_text")
                     if isinstance(x.get("content"), str))


def assert_neutral(text: str) -> None:
    """No live mention, link or HTML tag that came from user input."""
    assert "<at id=all" not in text and "<at id=ou_victim" not in text, text
    assert "](https://evil" not in text and "<font" not in text, text


# --- envelopes with wrong types (hypothesis) --------------------------------------------------

JUNK = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True),
                 st.text(max_size=20), st.lists(st.integers(), max_size=3),
                 st.dictionaries(st.text(max_size=5), st.integers(), max_size=2))
PATHS = [("schema",), ("header",), ("header", "event_id"), ("header", "event_type"),
         ("header", "token"), ("header", "create_time"), ("event",), ("event", "sender"),
         ("event", "sender", "sender_id"), ("event", "sender", "sender_id", "open_id"),
         ("event", "sender", "sender_type"), ("event", "message"),
         ("event", "message", "message_id"), ("event", "message", "chat_id"),
         ("event", "message", "content"), ("event", "message", "message_type"),
         ("event", "message", "mentions"), ("event", "message", "chat_type")]


def with_value(payload, path, value):
    out = copy.deepcopy(payload)
    node = out
    for key in path[:-1]:
        if not isinstance(node.get(key), dict):
            return out
        node = node[key]
    node[path[-1]] = value
    return out


@hsettings(max_examples=150, deadline=None,
           suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(edits=st.lists(st.tuples(st.sampled_from(PATHS), JUNK), min_size=1, max_size=3),
       text=st.text(max_size=60))
def test_wrong_types_in_every_envelope_field(client, db, settings, fake, edits, text):
    payload = message_event(text)
    for path, value in edits:
        payload = with_value(payload, path, value)
    before = table_counts(db)
    body, headers = signed_event(payload)
    resp = client.post("/webhook/event", data=body, headers=headers)
    assert resp.status_code < 500 and resp.is_json
    after = table_counts(db)
    if resp.status_code != 200:
        assert after == before
        return
    if after["inbox"] == before["inbox"]:
        return  # ignored (bot sender, unknown type): 200 and no trace
    # recorded: handling it must give a clear reply, and must not raise
    cards = handle_all(db, settings, fake)
    row = db.execute("SELECT status, error FROM inbox ORDER BY rowid DESC LIMIT 1").fetchone()
    assert row == ("done", None), row
    assert len(cards) == after["inbox"]
    db.execute("DELETE FROM inbox")
    db.execute("DELETE FROM outbox")
    db.conn.commit()


@hsettings(max_examples=120, deadline=None,
           suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=st.one_of(st.binary(max_size=300),
                      st.text(max_size=200).map(str.encode),
                      st.recursive(JUNK, lambda c: st.lists(c, max_size=3)
                                   | st.dictionaries(st.text(max_size=8), c, max_size=3),
                                   max_leaves=10).map(lambda v: json.dumps(v).encode())),
       signed=st.booleans(), path=st.sampled_from(["/webhook/event", "/webhook/card"]))
def test_arbitrary_bodies_never_5xx(client, db, body, signed, path):
    before = table_counts(db)
    headers = sign(body, ENCRYPT_KEY) if signed else {"Content-Type": "application/json"}
    resp = client.post(path, data=body, headers=headers)
    assert 400 <= resp.status_code < 500 or (resp.status_code == 200 and signed)
    assert resp.is_json
    if resp.status_code != 200:
        assert table_counts(db) == before


# --- command texts (hypothesis) -----------------------------------------------------------------

COMMAND_WORDS = st.sampled_from(["run", "status", "retry", "cancel", "pause", "resume",
                                 "report", "errors", "silence", "help", "运行", "重试", "/run",
                                 "batch", "--limit", "--include", "--date", "--exclude", "0",
                                 "-1", "99999999999", "1h", "2025-13-40", '"', "“", "b1234"]
                                + INJECTIONS)


@hsettings(max_examples=150, deadline=None,
           suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(words=st.lists(st.one_of(COMMAND_WORDS, st.text(max_size=30)), min_size=0, max_size=6),
       sender=st.sampled_from([ADMIN, USER]))
def test_any_command_text_gets_one_clear_reply(client, db, settings, fake, words, sender):
    text = " ".join(words)
    resp = client.post("/webhook/event", **_req(message_event(text, sender=sender)))
    assert resp.status_code == 200
    cards = handle_all(db, settings, fake)
    assert len(cards) == 1
    card = cards[0]
    assert card["header"]["title"]["content"]
    assert_neutral(card_markdown(card))
    assert db.execute("SELECT status FROM inbox").fetchone()[0] == "done"
    for table in ("inbox", "outbox", "silences", "tasks", "batches"):
        db.execute(f"DELETE FROM {table}")
    db.conn.commit()


def _req(payload):
    body, headers = signed_event(payload)
    return {"data": body, "headers": headers}


# --- hand-picked ------------------------------------------------------------------------------

def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def _ct() -> bytes:
    return base64.b64decode(encrypt(json.dumps(message_event("help")), ENCRYPT_KEY))


def _unpadded() -> str:
    """A ciphertext whose base64 needs padding, with the padding cut off."""
    for extra in range(3):
        text = _b64(_ct() + b"\0" * extra)
        if text.endswith("="):
            return text.rstrip("=")
    raise AssertionError("unreachable")


HAND_PICKED = {
    "empty": (b"", 400),
    "not_json": (b"hello", 400),
    "truncated_json": (b'{"encrypt": "abc', 400),
    "json_array": (b"[1, 2]", 400),
    "json_string": (b'"x"', 400),
    "deep_nesting": (b"[" * 100_000 + b"]" * 100_000, 400),
    "encrypt_number": (b'{"encrypt": 12345}', 400),
    "encrypt_null": (b'{"encrypt": null}', 400),
    "encrypt_empty": (b'{"encrypt": ""}', 400),
    "broken_base64": (b'{"encrypt": "!!!not base64!!!"}', 400),
    "base64_missing_padding": (json.dumps({"encrypt": _unpadded()}).encode(), 400),
    "base64_no_padding": (json.dumps({"encrypt": _b64(_ct()[:-1]).rstrip("=")}).encode(), 400),
    "short_ciphertext": (json.dumps({"encrypt": _b64(b"x" * 8)}).encode(), 400),
    "unaligned_ciphertext": (json.dumps({"encrypt": _b64(_ct() + b"x")}).encode(), 400),
    "bad_pkcs7": (json.dumps({"encrypt": _b64(_ct()[:-16])}).encode(), 400),
    "non_ascii_encrypt": (json.dumps({"encrypt": "密文"}).encode(), 400),
    "encrypted_not_json": (json.dumps({"encrypt": encrypt("not json", ENCRYPT_KEY)}).encode(), 400),
    "encrypted_array": (json.dumps({"encrypt": encrypt("[1]", ENCRYPT_KEY)}).encode(), 400),
    "encrypted_latin1": (json.dumps({"encrypt": encrypt(b"\xff\xfe", ENCRYPT_KEY)}).encode(), 400),
    "plaintext_event": (json.dumps(message_event("help")).encode(), 400),
    "invalid_utf8": (b'{"encrypt": "\xff\xfe"}', 400),
    "nan": (b'{"encrypt": NaN}', 400),
}


@pytest.mark.parametrize("case", sorted(HAND_PICKED))
def test_hand_picked_bodies(client, db, case):
    body, status = HAND_PICKED[case]
    before = table_counts(db)
    resp = client.post("/webhook/event", data=body, headers=sign(body, ENCRYPT_KEY))
    assert resp.status_code == status, resp.json
    assert resp.json["error"] and resp.json["message"]
    assert table_counts(db) == before


BAD_HEADERS = {
    "timestamp_not_number": {"X-Lark-Request-Timestamp": "yesterday"},
    "timestamp_stale": {"X-Lark-Request-Timestamp": str(int(time.time()) - 3 * 86400)},
    "timestamp_future": {"X-Lark-Request-Timestamp": str(int(time.time()) + 3 * 86400)},
    "timestamp_huge": {"X-Lark-Request-Timestamp": "9" * 400},
    "timestamp_inf": {"X-Lark-Request-Timestamp": "inf"},
    "timestamp_nan": {"X-Lark-Request-Timestamp": "nan"},
    "signature_non_hex": {"X-Lark-Signature": "zz" * 32},
    "signature_unicode": {"X-Lark-Signature": "签名"},
    "signature_huge": {"X-Lark-Signature": "a" * 10_000},
    "nonce_empty": {"X-Lark-Request-Nonce": ""},
}


@pytest.mark.parametrize("case", sorted(BAD_HEADERS))
def test_bad_headers_are_401(client, db, case):
    body, headers = signed_event(message_event("run"))
    for k, v in BAD_HEADERS[case].items():
        # a changed timestamp keeps a valid signature: only the window must refuse it
        if k == "X-Lark-Request-Timestamp":
            headers = sign(body, ENCRYPT_KEY, timestamp=v)
        else:
            headers[k] = v
    before = table_counts(db)
    resp = client.post("/webhook/event", data=body, headers=headers)
    assert resp.status_code == 401, (resp.status_code, resp.json)
    assert table_counts(db) == before


def test_replayed_event_is_recorded_once(client, db, settings, fake):
    payload = message_event("help", message_id="om_replay")
    body, headers = signed_event(payload)
    statuses = [client.post("/webhook/event", data=body, headers=headers).status_code
                for _ in range(5)]
    # the same bytes again later, and a re-push with a new event id
    again = copy.deepcopy(payload)
    again["header"]["event_id"] = "ev-new"
    statuses.append(client.post("/webhook/event", **_req(again)).status_code)
    assert statuses == [200] * 6
    assert table_counts(db)["inbox"] == 1
    assert len(handle_all(db, settings, fake)) == 1


@pytest.mark.parametrize("event_type", ["contact.user.created_v3", "im.chat.disbanded_v1",
                                        "im.message.message_read_v1", "", None, 42])
def test_unknown_event_types_200_and_no_trace(client, db, event_type):
    payload = message_event("run")
    payload["header"]["event_type"] = event_type
    resp = client.post("/webhook/event", **_req(payload))
    assert (resp.status_code, resp.json) == (200, {})
    assert set(table_counts(db).values()) == {0}


def test_huge_text_under_the_body_limit_gets_a_clear_reply(client, db, settings, fake):
    resp = client.post("/webhook/event", **_req(message_event("run " + "x" * 100_000)))
    assert resp.status_code == 200
    [card] = handle_all(db, settings, fake)
    assert "2000" in card_markdown(card)          # "too long: at most 2000 characters"
    assert table_counts(db)["batches"] == 0


def test_huge_body_over_the_limit_is_413(client, db):
    resp = client.post("/webhook/event", **_req(message_event("x" * (LIMIT + 10))))
    assert resp.status_code == 413 and table_counts(db)["inbox"] == 0


# --- injection in command arguments and Bitable fields ------------------------------------

@pytest.mark.parametrize("text", [
    '"<at id=all></at>"', "status <at id=all></at>", "retry \"'; DROP TABLE tasks; --\"",
    'silence "<at id=all></at>" 1h', "silence [x](https://evil.example) 1h",
    "silence \"'; DROP TABLE silences; --\"", "run --include \"$(touch /tmp/pwned)\"",
    "report --date \"<font color='red'>x</font>\"", "errors --limit \"<at id=all></at>\"",
    'help "<at id=ou_victim></at>"',
])
def test_injection_in_command_arguments_is_echoed_neutralised(client, db, settings, fake, text):
    resp = client.post("/webhook/event", **_req(message_event(text, message_id="om_inj")))
    assert resp.status_code == 200
    [card] = handle_all(db, settings, fake)
    assert_neutral(card_markdown(card))
    # the store is intact and untouched except for the reply (and an admin's silence)
    names = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert {"tasks", "batches", "silences", "inbox", "outbox"} <= names
    assert table_counts(db)["tasks"] == 0


def test_silence_key_with_sql_quotes_is_stored_verbatim(client, db, settings, fake):
    key = "'; DROP TABLE silences; --"
    client.post("/webhook/event", **_req(message_event(f'silence "{key}" 1h')))
    handle_all(db, settings, fake)
    assert [r[0] for r in db.execute("SELECT key FROM silences")] == [key]


def test_injection_in_bitable_fields_is_stored_verbatim_never_executed(client, db, settings,
                                                                       fake, tmp_path):
    evil = {f"f{i}": s for i, s in enumerate(INJECTIONS)}
    fake.reset()
    fake.seed_records(APP, TABLE, [
        {"task_id": "<at id=all></at>", "状态": "待处理", **evil},
        {"task_id": "'; DROP TABLE tasks; --", "状态": "待处理", "topic": "$(touch /tmp/x)"},
    ])
    resp = client.post("/webhook/event", **_req(message_event("run", message_id="om_evil")))
    assert resp.status_code == 200
    [card] = handle_all(db, settings, fake)
    assert_neutral(card_markdown(card))
    [batch] = queue.list_batches(db)
    tasks = {t["task_key"]: json.loads(t["params"]) for t in queue.tasks_of(db, batch["id"])}
    assert tasks == {"<at id=all></at>": evil, "'; DROP TABLE tasks; --": {"topic":
                                                                           "$(touch /tmp/x)"}}
    assert not (tmp_path / "x").exists()
    # the failures come back in the errors card and in alert cards: neutralised there too
    with db.conn:
        db.execute("UPDATE tasks SET status = 'failed', error_class = 'bad_request',"
                   " error_code = '4000', error_message = ?, finished_at = 1",
                   ["invalid parameter <at id=all></at> [x](https://evil.example)"])
    client.post("/webhook/event", **_req(message_event("errors", message_id="om_errs")))
    cards = handle_all(db, settings, fake)
    assert_neutral(card_markdown(cards[-1]))
    from bot.alerting.router import AlertRouter
    from pipeline.classifier import Decision
    from pipeline.errors import CozeError
    s = settings.replace(feishu=settings.feishu.__class__(
        **{**settings.feishu.__dict__, "alert_chat_id": "oc_alerts"}))
    router = AlertRouter(db, s, Clock())
    for task in queue.tasks_of(db, batch["id"]):
        router.task_finished(task, Decision("fail", 0.0, "bad_request", "MEDIUM", "rule"),
                             CozeError("4000", task["error_message"]))
    queue.finish_batches(db, now=2)
    router.batch_finished(batch["id"])
    for (payload,) in db.execute("SELECT payload FROM outbox WHERE kind IN ('send', 'reply',"
                                 " 'patch') AND ref != 'oc_chat'"):
        data = json.loads(payload)
        assert_neutral(card_markdown(data.get("card")) if "card" in data else data["text"])


# --- over a real socket -------------------------------------------------------------------------

@pytest.fixture
def live(app):
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_port
    server.shutdown()


def raw_request(port, head: bytes, body: bytes = b"", timeout=5.0) -> tuple[int, bytes, float]:
    t0 = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(head + body)
        data = b""
        while b"\r\n\r\n" not in data or len(data.split(b"\r\n\r\n", 1)[1]) < _length(data):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
        took = time.monotonic() - t0
    status = int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/") else 0
    return status, data, took


def _length(data: bytes) -> int:
    for line in data.split(b"\r\n\r\n", 1)[0].split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return int(line.split(b":", 1)[1])
    return 0


def test_50mb_content_length_is_refused_before_the_body_is_sent(live, db):
    head = (b"POST /webhook/event HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 52428800\r\n\r\n")
    status, data, took = raw_request(live, head)      # not one body byte is sent
    assert status == 413 and b"too_large" in data
    assert took < 2.0
    assert table_counts(db)["inbox"] == 0


def test_chunked_body_over_the_limit_is_refused(live, db):
    chunk = b"x" * 65536
    body = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(LIMIT // 65536 + 2))
    head = (b"POST /webhook/event HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n")
    status, _, _ = raw_request(live, head, body + b"0\r\n\r\n")
    assert status == 413


def test_garbage_over_a_real_socket(live, db):
    for head in (b"POST /webhook/event HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\n{{{{{",
                 b"POST /webhook/event HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n[]",
                 b"GET /webhook/event HTTP/1.1\r\nHost: x\r\n\r\n",
                 b"POST /nope HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n"):
        status, data, _ = raw_request(live, head)
        assert 400 <= status < 500, data[:200]
    assert set(table_counts(db).values()) == {0}

"""bot.web.intake without Flask: each step, each rejection, and a property: never a 5xx."""
from __future__ import annotations

import base64
import json

import pytest
from hypothesis import HealthCheck, given, settings as hsettings, strategies as st

from bot.web.intake import (MAX_SKEW, Intake, Rejected, Request, decrypt, parse_json, signature)
from bot.settings import FeishuSettings, Secret, Settings
from pipeline.clock import FakeClock
from tests.helpers import (ENCRYPT_KEY, TOKEN, card_action_event, encrypt, legacy_card_action,
                           message_event, sign, sign_legacy, signed_event, table_counts,
                           url_verification)

NOW = 1_750_000_000.0


def make_settings(*, token=TOKEN, key=ENCRYPT_KEY, limit=1_000_000):
    return Settings(feishu=FeishuSettings(verification_token=Secret(token),
                                          encrypt_key=Secret(key), admin_ids=("ou_admin",)),
                    max_body_bytes=limit)


def intake(db, card_answers=None, **kw):
    clicks = card_answers if card_answers is not None else []
    return Intake(make_settings(**kw), db, FakeClock(NOW),
                  card_handler=lambda p: clicks.append(p) or {"toast": {"type": "info"}})


def signed(payload, key=ENCRYPT_KEY, ts=str(int(NOW))):
    body, headers = signed_event(payload, encrypt_key=key, timestamp=ts)
    return Request(body, headers)


def test_decrypt_documented_vector():
    from bot.web.intake import aes_decrypt
    raw = base64.b64decode("P37w+VZImNgPEO1RBhJ6RtKl7n6zymIbEG1pReEzghk=")
    assert aes_decrypt(raw, "test key") == b"hello world"


@pytest.mark.parametrize("raw", [b"", b"x" * 16, b"x" * 33])
def test_aes_decrypt_rejects_bad_lengths(raw):
    from bot.web.intake import aes_decrypt
    with pytest.raises(ValueError):
        aes_decrypt(raw, "k")


def test_aes_decrypt_matches_lark_oapi():
    from lark_oapi.core.utils.decryptor import AESCipher
    raw = base64.b64decode(encrypt("中文 payload", "k2"))
    assert AESCipher("k2").decrypt(raw) == __import__("bot.web.intake").web.intake.aes_decrypt(raw, "k2")


def test_decrypt_round_trip_with_helper():
    assert decrypt(encrypt('{"a": 1}', "k"), "k") == {"a": 1}


def test_signature_matches_formula():
    import hashlib
    assert signature("1", "n", "k", b"{}") == hashlib.sha256(b"1nk{}").hexdigest()


@pytest.mark.parametrize("raw", [b"", b"not json", b"[1,2]", b"\xff\xfe", b'"s"'])
def test_parse_json_rejects(raw):
    with pytest.raises(Rejected) as err:
        parse_json(raw)
    assert err.value.status == 400


def test_url_verification_plain_and_encrypted(db):
    it = intake(db)
    plain = it.handle(Request(json.dumps(url_verification()).encode(), {}))
    assert (plain.response.status, plain.response.json) == (200, {"challenge": "ajls384kdjxxxx"})
    enc_body = json.dumps({"encrypt": encrypt(json.dumps(url_verification()), ENCRYPT_KEY)})
    enc = it.handle(Request(enc_body.encode(), {}))
    assert enc.response.json == {"challenge": "ajls384kdjxxxx"}


def test_url_verification_bad_token(db):
    out = intake(db).handle(Request(json.dumps(url_verification(token="nope")).encode(), {}))
    assert out.response.status == 401


def test_message_recorded_once_by_message_id(db):
    it = intake(db)
    first = it.handle(signed(message_event("help", message_id="om_1", event_id="e1")))
    again = it.handle(signed(message_event("help", message_id="om_1", event_id="e2")))
    assert first.response == again.response and first.response.status == 200
    assert first.recorded == "msg:om_1" and again.recorded is None
    assert table_counts(db)["inbox"] == 1


def test_bot_messages_ignored(db):
    out = intake(db).handle(signed(message_event("run", sender_type="app")))
    assert out.response.status == 200 and out.recorded is None
    assert table_counts(db)["inbox"] == 0


def _group(text, *, mentions=True, chat_type="group", **kw):
    ev = message_event(text, mention=False, **kw)
    ev["event"]["message"]["chat_type"] = chat_type
    if not mentions:
        ev["event"]["message"]["mentions"] = []
    return ev


def _post(paragraphs):
    ev = message_event("", message_type="post")
    ev["event"]["message"]["content"] = json.dumps({"title": "", "content": paragraphs})
    return ev


@pytest.mark.parametrize("ev, recorded", [
    (_group("@_user_1 run"), True),
    (_group("  @_user_1  状态"), True),
    (_group("run"), False),                              # no mention at all
    (_group("run", mentions=False), False),
    (_group("@_user_1 run", mentions=False), False),     # placeholder without a mention
    (_group("please look @_user_1"), False),             # mentioned later in a chat line
    (_group("@_all run"), False),
    (_group("run", mentions=False, chat_type="p2p"), True),   # p2p needs no mention
    (_post([[{"tag": "at", "user_id": "@_user_1"}, {"tag": "text", "text": " run"}]]), True),
    (_post([[{"tag": "text", "text": "hello "}, {"tag": "at", "user_id": "@_user_1"}]]), False),
])
def test_group_messages_must_at_the_bot(db, ev, recorded):
    out = intake(db).handle(signed(ev))
    assert (out.response.status, out.response.json) == (200, {})
    assert (out.recorded is not None) is recorded
    assert table_counts(db)["inbox"] == (1 if recorded else 0)


def test_unknown_event_type_is_200_and_not_stored(db):
    ev = message_event("x")
    ev["header"]["event_type"] = "im.chat.member.bot.added_v1"
    out = intake(db).handle(signed(ev))
    assert (out.response.status, out.response.json) == (200, {})
    assert table_counts(db)["inbox"] == 0


def test_card_action_goes_to_handler(db):
    clicks = []
    out = intake(db, clicks).handle(signed(card_action_event({"action": "retry", "task_id": 1})))
    assert out.response.json == {"toast": {"type": "info"}}
    assert clicks[0]["event"]["action"]["value"] == {"action": "retry", "task_id": 1}


def test_card_handler_crash_still_answers_200(db):
    def boom(p):
        raise RuntimeError("x")
    it = Intake(make_settings(), db, FakeClock(NOW), card_handler=boom)
    out = it.handle(signed(card_action_event({"action": "retry"})))
    assert out.response.status == 200 and out.response.json["toast"]["type"] == "error"
    assert out.response.json["toast"]["content"] == "操作出错，已记录日志"


def test_legacy_card_callback_sha1(db):
    clicks = []
    body = json.dumps(legacy_card_action({"action": "status", "batch_id": "b1"})).encode()
    it = intake(db, clicks)
    ok = it.handle(Request(body, sign_legacy(body, TOKEN, timestamp=str(int(NOW))), "/webhook/card"))
    assert ok.response.status == 200 and len(clicks) == 1
    bad = it.handle(Request(body, sign_legacy(body, "wrong", timestamp=str(int(NOW))),
                            "/webhook/card"))
    unsigned = it.handle(Request(body, {}, "/webhook/card"))
    on_event_path = it.handle(Request(body, sign_legacy(body, TOKEN, timestamp=str(int(NOW)))))
    assert bad.response.status == 401 and unsigned.response.status == 401
    assert on_event_path.response.status == 400
    assert len(clicks) == 1


def test_unsigned_legacy_callback_refused_when_encrypt_key_set_without_token(db):
    """An encrypt key means production: an unsigned old-style click must not act (no token to
    sign with is no excuse), exactly like a v2 plaintext event."""
    clicks = []
    body = json.dumps(legacy_card_action({"action": "cancel", "batch_id": "b1"},
                                         operator="ou_admin")).encode()
    it = intake(db, clicks, token="")
    out = it.handle(Request(body, {}, "/webhook/card"))
    assert out.response.status == 401 and out.response.json["error"] == "unsigned"
    forged = it.handle(Request(body, sign_legacy(body, "", timestamp=str(int(NOW))),
                               "/webhook/card"))
    assert forged.response.status == 401
    assert clicks == []


REJECTIONS = {
    "bad_signature": lambda: _tamper_sig(signed(message_event("run"))),
    "missing_headers": lambda: Request(signed(message_event("run")).body, {}),
    "bad_token": lambda: signed(message_event("run", token="wrong")),
    "broken_json": lambda: _signed_raw(b"{not json"),
    "broken_base64": lambda: _signed_raw(b'{"encrypt": "@@@not base64@@@"}'),
    "wrong_padding": lambda: _signed_raw(json.dumps({"encrypt": _bad_padding()}).encode()),
    "unknown_schema": lambda: signed({"schema": "1.0", "header": {"token": TOKEN}}),
    "not_encrypted": lambda: Request(json.dumps(message_event("run")).encode(),
                                     sign(json.dumps(message_event("run")).encode(), ENCRYPT_KEY,
                                          timestamp=str(int(NOW)))),
    "stale": lambda: signed(message_event("run"), ts=str(int(NOW - MAX_SKEW - 10))),
    "too_large": lambda: signed(message_event("x" * 2_000_000)),
}
EXPECTED = {"bad_signature": 401, "missing_headers": 401, "bad_token": 401, "broken_json": 400,
            "broken_base64": 400, "wrong_padding": 400, "unknown_schema": 400,
            "not_encrypted": 400, "stale": 401, "too_large": 413}


def _tamper_sig(req):
    headers = dict(req.headers)
    headers["X-Lark-Signature"] = "0" * 64
    return Request(req.body, headers)


def _signed_raw(body):
    return Request(body, sign(body, ENCRYPT_KEY, timestamp=str(int(NOW))))


def _bad_padding():
    import hashlib
    import os
    from Crypto.Cipher import AES
    key = hashlib.sha256(ENCRYPT_KEY.encode()).digest()
    iv = os.urandom(16)
    ct = AES.new(key, AES.MODE_CBC, iv).encrypt(b"{}" + b"\x00" * 14)  # pad byte 0: invalid
    return base64.b64encode(iv + ct).decode()


@pytest.mark.parametrize("case", sorted(REJECTIONS))
def test_rejections_exact_status_and_no_trace(db, case):
    before = table_counts(db)
    out = intake(db).handle(REJECTIONS[case]())
    assert out.response.status == EXPECTED[case], out.response.json
    assert out.response.json["error"] and out.recorded is None
    assert table_counts(db) == before


def test_unsigned_ciphertext_is_uniform_401(db):
    """No padding oracle: unsigned garbage and unsigned valid events get the same answer."""
    it = intake(db)
    garbage = it.handle(Request(json.dumps({"encrypt": _bad_padding()}).encode(), {}))
    valid = it.handle(Request(signed(message_event("run")).body, {}))
    assert garbage.response == valid.response
    assert garbage.response.status == 401


def test_encrypted_event_without_key_configured(db):
    out = intake(db, key="").handle(signed(message_event("run")))
    assert out.response.status == 400 and table_counts(db)["inbox"] == 0


def test_dev_mode_without_token_accepts_plain(db):
    out = intake(db, token="", key="").handle(
        Request(json.dumps(message_event("help", token="")).encode(), {}))
    assert out.response.status == 200 and out.recorded


def test_store_failure_is_503_so_feishu_repushes(db):
    db.conn.execute("DROP TABLE inbox")
    out = intake(db).handle(signed(message_event("help")))
    assert out.response.status == 503


header_names = st.sampled_from(["X-Lark-Signature", "X-Lark-Request-Timestamp",
                                "X-Lark-Request-Nonce", "Content-Type", "X-Other"])


@hsettings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=st.one_of(st.binary(max_size=300),
                      st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=20),
                                   lambda c: st.lists(c, max_size=4) |
                                   st.dictionaries(st.sampled_from(
                                       ["encrypt", "schema", "header", "event", "type", "token",
                                        "challenge", "action", "open_id", "event_type"]) |
                                       st.text(max_size=5), c, max_size=5),
                                   max_leaves=20).map(lambda v: json.dumps(v).encode())),
       headers=st.dictionaries(header_names, st.text(max_size=70), max_size=4),
       path=st.sampled_from(["/webhook/event", "/webhook/card"]),
       key=st.sampled_from(["", ENCRYPT_KEY]), token=st.sampled_from(["", TOKEN]))
def test_never_5xx_on_arbitrary_input(db, body, headers, path, key, token):
    out = intake(db, key=key, token=token).handle(Request(body, headers, path))
    assert 200 <= out.response.status < 500
    assert isinstance(out.response.json, dict)


@hsettings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(inner=st.recursive(st.none() | st.integers() | st.text(max_size=10),
                          lambda c: st.dictionaries(st.sampled_from(
                              ["schema", "header", "event", "message", "message_id", "token",
                               "event_type", "sender", "sender_type", "type", "challenge"]),
                              c, max_size=5), max_leaves=15))
def test_never_5xx_on_signed_arbitrary_json(db, inner):
    body = json.dumps({"encrypt": encrypt(json.dumps(inner), ENCRYPT_KEY)}).encode()
    out = intake(db).handle(Request(body, sign(body, ENCRYPT_KEY, timestamp=str(int(NOW)))))
    assert 200 <= out.response.status < 500

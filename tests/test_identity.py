"""The bot answers only when it is meant: its own open_id from ``bot/v3/info`` (real lark-oapi
against the fake Feishu), stored in kv, and group messages filtered by it through the real web
app, the inbox handler and the worker's Feishu thread."""
from __future__ import annotations

import json
import time

import pytest
from hypothesis import example, given, strategies as st

from bot.chat import identity
from bot.chat.addressing import addressed_to_bot, mentioned_open_ids
from bot.app import create_app
from bot.errors import FeishuError, FeishuNetworkError
from bot.feishu.client import FeishuClient
from bot.chat.handlers import process_inbox
from bot.settings import Secret, Settings
from pipeline.clock import FakeClock
from storage import kv
from tests.fake_feishu import FakeFeishu
from tests.helpers import ADMIN, ENCRYPT_KEY, TOKEN, message_event, signed_event

BOT = "ou_opsbot_self"
ALICE = "ou_alice"
APP, TABLE = "app_tok", "tbl_1"


@pytest.fixture
def fake():
    with FakeFeishu(bot_open_id=BOT, bot_name="opsbot") as server:
        yield server


@pytest.fixture
def client(fake):
    return FeishuClient(fake.settings(), timeout=2.0)


@pytest.fixture
def settings(fake, db_path):
    return Settings(feishu=fake.settings(verification_token=Secret(TOKEN),
                                         encrypt_key=Secret(ENCRYPT_KEY), admin_ids=(ADMIN,),
                                         bitable_app_token=APP, bitable_table_id=TABLE),
                    db_path=db_path, web_dispatch=True)


def group_message(text: str, *mentioned: tuple[str, str], chat_type: str = "group",
                  message_type: str = "text", content: dict | None = None) -> dict:
    """A message whose text holds ``@_user_N`` placeholders for ``mentioned`` (open_id, name)."""
    ev = message_event("", mention=False)
    msg = ev["event"]["message"]
    msg["chat_type"], msg["message_type"] = chat_type, message_type
    msg["content"] = json.dumps(content if content is not None else {"text": text},
                                ensure_ascii=False)
    msg["mentions"] = [{"key": f"@_user_{i}", "id": {"open_id": oid, "union_id": "on_x",
                                                     "user_id": "u"},
                        "name": name, "tenant_key": "tenant"}
                       for i, (oid, name) in enumerate(mentioned, start=1)]
    return ev


AT_BOT = (BOT, "opsbot")
AT_ALICE = (ALICE, "Alice")


# --- the pure rule ----------------------------------------------------------------------------

@pytest.mark.parametrize("ev, known, unknown", [
    # (message, for the bot when the id is known, ... when it is not: the older rule)
    (group_message("@_user_1 run", AT_ALICE), False, True),
    (group_message("@_user_1 run", AT_BOT), True, True),
    (group_message("@_user_1 @_user_2 run", AT_ALICE, AT_BOT), True, True),
    (group_message("@_user_1 @_user_2 run", AT_BOT, AT_ALICE), True, True),
    (group_message("please @_user_1 status", AT_BOT), True, False),
    (group_message("run"), False, False),
    (group_message("run", chat_type="p2p"), True, True),
    (group_message("@_user_1 run", AT_ALICE, chat_type="p2p"), True, True),
    (group_message("", AT_BOT, message_type="post", content={"title": "", "content": [[
        {"tag": "at", "user_id": "@_user_1"}, {"tag": "text", "text": " run"}]]}), True, True),
    (group_message("", AT_ALICE, message_type="post", content={"title": "", "content": [[
        {"tag": "at", "user_id": "@_user_1"}, {"tag": "text", "text": " run"}]]}), False, True),
])
def test_addressed_to_bot_by_open_id_and_the_older_rule(ev, known, unknown):
    message = ev["event"]["message"]
    assert addressed_to_bot(message, BOT) is known
    assert addressed_to_bot(message, None) is unknown
    assert addressed_to_bot(message) is unknown


@pytest.mark.parametrize("mentions", [None, "x", [None, 1, "s"], [{"id": "ou_x"}],
                                      [{"id": {"open_id": 7}}], [{"key": "@_user_1"}]])
def test_malformed_mentions_never_count_as_the_bot(mentions):
    message = {"chat_type": "group", "message_type": "text",
               "content": json.dumps({"text": "@_user_1 run"}), "mentions": mentions}
    assert mentioned_open_ids(message) == []
    assert addressed_to_bot(message, BOT) is False


_json = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=8),
                     lambda kids: st.lists(kids, max_size=3)
                     | st.dictionaries(st.sampled_from(["key", "id", "open_id", "name", "text",
                                                        "content", "tag", "user_id", "zh_cn"]),
                                       kids, max_size=3), max_leaves=8)


@given(message=st.fixed_dictionaries({}, optional={
    "chat_type": st.sampled_from(["group", "p2p", None, 3]),
    "message_type": st.sampled_from(["text", "post", "image", None]),
    "content": st.one_of(st.text(max_size=30), _json.map(json.dumps), st.integers(),
                         st.just('{"content": 5}'), st.just('{"zh_cn": {"content": 5}}')),
    "mentions": _json | st.just([{"key": "@_user_1", "id": {"open_id": BOT}}])}),
       bot=st.sampled_from([BOT, None, ""]))
@example(message={"chat_type": "group", "message_type": "post", "content": '{"content": 5}',
                  "mentions": [{"key": "@_user_1"}]}, bot=None)
def test_addressed_to_bot_is_total_and_only_the_bots_mention_counts(message, bot):
    answer = addressed_to_bot(message, bot)
    assert isinstance(answer, bool)
    if message.get("chat_type") != "group":
        assert answer is True
    elif bot:
        assert answer is (bot in mentioned_open_ids(message))


# --- the lookup -------------------------------------------------------------------------------

def test_bot_info_through_lark_oapi(fake, client):
    bot = client.bot_info()
    assert bot["open_id"] == BOT and bot["app_name"] == "opsbot" and bot["activate_status"] == 2
    [req] = fake.requests_to("/open-apis/bot/v3/info", "GET")
    assert req["headers"]["Authorization"] == "Bearer t-1"


def test_bot_info_refreshes_an_expired_token(fake, client):
    client.bot_info()
    fake.expire_tokens()
    assert client.bot_info()["open_id"] == BOT
    auths = [r["headers"]["Authorization"] for r in fake.requests_to("/bot/v3/info")]
    assert auths == ["Bearer t-1", "Bearer t-1", "Bearer t-2"]


def test_bot_info_errors_carry_feishu_code(fake, client):
    fake.fail("bot_info", code=230006, msg="bot ability is not activated")
    with pytest.raises(FeishuError) as err:
        client.bot_info()
    assert err.value.code == 230006 and err.value.operation == "bot_info"
    fake.fail("bot_info", body={"code": 0, "msg": "ok", "bot": {"app_name": "x"}}, status=200)
    with pytest.raises(FeishuError, match="without an open_id"):
        client.bot_info()
    fake.fail("bot_info", drop=True)
    with pytest.raises(FeishuNetworkError):
        client.bot_info()


def test_fake_refuses_bot_info_without_a_token(fake):
    import requests
    resp = requests.get(fake.base_url + "/open-apis/bot/v3/info", timeout=5)
    assert resp.status_code == 400 and resp.json()["code"] == 99991661


def test_identity_is_stored_per_app(db, fake, client):
    assert identity.bot_open_id(db, fake.app_id) is None
    ident = identity.refresh(db, client, fake.app_id, 100.0)
    assert ident == identity.BotIdentity(fake.app_id, BOT, "opsbot", 2, 100.0)
    assert identity.load(db, fake.app_id) == ident
    assert identity.bot_open_id(db, "cli_other_app") is None   # another app's bot: ignored
    assert identity.bot_open_id(db, "") is None
    kv.put(db, identity.KV_KEY, "{not json", now=1.0)
    assert identity.bot_open_id(db, fake.app_id) is None


def test_refresher_retries_every_minute_then_checks_daily(db, fake, client):
    clock = FakeClock(1000.0)
    fake.fail("bot_info", code=99991672, msg="no permission", times=2)
    r = identity.IdentityRefresher(db, client, fake.app_id, clock)
    assert r.tick() is None and r.failures == 1
    assert r.tick() is None and len(fake.requests_to("/bot/v3/info")) == 1   # not due yet
    clock.advance(identity.RETRY_SECONDS)
    assert r.tick() is None and r.failures == 2
    clock.advance(identity.RETRY_SECONDS)
    assert r.tick().open_id == BOT and r.failures == 0
    assert identity.bot_open_id(db, fake.app_id) == BOT
    clock.advance(identity.RECHECK_SECONDS - 1)
    assert r.tick() is None
    fake.bot_activate_status = 1    # the tenant switched the app off: noticed a day later
    clock.advance(1)
    assert r.tick().active is False
    assert len(fake.requests_to("/bot/v3/info")) == 4


def test_failed_lookup_keeps_the_stored_id(db, fake, client):
    identity.refresh(db, client, fake.app_id, 1.0)
    fake.fail("bot_info", status=500)
    r = identity.IdentityRefresher(db, client, fake.app_id, FakeClock(2.0))
    assert r.tick() is None
    assert identity.bot_open_id(db, fake.app_id) == BOT


def test_worker_feishu_thread_looks_the_identity_up_at_start(settings, db, fake):
    from bot.service import FeishuLoop
    from pipeline.clock import Clock

    loop = FeishuLoop(settings, Clock(), "test-owner", interval=0.05)
    loop.start()
    try:
        deadline = time.monotonic() + 10
        while identity.bot_open_id(db, fake.app_id) is None and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        loop.stop()
    assert identity.bot_open_id(db, fake.app_id) == BOT
    assert len(fake.requests_to("/bot/v3/info")) == 1


# --- through the real web app -----------------------------------------------------------------

@pytest.fixture
def web(settings, db):
    app = create_app(settings, db=db, feishu_client=FeishuClient(settings.feishu))
    return app.test_client()


def post(web, payload):
    body, headers = signed_event(payload)
    return web.post("/webhook/event", data=body, headers=headers)


def settle(db, timeout=5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        busy = db.execute("SELECT (SELECT COUNT(*) FROM inbox WHERE status = 'new')"
                          " + (SELECT COUNT(*) FROM outbox WHERE status = 'pending'"
                          "    AND kind != 'bitable_update')").fetchone()[0]
        if not busy:
            return
        time.sleep(0.02)
    raise AssertionError("dispatcher did not settle")


def replied_to(fake):
    return {m["reply_to"] for m in fake.messages if m["reply_to"]}


def test_group_messages_are_filtered_by_the_bots_open_id(web, db, fake, settings):
    identity.refresh(db, FeishuClient(settings.feishu), fake.app_id, time.time())
    cases = {
        "at_alice": (group_message("@_user_1 run", AT_ALICE), False),
        "at_bot": (group_message("@_user_1 run", AT_BOT), True),
        "at_both": (group_message("@_user_1 @_user_2 run", AT_ALICE, AT_BOT), True),
        "no_mention": (group_message("run"), False),
        "p2p": (group_message("run", chat_type="p2p"), True),
    }
    for name, (ev, _) in cases.items():
        resp = post(web, ev)
        assert (resp.status_code, resp.json) == (200, {}), name
    settle(db)
    recorded = {r[0] for r in db.execute("SELECT key FROM inbox")}
    answered = replied_to(fake)
    for name, (ev, meant) in cases.items():
        mid = ev["event"]["message"]["message_id"]
        assert (("msg:" + mid) in recorded) is meant, name
        assert (mid in answered) is meant, name
    assert fake.requests_to("/records/search")   # `run` ran for the bot's messages


def test_until_the_id_is_known_the_older_rule_holds(web, db, fake):
    at_alice = group_message("@_user_1 run", AT_ALICE)
    assert post(web, at_alice).status_code == 200
    settle(db)
    assert at_alice["event"]["message"]["message_id"] in replied_to(fake)   # today's rule


def test_handler_checks_again_with_the_id_known_now(settings, db, fake):
    """Recorded by the older rule before the worker's first lookup; handled after it."""
    app = create_app(settings, db=db, dispatch=False)
    web = app.test_client()
    at_alice, at_bot = group_message("@_user_1 status", AT_ALICE), \
        group_message("@_user_1 status", AT_BOT)
    for ev in (at_alice, at_bot):
        assert post(web, ev).status_code == 200
    assert db.execute("SELECT COUNT(*) FROM inbox").fetchone()[0] == 2
    client = FeishuClient(settings.feishu)
    identity.refresh(db, client, fake.app_id, time.time())
    process_inbox(db, settings, client, FakeClock(time.time()), "worker-1")
    replies = {r[0] for r in db.execute("SELECT target FROM outbox WHERE kind = 'reply'")}
    assert replies == {at_bot["event"]["message"]["message_id"]}
    assert {r[0] for r in db.execute("SELECT status FROM inbox")} == {"done"}


def test_a_stored_id_of_another_app_is_not_used(web, db, fake):
    kv.put_json(db, identity.KV_KEY, {"app_id": "cli_previous", "open_id": ALICE}, now=1.0)
    ev = group_message("@_user_1 status", AT_BOT)   # would be ignored if ALICE were "the bot"
    assert post(web, ev).status_code == 200
    settle(db)
    assert ev["event"]["message"]["message_id"] in replied_to(fake)

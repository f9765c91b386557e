"""FeishuClient: the real lark-oapi client against the fake Feishu server on loopback."""
from __future__ import annotations

import logging

import pytest

from bot.errors import FeishuError, FeishuNetworkError
from bot.feishu.client import FeishuClient, normalize_value
from bot.settings import Secret
from tests.fake_feishu import FakeFeishu

CARD = {"schema": "2.0", "config": {"update_multi": True},
        "header": {"title": {"tag": "plain_text", "content": "批次完成"}, "template": "green"},
        "body": {"elements": [{"tag": "markdown", "content": "**3** 成功"}]}}


@pytest.fixture
def fake():
    with FakeFeishu() as server:
        yield server


@pytest.fixture
def client(fake):
    return FeishuClient(fake.settings(), timeout=2.0)


def test_send_card_is_recorded_with_uuid_and_token(fake, client):
    message_id = client.send_card("oc_ops", CARD, "u-1")
    [msg] = fake.messages
    assert msg == {**msg, "message_id": message_id, "chat_id": "oc_ops", "msg_type": "interactive",
                   "content": CARD, "uuid": "u-1", "reply_to": None}
    [send] = fake.requests_to("/im/v1/messages", "POST")
    assert send["query"] == {"receive_id_type": "chat_id"}
    assert send["headers"]["Authorization"] == "Bearer t-1"
    assert send["headers"]["Content-Type"].startswith("application/json")


def test_send_text_reply_and_patch(fake, client):
    root = client.send_text("oc_ops", "你好", "u-1")
    reply = client.reply_card(root, CARD, "u-2")
    client.patch_card(reply, {**CARD, "header": {"title": {"tag": "plain_text",
                                                           "content": "已更新"}}})
    texts, cards = fake.messages
    assert texts["content"] == {"text": "你好"} and texts["msg_type"] == "text"
    assert cards["reply_to"] == root and cards["chat_id"] == "oc_ops"
    assert cards["message_id"] == reply != root
    [patch] = fake.patches
    assert patch["message_id"] == reply
    assert patch["content"]["header"]["title"]["content"] == "已更新"
    assert fake.messages[1]["content"]["header"]["title"]["content"] == "已更新"


def test_repeated_uuid_returns_same_message_and_adds_none(fake, client):
    first = client.send_card("oc_ops", CARD, "same")
    second = client.send_card("oc_ops", CARD, "same")
    assert first == second
    assert len(fake.messages) == 1
    assert len(fake.requests_to("/im/v1/messages", "POST")) == 2
    assert len(fake.tokens) == 1  # the token is cached between calls


def test_error_carries_code_msg_log_id_and_status(fake, client):
    fake.fail("send", code=230002, msg="Bot is not in the chat")
    with pytest.raises(FeishuError) as info:
        client.send_card("oc_gone", CARD, "u-1")
    err = info.value
    assert (err.code, err.msg, err.http_status) == (230002, "Bot is not in the chat", 400)
    assert err.log_id and err.log_id.startswith("fake-log-")
    assert err.permanent and not err.retryable
    assert "230002" in str(err) and err.log_id in str(err)
    assert fake.messages == []


def test_rate_limit_error_has_retry_after(fake, client):
    fake.fail("send", code=99991400, status=429, headers={"x-ogw-ratelimit-reset": "7"})
    with pytest.raises(FeishuError) as info:
        client.send_text("oc_ops", "x", "u-1")
    assert info.value.retry_after == 7.0
    assert info.value.retryable and info.value.rate_limited


def test_gateway_500_without_json_is_retryable(fake, client):
    fake.fail("send", status=502)
    with pytest.raises(FeishuError) as info:
        client.send_text("oc_ops", "x", "u-1")
    assert info.value.http_status == 502 and info.value.retryable
    assert type(info.value) is FeishuError


def test_dropped_connection_is_network_error(fake, client):
    fake.fail("patch", drop=True)
    message_id = client.send_card("oc_ops", CARD, "u-1")
    with pytest.raises(FeishuNetworkError) as info:
        client.patch_card(message_id, CARD)
    assert info.value.retryable
    assert fake.patches == []


def test_slow_answer_times_out(fake):
    client = FeishuClient(fake.settings(), timeout=0.3)
    fake.fail("send", delay=1.0, code=0, status=200)
    with pytest.raises(FeishuNetworkError, match="timed out"):
        client.send_text("oc_ops", "x", "u-1")


def test_expired_token_is_refreshed_and_call_retried_once(fake, client):
    client.send_text("oc_ops", "one", "u-1")
    fake.expire_tokens()
    client.send_text("oc_ops", "two", "u-2")
    assert fake.tokens == ["t-1", "t-2"]
    sends = fake.requests_to("/im/v1/messages", "POST")
    assert [s["headers"]["Authorization"] for s in sends] == ["Bearer t-1", "Bearer t-1",
                                                             "Bearer t-2"]
    assert [m["content"]["text"] for m in fake.messages] == ["one", "two"]


def test_token_rejected_twice_surfaces_error(fake, client):
    client.send_text("oc_ops", "one", "u-1")
    fake.expire_tokens()
    fake.fail("send", code=99991663, times=5)
    with pytest.raises(FeishuError) as info:
        client.send_text("oc_ops", "two", "u-2")
    assert info.value.code == 99991663 and info.value.token_invalid
    assert len(fake.requests_to("/im/v1/messages", "POST")) == 3  # 1 + first try + one retry


def test_bad_secret_gives_error_without_the_secret(fake, caplog):
    caplog.set_level(logging.DEBUG)
    client = FeishuClient(fake.settings(app_secret=Secret("wrong-secret-value")))
    with pytest.raises(FeishuError) as info:
        client.send_text("oc_ops", "x", "u-1")
    assert info.value.code == 10014
    assert "wrong-secret-value" not in str(info.value) + repr(info.value)
    assert "wrong-secret-value" not in caplog.text
    assert fake.messages == []


def test_check_token_fetches_a_fresh_token(fake, client):
    client.check_token()
    client.check_token()
    assert fake.tokens == ["t-1", "t-2"]
    [first] = fake.requests_to("tenant_access_token", "POST")[:1]
    assert first["json"] == {"app_id": fake.app_id, "app_secret": fake.app_secret}


def test_check_token_unreachable(fake):
    fake.fail("token", drop=True)
    with pytest.raises(FeishuNetworkError):
        FeishuClient(fake.settings()).check_token()


def test_search_records_follows_pages_and_normalises(fake, client):
    rows = [{"状态": "待处理", "task_id": f"t{i}", "score": i} for i in range(7)]
    rows += [{"状态": "完成", "task_id": "done"}]
    rows += [{"状态": [{"text": "待", "type": "text"}, {"text": "处理", "type": "text"}],
              "task_id": "seg", "链接": {"link": "https://example.com/v.mp4", "text": "视频"},
              "公式": {"type": 1, "value": [{"text": "ok", "type": "text"}]},
              "标签": ["a", "b"], "日期": 1750000000000}]
    fake.seed_records("app1", "tbl1", rows)
    records = client.search_records("app1", "tbl1", field_name="状态", value="待处理",
                                    page_size=3)
    assert [r["fields"]["task_id"] for r in records] == [f"t{i}" for i in range(7)] + ["seg"]
    assert records[0]["fields"] == {"状态": "待处理", "task_id": "t0", "score": 0}
    assert records[-1]["fields"] == {"状态": "待处理", "task_id": "seg",
                                     "链接": "https://example.com/v.mp4", "公式": "ok",
                                     "标签": ["a", "b"], "日期": 1750000000000}
    assert all(r["record_id"].startswith("rec") for r in records)
    searches = fake.requests_to("/records/search")
    assert [s["query"].get("page_token") for s in searches] == [None, "3", "6"]
    assert {s["query"]["page_size"] for s in searches} == {"3"}
    assert searches[0]["json"]["filter"] == {"conjunction": "and", "conditions": [
        {"field_name": "状态", "operator": "is", "value": ["待处理"]}]}


def test_search_error_is_raised(fake, client):
    fake.fail("search", code=1254607, msg="Data not ready")
    with pytest.raises(FeishuError) as info:
        client.search_records("app1", "tbl1", field_name="状态", value="待处理")
    assert info.value.code == 1254607 and info.value.retryable


def test_batch_update_records(fake, client):
    ids = fake.seed_records("app1", "tbl1", [{"状态": "待处理"}, {"状态": "待处理"}])
    client.batch_update_records("app1", "tbl1", [
        {"record_id": ids[0], "fields": {"状态": "完成", "耗时": 12.5}},
        {"record_id": ids[1], "fields": {"状态": "失败"}}])
    [call] = fake.batch_updates
    assert call["records"] == [{"record_id": ids[0], "fields": {"状态": "完成", "耗时": 12.5}},
                               {"record_id": ids[1], "fields": {"状态": "失败"}}]
    assert fake.records("app1", "tbl1") == {ids[0]: {"状态": "完成", "耗时": 12.5},
                                            ids[1]: {"状态": "失败"}}
    client.batch_update_records("app1", "tbl1", [])
    assert len(fake.batch_updates) == 1


@pytest.mark.parametrize("value, expected", [
    ([{"text": "a", "type": "text"}, {"text": "b", "type": "url", "link": "x"}], "ab"),
    ({"link": "https://a", "text": "A"}, "https://a"),
    ({"link": "", "text": "A"}, "A"),
    ({"type": 2, "value": [3]}, [3]),
    (42, 42), (1.5, 1.5), (True, True), ("plain", "plain"), (["x", "y"], ["x", "y"]),
    ([], []), (None, None),
    ([{"id": "ou_1", "name": "张三"}], [{"id": "ou_1", "name": "张三"}]),
])
def test_normalize_value(value, expected):
    assert normalize_value(value) == expected


@pytest.mark.parametrize("code, status, retryable", [
    (99991400, 429, True), (230020, 400, True), (1254290, 400, True), (1254607, 400, True),
    (1254291, 400, True), (99991663, 400, True), (99991661, 400, True), (-1, 500, True),
    (-1, 503, True), (1, 429, True),
    (230002, 400, False), (230025, 400, False), (99991672, 400, False), (230001, 400, False),
    (1254043, 400, False), (-1, 404, False),
])
def test_error_classification(code, status, retryable):
    err = FeishuError(code, "m", http_status=status)
    assert err.retryable is retryable
    assert err.permanent is (not retryable)

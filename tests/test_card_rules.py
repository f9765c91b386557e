"""The card rules Feishu applies, and the fake Feishu refusing what breaks them over real HTTP."""
from __future__ import annotations

import copy

import pytest

from bot.standins import card_rules
from bot.standins.card_rules import check_answer, check_card
from bot.chat.cards import button, card, count_components, markdown
from bot.standins.events import ADMIN, DIRECTORY
from bot.errors import FeishuError
from bot.feishu.client import FeishuClient
from tests.fake_feishu import FakeFeishu

USERS = set(DIRECTORY)


def good() -> dict:
    return {"schema": "2.0", "config": {"update_multi": True},
            "header": {"title": {"tag": "plain_text", "content": "t"}, "template": "red"},
            "body": {"elements": [
                {"tag": "markdown", "content": f"hi <at id={ADMIN}></at> <at email=a@b.cn></at>"},
                {"tag": "hr"},
                {"tag": "column_set", "columns": [{"tag": "column", "width": "auto", "elements": [
                    {"tag": "button", "text": {"tag": "plain_text", "content": "Go"},
                     "type": "primary", "behaviors": [{"type": "callback",
                                                       "value": {"action": "x"}}]}]}]},
                {"tag": "chart", "aspect_ratio": "16:9", "chart_spec": {
                    "type": "bar", "data": {"values": [{"x": "a", "y": 1}]}, "xField": "x",
                    "yField": "y"}}]}}


def broken(path_fn) -> dict:
    c = good()
    path_fn(c)
    return c


def els(c):
    return c["body"]["elements"]


def btn(c):
    return els(c)[2]["columns"][0]["elements"][0]


def test_a_good_card_passes():
    assert check_card(good(), users=USERS) == []


BAD = {
    "schema 1.0": lambda c: c.update(schema="1.0"),
    "unknown top-level property": lambda c: c.update(card_style={}),
    "1.0 elements at the top": lambda c: c.update(elements=[]),
    "unknown config property": lambda c: c["config"].update(wide_screen_mode=True),
    "update_multi false": lambda c: c["config"].update(update_multi=False),
    "header without title": lambda c: c["header"].pop("title"),
    "unknown template": lambda c: c["header"].update(template="pink"),
    "no body": lambda c: c.pop("body"),
    "action module": lambda c: els(c).append({"tag": "action", "actions": []}),
    "note": lambda c: els(c).append({"tag": "note", "elements": []}),
    "unknown component": lambda c: els(c).append({"tag": "blink"}),
    "unknown property on markdown": lambda c: els(c)[0].update(text_colour="red"),
    "button without behaviors": lambda c: btn(c).pop("behaviors"),
    "button with a string value": lambda c: btn(c).update(
        behaviors=[{"type": "callback", "value": "retry"}]),
    "button with a 1.0 value": lambda c: btn(c).update(value={"a": 1}),
    "button label over 100": lambda c: btn(c)["text"].update(content="x" * 101),
    "button type text": lambda c: btn(c).update(type="laser"),
    "open_url without url": lambda c: btn(c).update(behaviors=[{"type": "open_url"}]),
    "chart without spec": lambda c: els(c)[3].pop("chart_spec"),
    "chart ratio 3:2": lambda c: els(c)[3].update(aspect_ratio="3:2"),
    "chart with a function": lambda c: els(c)[3]["chart_spec"].update(
        label={"formatMethod": "function (v) { return v }"}),
    "chart with an arrow function": lambda c: els(c)[3]["chart_spec"].update(
        tooltip={"format": "(d) => d.x"}),
    "mention of no user": lambda c: els(c)[0].update(content="<at id=ou_nobody></at>"),
    "mention of the bot's name": lambda c: els(c)[0].update(content="<at id=opsbot></at>"),
    "mention all not allowed": lambda c: els(c)[0].update(content="<at id=all></at>"),
    "mention with user_id attribute": lambda c: els(c)[0].update(
        content=f"<at user_id={ADMIN}></at>"),
    "mention not closed": lambda c: els(c)[0].update(content=f"<at id={ADMIN}>"),
    "too deep": lambda c: els(c).append(_nest(6)),
}


def _nest(levels: int) -> dict:
    inner = {"tag": "markdown", "content": "deep"}
    for _ in range(levels // 2):
        inner = {"tag": "column_set", "columns": [{"tag": "column", "elements": [inner]}]}
    return inner


@pytest.mark.parametrize("name", sorted(BAD))
def test_each_rule_refuses(name):
    found = check_card(broken(BAD[name]), users=USERS)
    assert found, name
    assert all(v.code == card_rules.CARD_INVALID for v in found)


def test_mention_all_passes_where_the_owner_allows_it():
    c = broken(BAD["mention all not allowed"])
    assert check_card(c, users=USERS, mention_all=True) == []


def test_nested_components_count_against_the_limit():
    """60 rows of two buttons: 60 top-level elements but 300 components (Feishu counts 300)."""
    row = {"tag": "column_set", "columns": [
        {"tag": "column", "elements": [button("a", {"a": 1})]},
        {"tag": "column", "elements": [button("b", {"a": 2})]}]}
    c = good()
    c["body"]["elements"] = [copy.deepcopy(row) for _ in range(60)]
    assert any("components" in v.message for v in check_card(c, users=USERS))
    assert count_components(c["body"]["elements"]) == 300


def test_the_card_builder_trims_by_nested_components_not_top_level_elements():
    """Before the fix card() kept up to 100 top-level elements whatever they held."""
    row = {"tag": "column_set", "columns": [
        {"tag": "column", "elements": [button("a", {"a": 1})]},
        {"tag": "column", "elements": [button("b", {"a": 2})]}]}
    built = card("t", [copy.deepcopy(row) for _ in range(60)] + [markdown("last")])
    assert check_card(built, users=USERS) == []
    assert count_components(built["body"]["elements"]) <= 200
    assert built["body"]["elements"][-1] == markdown("last")
    assert "… (+" in built["body"]["elements"][-2]["content"]


def test_size_over_30_kb_is_230025():
    c = good()
    els(c).extend({"tag": "markdown", "content": "字" * 3000} for _ in range(4))
    found = check_card(c, users=USERS)
    assert [v.code for v in found] == [card_rules.CARD_TOO_BIG]


def test_answers_are_checked_like_cards():
    assert check_answer({}) == []
    assert check_answer({"toast": {"type": "success", "content": "ok"},
                         "card": {"type": "raw", "data": good()}}, users=USERS) == []
    assert check_answer({"toast": {"type": "fine", "content": "ok"}})
    assert check_answer({"toast": {"type": "info", "content": ""}})
    assert check_answer({"card": {"type": "template", "data": good()}})
    bad = broken(BAD["mention of no user"])
    found = check_answer({"card": {"type": "raw", "data": bad}}, users=USERS)
    assert found and found[0].path.startswith("$.card.data")


def test_the_fake_refuses_over_http_with_feishus_codes():
    with FakeFeishu() as fake:
        client = FeishuClient(fake.settings())
        mid = client.send_card("oc_x", good(), "u-1")
        with pytest.raises(FeishuError) as err:
            client.send_card("oc_x", broken(BAD["action module"]), "u-2")
        assert err.value.code == 230099 and "ErrCode: 11310" in err.value.msg
        assert err.value.http_status == 400 and err.value.permanent
        with pytest.raises(FeishuError) as err:
            client.patch_card(mid, broken(BAD["mention of the bot's name"]))
        assert err.value.code == 230099 and "ErrCode: 100290" in err.value.msg
        with pytest.raises(FeishuError) as err:
            client.reply_card(mid, broken(BAD["mention all not allowed"]), "u-3")
        assert err.value.code == 230099
        fake.allow_mention_all("oc_x")
        client.reply_card(mid, broken(BAD["mention all not allowed"]), "u-4")
        big = good()
        els(big).extend({"tag": "markdown", "content": "字" * 3000} for _ in range(4))
        with pytest.raises(FeishuError) as err:
            client.send_card("oc_x", big, "u-5")
        assert err.value.code == 230025
        refused = fake.take_refusals()
        assert [r["route"] for r in refused] == ["send", "patch", "reply", "send"]
        assert len(fake.messages) == 2                  # nothing refused was stored
        assert fake.messages[0]["content"] == good()    # the refused patch changed nothing


def test_a_refusal_nobody_takes_fails_the_test():
    """The conftest fixture turns an untaken refusal into a failure of the test."""
    from bot.standins.fake_feishu import unexpected_refusals
    with FakeFeishu() as fake:
        with pytest.raises(FeishuError):
            FeishuClient(fake.settings()).send_card("oc_x", broken(BAD["note"]), "u-1")
        found = unexpected_refusals()
        assert len(found) == 1 and found[0]["code"] == 230099
        assert unexpected_refusals() == []   # reported once

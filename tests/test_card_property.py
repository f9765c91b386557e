"""Every card builder, through its states, with long and hostile text: Feishu would take them all.

Each card goes through :func:`bot.standins.card_rules.check_card` with the fake Feishu's user directory and
no permission to mention everyone (the default), and its markdown through a CommonMark parser:
text from Coze, Bitable or people (marked ``ZQX``) never ends up as a link, emphasis, HTML or a
mention, whatever it held.
"""
from __future__ import annotations

import json
from zoneinfo import ZoneInfo

from hypothesis import HealthCheck, given, settings, strategies as st
from markdown_it import MarkdownIt

from bot.alerting import cards as alert_cards
from bot.chat import cards
from bot.alerting import report
from bot.standins.card_rules import check_card
from bot.chat.cards import elements
from bot.standins.events import ADMIN, DIRECTORY
from bot.chat.mdtext import _flat, clip, escape

TZ = ZoneInfo("Asia/Shanghai")
MD = MarkdownIt("commonmark").enable(["strikethrough", "table"])
MARK = "ZQX"
HOSTILE = [f"<at id=all></at>{MARK}", f"<at id=ou_x></at>{MARK}", f"<at id={ADMIN}></at>{MARK}",
           f"<at email=a@b.cn></at>{MARK}", f"**{MARK}**", f"_{MARK}_", f"`{MARK}`",
           f"[{MARK}](https://evil.example)", f"![{MARK}](https://e/i.png)",
           f"<b>{MARK}</b>", f"<font color='red'>{MARK}</font>", f"https://evil.example/{MARK}",
           f"&#60;at id=all&#62;{MARK}", f"&amp;{MARK}", f"\n# {MARK}", f"\n- {MARK}",
           f"\n> {MARK}", f"| {MARK} | b |\n|---|---|", f"~~{MARK}~~", f":{MARK}:",
           f"\\*{MARK}\\*", f"${{{MARK}}}", "视频脚本", "Video script", "😀", "\u2028", "\t"]
text = st.one_of(
    st.text(max_size=60),
    st.lists(st.sampled_from(HOSTILE), min_size=1, max_size=5).map("".join),
    st.tuples(st.sampled_from(HOSTILE), st.integers(100, 3000)).map(lambda p: p[0] * p[1]),
)
langs = st.sampled_from(["zh", "en"])
common = settings(max_examples=120, deadline=None,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def assert_feishu_takes(card, *, mention_all: bool = False) -> None:
    assert check_card(card, users=DIRECTORY, mention_all=mention_all) == [], \
        check_card(card, users=DIRECTORY, mention_all=mention_all)[:3]
    for el in elements(card, "markdown"):
        _no_markup_from_outside(el["content"])


def _no_markup_from_outside(markdown: str) -> None:
    """No link, image, emphasis, strikethrough, HTML or mention holds outside text."""
    for block in MD.parse(markdown):
        if block.type in ("heading_open", "blockquote_open", "table_open"):
            raise AssertionError(f"outside text made a {block.type}: {markdown[:200]!r}")
        inside = []
        for tok in block.children or []:
            if tok.type.endswith("_open"):
                inside.append(tok.type)
            elif tok.type.endswith("_close"):
                inside.pop()
            elif MARK in tok.content and (inside and inside != ["strong_open"] or
                                          tok.type in ("html_inline", "image")):
                raise AssertionError(f"outside text inside {inside or tok.type}: {tok.content!r}")
            elif tok.type == "html_inline" and "<at" in tok.content:
                assert MARK not in tok.content


@st.composite
def alerts(draw):
    kind = draw(st.sampled_from(["task_failed", "blocked", "breaker", "failure_rate", "latency",
                                 "fallback", "canary"]))
    n = draw(st.integers(1, 400))
    keys = [draw(text) for _ in range(min(n, 3))] + [f"t{i}" for i in range(n - 3)]
    mentions = draw(st.sampled_from([None, [], ["ou_oncall"], ["ou_oncall", ADMIN]]))
    details = {
        "kind": kind, "stage": draw(text), "error_class": draw(text), "reason": draw(text),
        "error_code": draw(st.one_of(st.none(), text)), "error_message": draw(text),
        "task_id": 7, "task_key": draw(text), "task_ids": list(range(n)), "task_keys": keys[:20],
        "batch_id": draw(text), "attempts": draw(st.integers(0, 9)),
        "debug_url": draw(st.one_of(st.none(), text, st.just("https://www.coze.cn/x?a=1&b=2"))),
        "service": draw(text), "blocked": [draw(text) for _ in range(draw(st.integers(0, 12)))],
        "since": 1_750_000_000.0, "n": n, "failed": n // 2, "rate": 0.5, "threshold": 0.4,
        "window": 600, "longest": 4000.0, "primary": draw(text), "fallback": draw(text),
        "actions": [{"at": 1_750_000_000.0, "by": draw(st.sampled_from([None, "opsbot", ADMIN, "ou_oncall",
                                                                        "someone"])),
                     "text": draw(text)} for _ in range(draw(st.integers(0, 7)))],
        "suppressed": draw(st.integers(0, 3)),
        "held": {draw(text): {"count": draw(st.integers(1, 50)), "tier": "MEDIUM"}
                 for _ in range(draw(st.integers(0, 7)))},
        "released": draw(st.integers(0, 4)),
    }
    if mentions is not None:
        details["mentions"] = mentions
    return {"key": draw(text) or "k", "tier": draw(st.sampled_from(["MEDIUM", "HIGH", "CRITICAL"])),
            "status": draw(st.sampled_from(["open", "resolved", "ignored"])),
            "count": draw(st.integers(1, 10_000)), "first_at": 1_750_000_000.0,
            "last_at": 1_750_000_100.0, "resolved_at": 1_750_000_200.0, "details": details}


@common
@given(alerts(), langs, st.one_of(st.none(), st.just(1_750_003_600.0)))
def test_every_alert_card_is_taken(alert, lang, silenced):
    assert_feishu_takes(alert_cards.alert_card(alert, lang, TZ, silenced_until=silenced))


def test_mention_all_cards_need_the_owners_permission():
    alert = {"key": "failure_rate", "tier": "CRITICAL", "status": "open", "count": 1,
             "first_at": 0.0, "last_at": 0.0, "details": {"kind": "failure_rate",
                                                          "mentions": ["all"]}}
    card = alert_cards.alert_card(alert, "zh", TZ)
    assert check_card(card, users=DIRECTORY)               # refused by default
    assert_feishu_takes(card, mention_all=True)


@common
@given(langs, st.sampled_from(["queued", "running", "paused", "blocked", "done", "cancelled"]),
       st.integers(0, 10_000), st.lists(st.tuples(text, st.integers(1, 500)), max_size=40),
       st.lists(text, max_size=30), text)
def test_batch_cards_are_taken(lang, status, total, failures, task_keys, message):
    batch = {"id": "b1f2e3d4", "status": status, "created_at": 1_750_000_000.0,
             "started_at": 1_750_000_010.0, "finished_at": 1_750_000_900.0}
    counts = {"total": total, "succeeded": total // 2, "failed": total // 4, "running": 1,
              "queued": 2, "retrying": 1, "cancelled": 0, "ignored": 3}
    assert_feishu_takes(alert_cards.progress_card(batch, counts, failures, lang,
                                                  1_750_000_500.0))
    groups = [{"error_class": ec, "count": n, "message": message, "task_keys": task_keys[:20]}
              for ec, n in failures]
    assert_feishu_takes(alert_cards.summary_card(batch, counts, groups, lang, 1_750_001_000.0))
    # the videos the batch made, each a link named by its (outside) task key
    videos = [(k.replace(MARK, "ZQY"), f"https://videos.example/b1/{i}.mp4")
              for i, k in enumerate(task_keys)]
    for link_base in (False, True):
        outputs = {"count": len(videos) + 3, "videos": videos, "folder": "/srv/out/b1f2e3d4",
                   "link_base": link_base}
        summary = alert_cards.summary_card(batch, counts, groups, lang, 1_750_001_000.0,
                                           outputs=outputs)
        assert_feishu_takes(summary)
        if link_base and videos:
            assert _link_labels(summary) == [_seen(clip(k, 40)) for k, _ in videos[:len(
                _link_labels(summary))]]


def _seen(raw: str) -> str:
    """What a reader sees of outside text shown escaped (line breaks become spaces)."""
    return "".join(_flat(c) for c in raw)


def _link_labels(card) -> list[str]:
    """The text of every link in the card's markdown, as a reader sees it."""
    labels = []
    for el in elements(card, "markdown"):
        for block in MD.parse(el["content"]):
            label = None
            for tok in block.children or []:
                if tok.type == "link_open":
                    label = ""
                elif tok.type == "link_close":
                    labels.append(label)
                    label = None
                elif label is not None:
                    label += tok.content
    return labels


@common
@given(langs, text, st.lists(st.fixed_dictionaries({
    "task_key": text, "id": st.integers(1, 10**6), "batch_id": text,
    "error_class": st.one_of(st.none(), text), "error_code": st.one_of(st.none(), text),
    "error_message": st.one_of(st.none(), text)}), max_size=60))
def test_command_cards_are_taken(lang, hostile, failed):
    shown = escape(hostile)
    for card in (cards.info_card(shown, lang), cards.success_card(shown, lang),
                 cards.error_card(shown, lang), cards.help_card(lang),
                 cards.help_card(lang, error=shown),
                 cards.refusal_card(hostile, ["ou_admin", "ou_oncall"], lang),
                 cards.refusal_card(hostile, [], lang),
                 cards.run_queued_card("b1f2e3d4", 12, lang, filters=shown),
                 cards.status_card(None, None, lang),
                 cards.status_card({"id": "b1f2e3d4", "status": "blocked",
                                    "blocked_reason": shown},
                                   {"total": 3, "failed": 1}, lang,
                                   breakers=[{"service": "coze", "state": "open"}]),
                 cards.errors_card(failed, lang), cards.errors_card([], lang)):
        assert_feishu_takes(card)


@common
@given(langs, st.lists(st.tuples(text, st.integers(1, 99)), max_size=30),
       st.one_of(st.none(), st.floats(0, 1)))
def test_report_cards_are_taken(lang, names, rate):
    hourly = [{"hour": h, "succeeded": h % 5, "failed": h % 3} for h in range(24)]
    ranked = [{"name": n, "count": c} for n, c in names]
    data = {"date": "2026-11-29", "runs": 10, "succeeded": 7, "failed": 3, "ignored": 1,
            "cancelled": 0, "success_rate": rate, "retries": 4, "failures": 5,
            "latency": {s: {"avg": 1.5, "p95": 3.0, "count": 4} for s in report.STAGES},
            "top_nodes": ranked[:3], "errors": ranked, "hourly": hourly,
            "trend": {"runs": 2, "success_rate": None, "retries": -1, "failures": 0}}
    assert_feishu_takes(report.report_card(data, lang))


def test_the_property_check_sees_a_link_from_outside():
    """The markup check fails on what it must catch (so the property tests can fail)."""
    import pytest
    with pytest.raises(AssertionError):
        _no_markup_from_outside(f"**Reason**: [{MARK}](https://evil.example)")
    with pytest.raises(AssertionError):
        _no_markup_from_outside(f"# {MARK}")
    _no_markup_from_outside(f"**Reason**: {escape(f'[{MARK}](https://evil.example)')}")
    json.dumps({})

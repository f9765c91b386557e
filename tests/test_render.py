"""bot.ops.render: Feishu cards and messages as terminal text."""
from __future__ import annotations

import io
import re
from zoneinfo import ZoneInfo

from bot.alerting import cards as alert_cards
from bot.chat import cards
from bot.ops import render
from bot.alerting.report import report_card

TZ = ZoneInfo("Asia/Shanghai")
ANSI = re.compile(r"\033\[[0-9;]*m")


def alert(status="open", tier="MEDIUM", kind="task_failed", **details):
    d = {"kind": kind, "stage": "coze", "error_class": "plugin_timeout",
         "error_code": "720701002", "error_message": "Access plugin server url timed out",
         "task_id": 3, "task_key": "V003", "batch_id": "b1", "attempts": 2,
         "debug_url": "https://www.coze.cn/work_flow?execute_id=1&workflow_id=2",
         "mentions": ["ou_zs"], **details}
    return {"key": "b1:coze:plugin_timeout", "tier": tier, "status": status, "count": 1,
            "first_at": 1.75e9, "last_at": 1.75e9, "resolved_at": 1.75e9 + 60 if
            status == "resolved" else None, "details": d}


def report(hourly=None, errors=None):
    return {"date": "2025-06-01", "runs": 9, "succeeded": 8, "failed": 1, "ignored": 0,
            "cancelled": 0, "success_rate": 8 / 9,
            "latency": {"coze": {"avg": 2.1, "p95": 3.0, "count": 8},
                        "synthesis": {"avg": 0.01, "p95": 0.02, "count": 8}},
            "retries": 2, "failures": 3, "top_nodes": [{"name": "视频生成", "count": 2}],
            "errors": errors if errors is not None else
            [{"name": "plugin_timeout", "count": 2}, {"name": "auth", "count": 1}],
            "hourly": hourly or [{"hour": h, "succeeded": {14: 6, 15: 2}.get(h, 0),
                                  "failed": 1 if h == 14 else 0} for h in range(24)],
            "trend": {"runs": 9, "success_rate": None, "retries": 2, "failures": 3}}


def test_help_card_shows_title_colour_and_every_command():
    text = render.render_card(cards.help_card("en"))
    lines = text.splitlines()
    assert lines[0].startswith("┌─ [blue] ") and lines[-1] == "└─"
    assert all(line.startswith("│ ") for line in lines[1:-1])
    from bot.chat.commands import COMMANDS
    for name in COMMANDS:
        assert name in text
    assert "**" not in text and not ANSI.search(text)


def test_help_card_with_an_error_is_orange_and_says_why():
    text = render.render_card(cards.help_card("zh", error="不认识的命令 foo"))
    assert text.startswith("┌─ [orange] ") and "不认识的命令 foo" in text


def test_open_alert_lists_its_buttons_and_the_mention_by_name():
    card = alert_cards.alert_card(alert(), "en", TZ)
    text = render.render_card(card, names={"ou_zs": "张三"})
    assert text.splitlines()[0] == "┌─ [orange] [MEDIUM] Task failed: plugin_timeout"
    assert "[ Retry ]  [ Ignore ]  [ Silence 1h ]" in text
    assert "@张三" in text and "<at" not in text
    assert "[720701002] Access plugin server url timed out" in text
    assert "Open the run <https://www.coze.cn/work_flow?execute_id=1&workflow_id=2>" in text
    assert render.button_labels(card) == ["Retry", "Ignore", "Silence 1h"]


def test_resolved_alert_is_green_without_buttons():
    text = render.render_card(alert_cards.alert_card(alert("resolved"), "en", TZ))
    assert text.startswith("┌─ [green] [MEDIUM]")
    assert "Resolved at" in text and "[ Retry ]" not in text


def test_high_and_critical_cards():
    high = alert_cards.alert_card(alert(tier="HIGH", kind="blocked", error_class="auth"), "en", TZ)
    text = render.render_card(high)
    assert text.startswith("┌─ [red] [HIGH] Batch blocked: auth") and "[ Resume ]" in text
    crit = alert_cards.alert_card({"key": "breaker:coze", "tier": "CRITICAL", "status": "open",
                                   "count": 1, "first_at": 1.75e9, "last_at": 1.75e9,
                                   "details": {"kind": "breaker", "service": "coze",
                                               "reason": "5 failures", "blocked": ["b1"],
                                               "mentions": ["all"]}}, "en", TZ)
    text = render.render_card(crit)
    assert text.startswith("┌─ [carmine] [CRITICAL]") and "@all" in text


def test_progress_summary_status_and_queued_cards():
    batch = {"id": "b1", "status": "running", "started_at": 100.0, "created_at": 100.0,
             "finished_at": 160.0}
    counts = {"total": 8, "succeeded": 5, "failed": 1, "retrying": 0, "running": 2, "queued": 0,
              "cancelled": 0, "ignored": 0}
    progress = render.render_card(alert_cards.progress_card(
        batch, counts, [("plugin_timeout", 1)], "en", 160.0))
    assert "6/8" in progress and "plugin_timeout: 1" in progress
    assert "[ Cancel batch ]  [ Retry all failed ]" in progress
    summary = render.render_card(alert_cards.summary_card(
        dict(batch, status="done"), counts, [{"error_class": "plugin_timeout", "count": 1,
                                              "message": "timed out", "task_keys": ["V003"]}],
        "en", 160.0))
    assert summary.startswith("┌─ [orange] Batch finished with failures b1")
    assert "V003" in summary and "[ Retry all failed ]" in summary
    queued = render.render_card(cards.run_queued_card("b1", 8, "en"))
    assert "b1" in queued and "[ Status ]" in queued
    status = render.render_card(cards.status_card(dict(batch, status="blocked",
                                                       blocked_reason="auth: 4100"), counts,
                                                  "en", breakers=[{"service": "coze",
                                                                   "state": "open"}]))
    assert status.startswith("┌─ [red]") and "coze=open" in status
    assert "[ Resume ]  [ Retry failed ]" in status


def test_report_card_chart_becomes_a_text_bar_chart():
    text = render.render_card(report_card(report(), "en"))
    assert "Daily report 2025-06-01" in text.splitlines()[0]
    assert "chart: bar, count by hour  (█ succeeded  ░ failed)" in text
    row14 = next(line for line in text.splitlines() if line.startswith("│   14 "))
    assert "█" in row14 and "░" in row14 and row14.endswith("6/1")
    row15 = next(line for line in text.splitlines() if line.startswith("│   15 "))
    assert row15.endswith("2/0") and row15.count("█") < row14.count("█")
    assert "(22 empty rows not shown)" in text
    assert "count by error_class" in text and "plugin_timeout" in text


def test_an_empty_report_chart_says_so():
    empty = [{"hour": h, "succeeded": 0, "failed": 0} for h in range(24)]
    text = render.render_card(report_card(report(hourly=empty, errors=[]), "en"))
    assert "(all zero)" in text


def test_unknown_and_malformed_elements_never_crash():
    card = {"schema": "2.0", "header": {"title": {"tag": "plain_text", "content": "t"}},
            "body": {"elements": [
                {"tag": "mystery_widget", "x": 1}, "not a dict", None, 42,
                {"tag": "markdown"}, {"tag": "button"}, {"tag": "column_set", "columns": None},
                {"tag": "chart", "chart_spec": {"type": "pie"}},
                {"tag": "chart", "chart_spec": {"type": "bar", "data": {"values": [
                    {"x": "a", "y": "not a number"}, "junk"]}, "xField": "x", "yField": "y"}},
                {"tag": "img", "img_key": "img_v2_abc"},
                {"tag": "collapsible_panel", "header": {"title": {"content": "more"}},
                 "elements": [{"tag": "markdown", "content": "inside"}]},
                {"tag": "table", "columns": [{"name": "a", "display_name": "A"}],
                 "rows": [{"a": 1}]},
                {"tag": "note", "elements": [{"tag": "plain_text", "content": "a note"}]},
            ]}}
    text = render.render_card(card)
    for part in ("[mystery_widget]", "[str]", "[NoneType]", "[int]", "[ ? ]", "[chart: pie]",
                 "[image img_v2_abc]", "▸ more", "inside", "A", "a note", "(all zero)"):
        assert part in text, part
    assert render.render_card(None) == "[card: None]"
    assert render.render_card({}) .startswith("┌─ [default]")
    assert render.render_card({"elements": [{"tag": "markdown", "content": "old style"}],
                               "header": {"title": {"content": "legacy"}}}).count("old style")


def test_long_content_is_cut_sensibly():
    many = "\n".join(f"line {i}" for i in range(200))
    card = cards.card("title " + "长" * 300, [cards.markdown(many),
                                             cards.markdown("x" * 500 + " tail")])
    text = render.render_card(card, cols=60)
    lines = text.splitlines()
    assert all(render.width(line) <= 64 for line in lines)
    assert lines[0].endswith("…")
    assert "line 0" in text and "line 150" not in text
    assert re.search(r"… \(\d+ more lines\)", text)
    assert any(line.endswith("…") and "xxx" in line for line in lines)


def test_cjk_width_and_cut():
    assert render.width("张三") == 4 and render.width("ab") == 2
    assert render.width("\033[1mab\033[0m") == 2
    assert render.cut("张三李四王五", 7) == "张三李…"
    assert render.cut("short", 10) == "short"


def test_colour_only_when_asked_and_only_on_a_terminal(monkeypatch):
    card = alert_cards.alert_card(alert(), "en", TZ)
    coloured = render.render_card(card, color=True)
    assert ANSI.search(coloured) and "\033[33m" in coloured      # orange header
    assert ANSI.sub("", coloured) == render.render_card(card)
    monkeypatch.delenv("NO_COLOR", raising=False)
    assert render.use_color(io.StringIO()) is False

    class Tty(io.StringIO):
        def isatty(self):
            return True
    assert render.use_color(Tty()) is True
    monkeypatch.setenv("NO_COLOR", "1")
    assert render.use_color(Tty()) is False


def test_text_post_and_other_messages_and_toasts():
    assert render.render_message("text", {"text": "✅ done <at id=ou_zs></at>"},
                                 names={"ou_zs": "张三"}) == "✅ done @张三"
    assert render.render_message("text", '{"text": "from json"}') == "from json"
    post = {"zh_cn": {"title": "T", "content": [[{"tag": "text", "text": "hello "},
                                                 {"tag": "a", "text": "link"}]]}}
    assert render.render_message("post", post) == "T\nhello link"
    assert render.render_message("image", {"image_key": "k"}) == "[image message]"
    assert render.render_message("interactive", cards.info_card("hi", "en")).startswith("┌─")
    assert render.render_toast({"type": "success", "content": "ok"}) == "⟨toast success⟩ ok"
    assert render.render_toast(None) == "(no toast)"


def test_escaped_outside_text_is_shown_as_typed_and_code_spans_stay_literal():
    from bot.chat.mdtext import code, escape
    from bot.ops.render import render_markdown
    shown = render_markdown(f"**Reason**: {escape('<at id=all></at> **x**')} {code('a_b')}")
    assert shown == "Reason: <at id=all></at> **x** a_b"
    assert render_markdown("`&#60;`") == "&#60;"   # entities are not decoded in code spans

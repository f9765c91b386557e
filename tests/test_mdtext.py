"""Outside text in card markdown: rendered by a CommonMark parser, it is only ever text.

markdown-it-py (CommonMark, plus GFM strikethrough and tables) stands in for Feishu's renderer:
whatever a user, Coze or Bitable sent, the escaped text renders as one text run equal to what
was typed (line breaks flattened), never as emphasis, code, a link, an image, HTML or a mention.
"""
from __future__ import annotations

import re

from hypothesis import given, settings, strategies as st
from markdown_it import MarkdownIt

from bot.chat import mdtext

MD = MarkdownIt("commonmark").enable(["strikethrough", "table"])

HOSTILE = ["<at id=all></at>", "<at id=ou_x></at>", "<at email=a@b.c></at>", "**bold**",
           "_it_", "`code`", "``", "[x](https://evil.example)", "![i](https://e/i.png)",
           "<b>html</b>", "<font color='red'>r</font>", "https://evil.example/x", "www.evil.cn",
           "a@b.com", "&#60;at id=all&#62;", "&amp;", "&lt;", "# heading", "- item", "1. one",
           "> quote", "| a | b |\n|---|---|", "~~s~~", ":smile:", "\\*", "${var}", "{{x}}",
           "line\nbreak", "tab\there", "\r\n# h", "\u2028# h", "全角＜at＞", "😀", "---", "==="]
texts = st.one_of(st.text(max_size=80), st.sampled_from(HOSTILE),
                  st.lists(st.sampled_from(HOSTILE), max_size=6).map("".join))


def _inline_tokens(markdown: str):
    blocks = MD.parse(markdown)
    kinds = [t.type for t in blocks]
    inline = [t for t in blocks if t.type == "inline"]
    return kinds, [c for t in inline for c in (t.children or [])
                   if not (c.type == "text" and c.content == "")]


def _flat(s: str) -> str:
    return "".join(" " if mdtext._flat(c) != c else c for c in s)


@settings(max_examples=400, deadline=None)
@given(texts)
def test_escaped_text_renders_as_exactly_the_text_typed(text):
    shown = mdtext.escape(text)
    assert "<" not in shown and "`" not in shown and "\n" not in shown
    kinds, children = _inline_tokens("**Reason**: " + shown)
    if not _flat(text).strip():
        return
    assert kinds == ["paragraph_open", "inline", "paragraph_close"], kinds
    # our own bold, then text only: no link, image, code, html, emphasis, strikethrough
    assert [c.type for c in children][:3] == ["strong_open", "text", "strong_close"]
    rest = children[3:]
    assert {c.type for c in rest} <= {"text"}, [c.type for c in rest]
    assert "".join(c.content for c in rest).rstrip() == (": " + _flat(text)).rstrip()


@settings(max_examples=300, deadline=None)
@given(texts)
def test_code_is_a_code_span_holding_the_text_or_escaped_text(text):
    shown = mdtext.code(text)
    kinds, children = _inline_tokens("Task: " + shown)
    if not _flat(text).strip():
        return
    if shown.startswith("`"):
        assert [c.type for c in children] == ["text", "code_inline"]
        assert children[1].content == text
    else:
        assert shown == mdtext.escape(text)
        assert {c.type for c in children} == {"text"}


def test_one_name_for_escaping_and_for_clipping():
    """mdtext.escape and mdtext.clip are the only helpers of their kind (no aliases to drift)."""
    from bot.chat import cards
    from bot.chat import commands
    from bot.alerting import report
    assert not hasattr(commands, "neutral") and not hasattr(cards, "_cut")
    assert report.report_lines.__defaults__[-1] is mdtext.escape
    assert "&#" in mdtext.escape("*")   # before: only < > [ ] were escaped, `*` made bold text


def test_a_code_span_never_carries_entities():
    """Entities are not decoded inside code spans: a key with < is escaped, not code-spanned."""
    assert mdtext.code("t-1.a_b") == "`t-1.a_b`"
    assert mdtext.code("a<b") == "a&#60;b"
    assert mdtext.code("a`b") == "a&#96;b"
    assert mdtext.code(" padded ") == " padded "


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(HOSTILE + ["abc", "中文"]), min_size=1, max_size=40),
       st.integers(min_value=1, max_value=200))
def test_cut_never_splits_an_entity_a_mention_or_a_code_span(parts, n):
    markdown = " ".join(mdtext.escape(p) if i % 2 else mdtext.code(p)
                        for i, p in enumerate(parts)) + " <at id=ou_admin></at> `k` &#60;"
    out = mdtext.cut(markdown, n)
    assert len(out) <= max(n, 1)
    if out != markdown:
        assert out.endswith(mdtext.ELLIPSIS)
        body = out[:-1]
        assert markdown.startswith(body)
        assert not re.search(r"&#?[0-9A-Za-z]*$", body), body[-12:]   # no half entity
        assert body.count("<at") == body.count("</at>")
        assert body.count("`") % 2 == 0


@settings(max_examples=300, deadline=None)
@given(texts)
def test_plain_gives_back_what_was_typed(text):
    assert mdtext.plain(f"**Task** {mdtext.code(text)} is {mdtext.escape(text)}") == \
        f"Task {_flat(text) if not mdtext.code(text).startswith('`') else text} is {_flat(text)}"


def test_clip_cuts_raw_text_before_it_is_escaped():
    assert mdtext.clip("abcdef", 4) == "abc…"
    assert mdtext.escape(mdtext.clip("<<<<<<", 3)) == "&#60;&#60;…"

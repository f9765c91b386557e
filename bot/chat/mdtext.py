"""Text from outside (users, Coze, Bitable) inside card markdown, and card markdown as plain text.

Feishu's Card JSON 2.0 markdown follows CommonMark and decodes HTML entities outside code spans.
Anything a person typed, a workflow answered or a Bitable cell held goes through one of:

- :func:`escape`: every character that CommonMark, GFM or Feishu could read as markup (emphasis,
  links and autolinks, images, code, HTML and ``<at>`` mentions, headings, lists, quotes, tables,
  strikethrough, ``:emoji:``) becomes a numeric entity (``<`` -> ``&#60;``); line breaks, tabs
  and other control characters become spaces, so the text cannot start a block of its own.
- :func:`code`: the text as a code span when that is safe (no backtick, ``<``, ``>`` or control
  character: entities are not decoded inside code spans, so nothing could be escaped there),
  otherwise :func:`escape`.

Cut outside text *before* escaping it (:func:`clip`); :func:`cut` shortens finished markdown
without splitting an entity, a mention tag or a code span. :func:`plain` turns the markdown this
project writes (bold, code spans, entities) back into plain text, for toasts, which Feishu shows
as typed.
"""
from __future__ import annotations

import html
import re
import unicodedata

#: ASCII characters with a meaning somewhere in CommonMark, GFM or Feishu's markdown.
SPECIAL = frozenset("\\`*_{}[]()<>#+-.!|~&:@=$")
ELLIPSIS = "…"

_ENTITY = re.compile(r"&(#\d{1,7}|#[xX][0-9a-fA-F]{1,6}|[A-Za-z][A-Za-z0-9]{1,31});")
_CODE_SPAN = re.compile(r"`[^`]*`")
_AT_TAG = re.compile(r"<at\b[^>]*>.*?</at>", re.DOTALL)


def _flat(ch: str) -> str:
    """A control or line-separating character becomes a space (no new block can start)."""
    return " " if unicodedata.category(ch) in ("Cc", "Zl", "Zp") else ch


def escape(text: object) -> str:
    """``text`` shown exactly as typed in card markdown: no markup, link or mention survives."""
    return "".join(f"&#{ord(c)};" if c in SPECIAL else _flat(c) for c in str(text))


def code(text: object) -> str:
    """``text`` as a code span when it can be one safely, else :func:`escape` d."""
    s = str(text)
    if (s and s == s.strip() and not any(c in "`<>" for c in s)
            and all(_flat(c) == c for c in s)):
        return f"`{s}`"
    return escape(s)


def clip(text: object, n: int) -> str:
    """Raw text shortened to ``n`` characters (``…`` last); escape it afterwards."""
    s = str(text if text is not None else "")
    return s if len(s) <= n else s[: max(0, n - 1)] + ELLIPSIS


def cut(markdown: str, n: int) -> str:
    """Markdown shortened to at most ``n`` characters, ending in ``…``.

    The cut never falls inside an entity (``&#60;``), an ``<at ...></at>`` tag or a code span:
    it moves back to where that began, so what is left renders as intended.
    """
    if len(markdown) <= n:
        return markdown
    end = max(0, n - 1)
    moved = True
    while moved:
        moved = False
        for pattern in (_ENTITY, _AT_TAG, _CODE_SPAN):
            for m in pattern.finditer(markdown):
                if m.start() < end < m.end():
                    end, moved = m.start(), True
    return markdown[:end] + ELLIPSIS


def plain(markdown: str) -> str:
    """The markdown this project writes as the plain text a reader sees (for toasts).

    Code spans keep their content as it is; elsewhere ``**`` goes and entities are decoded.
    """
    out, pos = [], 0
    for m in _CODE_SPAN.finditer(markdown):
        out.append(_plain_outside(markdown[pos:m.start()]))
        out.append(m.group(0)[1:-1])
        pos = m.end()
    out.append(_plain_outside(markdown[pos:]))
    return "".join(out)


def _plain_outside(text: str) -> str:
    return html.unescape(text.replace("**", ""))

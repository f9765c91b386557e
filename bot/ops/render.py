"""Feishu messages and Card JSON 2.0 rendered as terminal text (used by ``opsbot demo``).

::

    ┌─ [orange] [MEDIUM] 任务失败：plugin_timeout
    │ 阶段：coze
    │ 原因：[720701002] Access plugin server url timed out
    │ ──────────────────────────────
    │ [ 重试 ]  [ 忽略 ]  [ 静默 1 小时 ]
    └─

The header shows the card's colour (``template``) by name, and in colour when ``color=True``
(:func:`use_color` says whether a stream is a terminal and ``NO_COLOR`` is unset). Markdown is
simplified (``**bold**``, `` `code` ``, links as ``text <url>``, ``<at id=...>`` mentions as
``@name``, entities such as ``&#60;`` decoded outside code spans, as Feishu shows them), buttons are listed as ``[ Label ]``, a ``chart`` (VChart bar spec) becomes a small
text bar chart. Unknown elements render as ``[tag]`` and never raise. Long lines are cut with
``…`` and long elements keep their first :data:`MAX_LINES` lines.
"""
from __future__ import annotations

import html
import json
import os
import re
import unicodedata
from typing import Any, Iterable, Mapping, TextIO

from bot.chat.cards import elements

MAX_LINES = 40          # lines of one element before "… (N more lines)"
BAR_WIDTH = 28          # characters of the longest bar in a chart
MAX_BARS = 24           # rows of a chart

ANSI = {"blue": "34", "wathet": "36", "turquoise": "36", "green": "32", "yellow": "33",
        "orange": "33", "red": "31", "carmine": "1;31", "violet": "35", "purple": "35",
        "indigo": "34", "grey": "90", "default": "0"}
BUTTON_ANSI = {"primary": "1;34", "danger": "1;31", "primary_filled": "1;34",
               "danger_filled": "1;31"}
SERIES_CHARS = "█░▓▒#+"

_AT = re.compile(r"<at\s+(?:id|user_id|open_id)=[\"']?([^\s\"'>]+)[\"']?\s*>(?:[^<]*)</at>")
_LINK = re.compile(r"\[([^\]]*)\]\(([^)\s]+)\)")
_BOLD = re.compile(r"\*\*(.+?)\*\*")
_CODE_SPLIT = re.compile(r"(`[^`\n]+`)")
_FONT = re.compile(r"</?font[^>]*>")


def use_color(stream: TextIO) -> bool:
    """True when ``stream`` is a terminal and the user did not ask for ``NO_COLOR``."""
    if os.environ.get("NO_COLOR"):
        return False
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty())
    except (ValueError, OSError):
        return False


class Style:
    """ANSI styling that turns into plain text when colour is off."""

    def __init__(self, color: bool) -> None:
        self.color = color

    def __call__(self, text: str, code: str | None) -> str:
        if not self.color or not code or code == "0":
            return text
        return f"\033[{code}m{text}\033[0m"

    def bold(self, text: str) -> str:
        return self(text, "1")

    def dim(self, text: str) -> str:
        return self(text, "2")


def width(text: str) -> int:
    """Display width in a terminal (CJK characters take two columns; ANSI codes none)."""
    text = re.sub(r"\033\[[0-9;]*m", "", text)
    return sum(2 if unicodedata.east_asian_width(ch) in ("W", "F") else
               0 if unicodedata.combining(ch) else 1 for ch in text)


def cut(text: str, limit: int) -> str:
    """``text`` cut to ``limit`` display columns, ending in ``…`` when shortened."""
    if limit <= 1 or width(text) <= limit:
        return text
    out, used = [], 0
    for ch in text:
        w = width(ch)
        if used + w > limit - 1:
            break
        out.append(ch)
        used += w
    return "".join(out) + "…"


# --- cards ------------------------------------------------------------------------------------

def render_card(card: Any, *, color: bool = False, cols: int = 100,
                names: Mapping[str, str] | None = None, indent: str = "") -> str:
    """A card (Card JSON 2.0, or the older ``elements`` form) as framed text."""
    st = Style(color)
    names = names or {}
    if not isinstance(card, Mapping):
        return indent + f"[card: {cut(str(card), cols)}]"
    if card.get("type") == "template":
        data = card.get("data") or {}
        return indent + f"[template card {data.get('template_id', '?')}]"
    header = card.get("header") if isinstance(card.get("header"), Mapping) else {}
    template = str(header.get("template") or "default")
    title = _text_of(header.get("title")) or ""
    subtitle = _text_of(header.get("subtitle"))
    inner = max(20, cols - 2)
    lines = [indent + "┌─ " + st(f"[{template}] ", ANSI.get(template, "0"))
             + st.bold(cut(title, inner - width(template) - 4))]
    if subtitle:
        lines.append(indent + "│ " + st.dim(cut(subtitle, inner)))
    body = card.get("body") if isinstance(card.get("body"), Mapping) else {}
    elements = body.get("elements") if body else card.get("elements")
    for line in _elements(elements or [], st, inner, names):
        lines.append(indent + "│ " + line)
    lines.append(indent + "└─")
    return "\n".join(lines)


def _elements(elements: Any, st: Style, w: int, names: Mapping[str, str]) -> list[str]:
    out: list[str] = []
    if not isinstance(elements, list):
        return [f"[{type(elements).__name__}]"]
    for el in elements:
        try:
            out += _element(el, st, w, names)
        except Exception as exc:  # noqa: BLE001 - a strange element must not stop the demo
            out.append(f"[{_tag(el)}: {type(exc).__name__}]")
    return out


def _tag(el: Any) -> str:
    return str(el.get("tag", "?")) if isinstance(el, Mapping) else type(el).__name__


def _element(el: Any, st: Style, w: int, names: Mapping[str, str]) -> list[str]:
    tag = _tag(el)
    if not isinstance(el, Mapping):
        return [f"[{tag}]"]
    if tag in ("markdown", "lark_md"):
        return _limit(_fit(str(el.get("content", "")), st, w, names))
    if tag in ("plain_text", "div", "note"):
        text = _text_of(el.get("text")) or _text_of(el) or ""
        fields = [_text_of(f.get("text")) for f in el.get("fields") or [] if isinstance(f, Mapping)]
        parts = [text] + [f for f in fields if f]
        if tag == "note":
            parts += [_text_of(e) or "" for e in el.get("elements") or []]
        lines = _fit("\n".join(p for p in parts if p), st, w, names)
        return _limit([st.dim(x) for x in lines] if tag == "note" else lines)
    if tag == "hr":
        return [st.dim("─" * min(w, 40))]
    if tag == "button":
        return [render_button(el, st)]
    if tag in ("column_set", "action"):
        items = el.get("columns") if tag == "column_set" else el.get("actions")
        return _columns(items or [], st, w, names)
    if tag == "column":
        return _elements(el.get("elements") or [], st, w, names)
    if tag == "chart":
        return render_chart(el.get("chart_spec") or {}, st, w)
    if tag in ("img", "image"):
        alt = _text_of(el.get("alt")) or el.get("img_key") or ""
        return [st.dim(f"[image {cut(str(alt), w - 8)}]")]
    if tag == "collapsible_panel":
        title = _text_of((el.get("header") or {}).get("title")) or ""
        return [f"▸ {cut(title, w - 2)}"] + _elements(el.get("elements") or [], st, w, names)
    if tag == "table":
        return _table(el, w)
    return [st.dim(f"[{tag}]")]


def _columns(items: list[Any], st: Style, w: int, names: Mapping[str, str]) -> list[str]:
    """A row of buttons becomes one line; other columns are rendered one after another."""
    flat = []
    for col in items:
        if isinstance(col, Mapping) and col.get("tag") == "column":
            flat += [e for e in col.get("elements") or []]
        else:
            flat.append(col)
    if flat and all(_tag(e) == "button" for e in flat):
        row = "  ".join(render_button(b, st) for b in flat)
        return [row if width(row) <= w else cut("  ".join(render_button(b) for b in flat), w)]
    return _elements(flat, st, w, names)


def render_button(el: Mapping[str, Any], st: Style | None = None) -> str:
    st = st or Style(False)
    label = _text_of(el.get("text")) or "?"
    return st(f"[ {label} ]", BUTTON_ANSI.get(str(el.get("type") or "")))


def button_labels(card: Any) -> list[str]:
    """Labels of every button on a card, in order."""
    return [_text_of(b.get("text")) or "?" for b in elements(card, "button")]


def _fit(text: str, st: Style, w: int, names: Mapping[str, str]) -> list[str]:
    """Markdown as lines of at most ``w`` columns (a cut line loses its colours, not a code)."""
    styled = render_markdown(text, st, names).splitlines()
    plain = render_markdown(text, Style(False), names).splitlines()
    if len(styled) != len(plain):
        styled = plain
    return [s if width(s) <= w else cut(p, w) for s, p in zip(styled, plain)]


def _table(el: Mapping[str, Any], w: int) -> list[str]:
    cols = [c.get("name") for c in el.get("columns") or [] if isinstance(c, Mapping)]
    rows = [" | ".join(str(c.get("display_name") or c.get("name")) for c in
                       el.get("columns") or [] if isinstance(c, Mapping))]
    for r in el.get("rows") or []:
        if isinstance(r, Mapping):
            rows.append(" | ".join(str(r.get(c, "")) for c in cols))
    return _limit([cut(x, w) for x in rows])


def _limit(lines: list[str]) -> list[str]:
    if len(lines) <= MAX_LINES:
        return lines
    return lines[:MAX_LINES - 1] + [f"… ({len(lines) - MAX_LINES + 1} more lines)"]


def _text_of(node: Any) -> str | None:
    """The text of a ``plain_text`` / ``lark_md`` node, a string, or ``{"content": ...}``."""
    if node is None:
        return None
    if isinstance(node, str):
        return node
    if isinstance(node, Mapping):
        for key in ("content", "text"):
            if isinstance(node.get(key), str):
                return node[key]
        i18n = node.get("i18n")
        if isinstance(i18n, Mapping) and i18n:
            return str(next(iter(i18n.values())))
    return None


def render_markdown(text: str, st: Style | None = None,
                    names: Mapping[str, str] | None = None) -> str:
    """Feishu card markdown as terminal text."""
    st = st or Style(False)
    names = names or {}

    def at(m: re.Match) -> str:
        who = m.group(1)
        name = "all" if who == "all" else names.get(who, who)
        return st("@" + name, "1;36")
    def markup(part: str) -> str:
        part = _AT.sub(at, part)
        part = _FONT.sub("", part)
        part = _LINK.sub(lambda m: f"{m.group(1)} {st.dim('<' + cut(m.group(2), 80) + '>')}",
                         part)
        return html.unescape(_BOLD.sub(lambda m: st.bold(m.group(1)), part))

    # code spans are literal (entities included); elsewhere markup, then entities decoded
    out = []
    for i, part in enumerate(_CODE_SPLIT.split(text)):
        if i % 2:
            out.append(st(part[1:-1], "36") if st.color else part[1:-1])
        else:
            out.append(markup(part))
    return "".join(out)


# --- charts -----------------------------------------------------------------------------------

def render_chart(spec: Mapping[str, Any], st: Style | None = None, w: int = 100) -> list[str]:
    """A VChart spec as a text bar chart (bar / line / area / pie data, by x and series)."""
    st = st or Style(False)
    kind = str(spec.get("type") or "chart")
    data = spec.get("data")
    if isinstance(data, list):
        data = data[0] if data else {}
    values = (data or {}).get("values") if isinstance(data, Mapping) else None
    x_field = spec.get("xField") or spec.get("categoryField")
    y_field = spec.get("yField") or spec.get("valueField")
    if isinstance(x_field, list):
        x_field = x_field[0] if x_field else None
    if not isinstance(values, list) or not x_field or not y_field:
        return [st.dim(f"[chart: {kind}]")]
    series_field = spec.get("seriesField")
    series: list[str] = []
    table: dict[str, dict[str, float]] = {}
    for v in values:
        if not isinstance(v, Mapping):
            continue
        x = str(v.get(x_field, ""))
        s = str(v.get(series_field, "")) if series_field else ""
        try:
            y = float(v.get(y_field) or 0)
        except (TypeError, ValueError):
            y = 0.0
        if s not in series:
            series.append(s)
        table.setdefault(x, {})
        table[x][s] = table[x].get(s, 0.0) + y
    rows = [(x, ys) for x, ys in table.items() if sum(ys.values()) > 0]
    legend = "  ".join(f"{SERIES_CHARS[i % len(SERIES_CHARS)]} {s}" for i, s in enumerate(series)
                       if s)
    head = f"chart: {kind}, {y_field} by {x_field}" + (f"  ({legend})" if legend else "")
    if not rows:
        return [st.dim(head), st.dim("  (all zero)")]
    empty = len(table) - len(rows)
    more = max(0, len(rows) - MAX_BARS)
    rows = rows[:MAX_BARS]
    peak = max(sum(ys.values()) for _, ys in rows)
    label_w = min(16, max(width(x) for x, _ in rows))
    bar_w = max(8, min(BAR_WIDTH, w - label_w - 14))
    lines = [st.dim(head)]
    for x, ys in rows:
        bar = ""
        for i, s in enumerate(series):
            n = round(ys.get(s, 0.0) / peak * bar_w) if peak else 0
            if ys.get(s, 0.0) > 0 and n == 0:
                n = 1
            bar += SERIES_CHARS[i % len(SERIES_CHARS)] * n
        nums = "/".join(_num(ys.get(s, 0.0)) for s in series)
        label = cut(x, label_w)
        lines.append(f"  {label}{' ' * (label_w - width(label))} {bar} {nums}")
    notes = [f"{empty} empty rows" if empty else "", f"{more} more rows" if more else ""]
    if empty or more:
        lines.append(st.dim(f"  ({', '.join(n for n in notes if n)} not shown)"))
    return lines


def _num(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else f"{v:.1f}"


# --- messages ---------------------------------------------------------------------------------

def render_message(msg_type: str | None, content: Any, *, color: bool = False,
                   cols: int = 100, names: Mapping[str, str] | None = None,
                   indent: str = "") -> str:
    """A message as Feishu stores it (``msg_type`` and parsed ``content``)."""
    st = Style(color)
    if isinstance(content, str):
        try:
            content = json.loads(content)
        except ValueError:
            pass
    if msg_type == "interactive":
        return render_card(content, color=color, cols=cols, names=names, indent=indent)
    if msg_type == "text" and isinstance(content, Mapping):
        text = render_markdown(str(content.get("text", "")), st, names)
        return "\n".join(indent + cut(line, cols) for line in text.splitlines() or [""])
    if msg_type == "post" and isinstance(content, Mapping):
        body = content if "content" in content else next(
            (v for v in content.values() if isinstance(v, Mapping)), {})
        lines = [st.bold(str(body.get("title")))] if body.get("title") else []
        for para in body.get("content") or []:
            if isinstance(para, list):
                lines.append("".join(str(e.get("text", "")) for e in para
                                     if isinstance(e, Mapping)))
        return "\n".join(indent + cut(line, cols) for line in lines)
    return indent + st.dim(f"[{msg_type} message]")


def render_toast(toast: Any, *, color: bool = False) -> str:
    """A card-action answer's toast: ``⟨toast success⟩ text``."""
    st = Style(color)
    if not isinstance(toast, Mapping):
        return st.dim("(no toast)")
    kind = str(toast.get("type") or "info")
    code = {"success": "32", "error": "31", "warning": "33", "info": "36"}.get(kind, "0")
    text = _text_of(toast) or ""
    return st(f"⟨toast {kind}⟩", code) + " " + text


def card_text(card: Any) -> str:
    """Every string on a card joined (for tests and searches)."""
    out: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, str):
            out.append(node)
        elif isinstance(node, Mapping):
            for v in node.values():
                walk(v)
        elif isinstance(node, Iterable) and not isinstance(node, (bytes, bytearray)):
            for v in node:
                walk(v)
    walk(card)
    return "\n".join(out)

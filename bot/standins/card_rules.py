"""What Feishu refuses in a Card JSON 2.0: a pure validator.

:func:`check_card` returns the list of :class:`Violation` s of one card (empty: Feishu would take
it). The fake Feishu (:mod:`bot.standins.fake_feishu`) refuses a send, reply or PATCH whose card has any,
the way Feishu does: HTTP 400, code 230099 and ``ErrCode: 11310`` (the card's structure) or
``ErrCode: 100290`` (a mention of no user) in the message, or code 230025 when the card is too
big. :func:`check_answer` applies the same rules to a ``card.action.trigger`` answer.

The rules (``/work/shared/PLATFORM.md``, "What Feishu refuses in a card"):

- structure: ``schema`` "2.0", ``config``, ``header``, ``body``; an unknown property anywhere is
  an error, not ignored; the 1.0 ``action`` module and ``note`` are gone; ``config.update_multi``
  can only be true;
- header: a ``title`` text; ``template`` from :data:`TEMPLATES`;
- buttons: ``behaviors`` required, each a ``callback`` with an object ``value`` or an
  ``open_url`` with a URL; label at most 100 characters; ``type`` default, primary or danger;
- at most 200 components counting nested ones, at most five levels of nesting;
- at most 30 KB as Feishu serialises the card (compact UTF-8 JSON);
- charts: ``chart_spec`` (an object) required, ``aspect_ratio`` 1:1, 2:1, 4:3 or 16:9, no
  JavaScript function anywhere in the spec;
- mentions in markdown: only ``<at id=ID></at>`` of a user in the directory (``users``; None
  skips that check), ``<at email=ADDR></at>``, and ``<at id=all></at>`` only where the group's
  owner allows it (``mention_all``).

Only the components this project builds, and their documented properties, are known; anything
else is refused, which is stricter than Feishu and keeps the stand-in honest.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Collection

CARD_INVALID = 230099      # Feishu: failed to create card content
CARD_TOO_BIG = 230025      # Feishu: message content too long
ERR_STRUCTURE = 11310      # ErrCode inside CARD_INVALID's message: the card's JSON is wrong
ERR_USER = 100290          # ErrCode inside CARD_INVALID's message: invalid user resource

MAX_BYTES = 30 * 1024
MAX_COMPONENTS = 200
MAX_DEPTH = 5
MAX_LABEL = 100
TEMPLATES = frozenset({"blue", "wathet", "turquoise", "green", "yellow", "orange", "red",
                       "carmine", "violet", "purple", "indigo", "grey"})
BUTTON_TYPES = frozenset({"default", "primary", "danger"})
ASPECT_RATIOS = frozenset({"1:1", "2:1", "4:3", "16:9"})
TOAST_TYPES = frozenset({"info", "success", "error", "warning"})

_TOP = {"schema", "config", "card_link", "header", "body"}
_CONFIG = {"streaming_mode", "streaming_config", "summary", "locales", "enable_forward",
           "update_multi", "width_mode", "use_custom_translation", "enable_forward_interaction",
           "style"}
_HEADER = {"title", "subtitle", "text_tag_list", "i18n_text_tag_list", "template", "icon",
           "padding"}
_BODY = {"direction", "padding", "horizontal_spacing", "horizontal_align", "vertical_spacing",
         "vertical_align", "elements"}
_TEXT = {"tag", "content", "i18n_content", "text_size", "text_align", "text_color", "lines"}
_COMMON = {"tag", "element_id", "margin"}
#: tag -> allowed properties (besides _COMMON); containers name the key holding children.
_COMPONENTS: dict[str, set[str]] = {
    "markdown": {"content", "i18n_content", "text_size", "text_align", "icon"},
    "hr": set(),
    "div": {"text", "icon", "fields", "width"},
    "column_set": {"horizontal_spacing", "horizontal_align", "flex_mode", "background_style",
                   "columns"},
    "column": {"background_style", "width", "weight", "vertical_align", "vertical_spacing",
               "horizontal_align", "horizontal_spacing", "padding", "direction", "elements"},
    "button": {"type", "size", "width", "text", "icon", "hover_tips", "disabled",
               "disabled_tips", "confirm", "behaviors", "name", "form_action_type"},
    "chart": {"aspect_ratio", "color_theme", "chart_spec", "preview", "height"},
    "img": {"img_key", "alt", "title", "transparent", "preview", "corner_radius",
            "scale_type", "size", "crop_mode"},
}
_REMOVED = {"action": "the 1.0 `action` module is gone in 2.0: put buttons in the body",
            "note": "`note` is gone in 2.0: use a markdown element"}
_CHILDREN = {"column_set": "columns", "column": "elements"}

_AT = re.compile(r"<at\b([^>]*)>(.*?)</at>", re.DOTALL | re.IGNORECASE)
_AT_OPEN = re.compile(r"<at\b", re.IGNORECASE)
_AT_ATTR = re.compile(r"^\s+(id|email)=([^\s\"'<>]+)\s*$")
_JS = re.compile(r"^\s*(async\s+)?function\b|^\s*(\([^()]*\)|[A-Za-z_$][\w$]*)\s*=>")


@dataclass(frozen=True)
class Violation:
    """One rule a card breaks: where (a JSON path), what, and the codes Feishu answers."""

    path: str
    message: str
    code: int = CARD_INVALID
    err_code: int = ERR_STRUCTURE

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


def size(card: Any) -> int:
    """Bytes of the card as Feishu serialises it (compact UTF-8 JSON)."""
    return len(json.dumps(card, ensure_ascii=False, separators=(",", ":")).encode("utf-8"))


def check_card(card: Any, *, users: Collection[str] | None = None,
               mention_all: bool = False) -> list[Violation]:
    """Every rule ``card`` breaks (see the module docstring); ``[]`` when Feishu takes it."""
    v = _Check(users, mention_all)
    if not isinstance(card, dict):
        return [Violation("$", "a card is a JSON object")]
    if size(card) > MAX_BYTES:
        v.add("$", f"card is {size(card)} bytes, over {MAX_BYTES}", code=CARD_TOO_BIG)
    v.keys("$", card, _TOP)
    if card.get("schema") != "2.0":
        v.add("$.schema", f"must be \"2.0\", got {card.get('schema')!r}")
    if "elements" in card or "i18n_elements" in card:
        v.add("$.elements", "1.0 layout: 2.0 keeps elements in body.elements")
    v.config(card.get("config"))
    if "header" in card:
        v.header(card["header"])
    body = card.get("body")
    if not isinstance(body, dict):
        v.add("$.body", "required object")
    else:
        v.keys("$.body", body, _BODY)
        v.elements("$.body.elements", body.get("elements"), depth=1)
    if v.components > MAX_COMPONENTS:
        v.add("$.body", f"{v.components} components, over {MAX_COMPONENTS} (nested ones count)")
    return v.found


def check_answer(answer: Any, *, users: Collection[str] | None = None,
                 mention_all: bool = False) -> list[Violation]:
    """The rules for a ``card.action.trigger`` answer: ``{}`` or toast and/or a raw 2.0 card."""
    v = _Check(users, mention_all)
    if not isinstance(answer, dict):
        return [Violation("$", "an answer is a JSON object")]
    v.keys("$", answer, {"toast", "card"})
    toast = answer.get("toast")
    if toast is not None:
        if not isinstance(toast, dict):
            v.add("$.toast", "must be an object")
        else:
            v.keys("$.toast", toast, {"type", "content", "i18n"})
            if toast.get("type") not in TOAST_TYPES:
                v.add("$.toast.type", f"one of {sorted(TOAST_TYPES)}, got {toast.get('type')!r}")
            if not isinstance(toast.get("content"), str) or not toast["content"]:
                v.add("$.toast.content", "required text")
    card = answer.get("card")
    if card is not None:
        if not isinstance(card, dict) or card.get("type") != "raw":
            v.add("$.card.type", "a 2.0 card is answered as {\"type\": \"raw\", \"data\": card}")
        else:
            v.keys("$.card", card, {"type", "data"})
            v.found += [Violation("$.card.data" + x.path[1:], x.message, x.code, x.err_code)
                        for x in check_card(card.get("data"), users=users,
                                            mention_all=mention_all)]
    return v.found


def refusal_message(violations: list[Violation]) -> str:
    """Feishu's message for a refused card: ``ErrCode: N; ErrMsg: ...; ErrorValue: path``."""
    first = violations[0]
    return (f"Failed to create card content, ext=ErrCode: {first.err_code}; "
            f"ErrMsg: {first.message}; ErrorValue: {first.path}; "
            f"({len(violations)} problem(s))")


class _Check:
    def __init__(self, users: Collection[str] | None, mention_all: bool) -> None:
        self.users = None if users is None else set(users)
        self.mention_all = mention_all
        self.found: list[Violation] = []
        self.components = 0

    def add(self, path: str, message: str, *, code: int = CARD_INVALID,
            err_code: int = ERR_STRUCTURE) -> None:
        self.found.append(Violation(path, message, code, err_code))

    def keys(self, path: str, obj: dict[str, Any], allowed: set[str]) -> None:
        for key in obj:
            if key not in allowed:
                self.add(f"{path}.{key}", "unknown property")

    def config(self, config: Any) -> None:
        if config is None:
            return
        if not isinstance(config, dict):
            self.add("$.config", "must be an object")
            return
        self.keys("$.config", config, _CONFIG)
        if "update_multi" in config and config["update_multi"] is not True:
            self.add("$.config.update_multi", "can only be true in 2.0")

    def header(self, header: Any) -> None:
        if not isinstance(header, dict):
            self.add("$.header", "must be an object")
            return
        self.keys("$.header", header, _HEADER)
        self.text("$.header.title", header.get("title"), required=True)
        if "subtitle" in header:
            self.text("$.header.subtitle", header["subtitle"], required=True)
        if "template" in header and header["template"] not in TEMPLATES:
            self.add("$.header.template", f"unknown template {header['template']!r}")

    def text(self, path: str, node: Any, *, required: bool) -> str | None:
        if node is None and not required:
            return None
        if not isinstance(node, dict):
            self.add(path, "a text object {\"tag\": \"plain_text\", \"content\": ...}")
            return None
        self.keys(path, node, _TEXT)
        if node.get("tag") not in ("plain_text", "lark_md"):
            self.add(path + ".tag", f"plain_text or lark_md, got {node.get('tag')!r}")
        content = node.get("content")
        if not isinstance(content, str):
            self.add(path + ".content", "required text")
            return None
        if node.get("tag") == "lark_md":
            self.mentions(path + ".content", content)
        return content

    def elements(self, path: str, items: Any, *, depth: int) -> None:
        if items is None:
            return
        if not isinstance(items, list):
            self.add(path, "must be a list")
            return
        for i, el in enumerate(items):
            self.element(f"{path}[{i}]", el, depth)

    def element(self, path: str, el: Any, depth: int) -> None:
        if not isinstance(el, dict):
            self.add(path, "a component is a JSON object")
            return
        self.components += 1
        tag = el.get("tag")
        if depth > MAX_DEPTH:
            self.add(path, f"nested {depth} levels deep, over {MAX_DEPTH}")
        if tag in _REMOVED:
            self.add(path, _REMOVED[tag])
            return
        if tag not in _COMPONENTS:
            self.add(path + ".tag", f"unknown component {tag!r}")
            return
        self.keys(path, el, _COMMON | _COMPONENTS[tag])
        getattr(self, "_" + tag, lambda *a: None)(path, el)
        child = _CHILDREN.get(tag)
        if child is not None:
            self.elements(f"{path}.{child}", el.get(child), depth=depth + 1)
            if tag == "column_set":
                for i, col in enumerate(el.get("columns") or []):
                    if isinstance(col, dict) and col.get("tag") != "column":
                        self.add(f"{path}.columns[{i}]", "a column_set holds columns only")

    def _markdown(self, path: str, el: dict[str, Any]) -> None:
        if not isinstance(el.get("content"), str):
            self.add(path + ".content", "required text")
            return
        self.mentions(path + ".content", el["content"])

    def _div(self, path: str, el: dict[str, Any]) -> None:
        self.text(path + ".text", el.get("text"), required=False)

    def _button(self, path: str, el: dict[str, Any]) -> None:
        label = self.text(path + ".text", el.get("text"), required=True)
        if label is not None and len(label) > MAX_LABEL:
            self.add(path + ".text.content", f"label of {len(label)} characters, over {MAX_LABEL}")
        if el.get("type", "default") not in BUTTON_TYPES:
            self.add(path + ".type", f"one of {sorted(BUTTON_TYPES)}, got {el.get('type')!r}")
        behaviors = el.get("behaviors")
        if not isinstance(behaviors, list) or not behaviors:
            self.add(path + ".behaviors", "required: a callback or open_url behaviour")
            return
        for i, b in enumerate(behaviors):
            self._behavior(f"{path}.behaviors[{i}]", b)

    def _behavior(self, path: str, b: Any) -> None:
        if not isinstance(b, dict):
            self.add(path, "a behaviour is a JSON object")
        elif b.get("type") == "callback":
            self.keys(path, b, {"type", "value"})
            if not isinstance(b.get("value"), dict):
                self.add(path + ".value", "a callback value is an object")
        elif b.get("type") == "open_url":
            self.keys(path, b, {"type", "default_url", "android_url", "ios_url", "pc_url"})
            if not isinstance(b.get("default_url"), str) or not b["default_url"]:
                self.add(path + ".default_url", "required URL")
        else:
            self.add(path + ".type", f"callback or open_url, got {b.get('type')!r}")

    def _chart(self, path: str, el: dict[str, Any]) -> None:
        spec = el.get("chart_spec")
        if not isinstance(spec, dict):
            self.add(path + ".chart_spec", "required object (a VChart spec)")
        else:
            for where in _functions(spec, path + ".chart_spec"):
                self.add(where, "JavaScript functions are not allowed in a chart spec")
        if "aspect_ratio" in el and el["aspect_ratio"] not in ASPECT_RATIOS:
            self.add(path + ".aspect_ratio", f"one of {sorted(ASPECT_RATIOS)}, "
                                             f"got {el['aspect_ratio']!r}")

    def _img(self, path: str, el: dict[str, Any]) -> None:
        if not isinstance(el.get("img_key"), str) or not el["img_key"]:
            self.add(path + ".img_key", "required")

    def mentions(self, path: str, content: str) -> None:
        tags = list(_AT.finditer(content))
        if len(tags) != len(_AT_OPEN.findall(content)):
            self.add(path, "an <at> tag is not closed with </at>", err_code=ERR_USER)
        for m in tags:
            attr = _AT_ATTR.match(m.group(1))
            if attr is None:
                self.add(path, f"mention {m.group(0)[:60]!r}: only <at id=...></at> or "
                               f"<at email=...></at>", err_code=ERR_USER)
                continue
            kind, value = attr.groups()
            if kind == "email":
                if "@" not in value:
                    self.add(path, f"mention of {value!r}: not an email", err_code=ERR_USER)
            elif value == "all":
                if not self.mention_all:
                    self.add(path, "<at id=all> in a chat whose owner does not allow mentioning "
                                   "everyone", err_code=ERR_USER)
            elif self.users is not None and value not in self.users:
                self.add(path, f"invalid user resource: {value!r} is no user", err_code=ERR_USER)


def _functions(node: Any, path: str) -> list[str]:
    """Paths of string values in a chart spec that are JavaScript functions."""
    if isinstance(node, dict):
        return [p for k, v in node.items() for p in _functions(v, f"{path}.{k}")]
    if isinstance(node, list):
        return [p for i, v in enumerate(node) for p in _functions(v, f"{path}[{i}]")]
    return [path] if isinstance(node, str) and _JS.search(node) else []

"""Card builders: pure functions from data to Feishu Card JSON 2.0.

Every card is shared (``config.update_multi: true``) so it can be patched in place later, keeps
under Feishu's limits (30 KB; 200 components counting nested ones, such as the columns and
buttons of a ``column_set``: long text is cut, and when a card would still be over, elements
before the last are dropped and a "…" line says how many), and carries button values as objects.
:mod:`bot.standins.card_rules` holds the rules themselves; the fake Feishu refuses any card breaking them.

Markdown given to these builders is already safe: outside text is escaped by the caller
(:mod:`bot.chat.mdtext`); :func:`markdown` only cuts, never inside an entity or tag.
"""
from __future__ import annotations

import json
import re
from typing import Any, Iterable

from bot.chat import mdtext
from bot.chat.i18n import breaker_word, status_word, t
from bot.chat.commands import COMMANDS

MAX_CARD_BYTES = 28_000        # Feishu refuses cards over 30 KB (230025); keep a margin
MAX_COMPONENTS = 150           # Feishu allows 200, nested components included
MAX_MARKDOWN = 4_000           # characters per markdown element
TEMPLATES = {"info": "blue", "success": "green", "warning": "orange", "error": "red",
             "neutral": "grey"}

Card = dict[str, Any]


def card(title: str, elements: Iterable[dict[str, Any]], *, template: str = "blue") -> Card:
    """A Card JSON 2.0 with a header and body; trimmed to fit Feishu's limits.

    While the card has more than :data:`MAX_COMPONENTS` components (nested ones counted) or
    more than :data:`MAX_CARD_BYTES` bytes, the element before the last (the last is usually
    the buttons) is dropped; a "… (+N)" line then says how many went.
    """
    els = list(elements)
    data = {
        "schema": "2.0",
        "config": {"update_multi": True},
        "header": {"title": {"tag": "plain_text", "content": mdtext.clip(title, 200)},
                   "template": template},
        "body": {"elements": els},
    }
    dropped = 0
    while len(els) > 1 and (count_components(els) + (dropped > 0) > MAX_COMPONENTS
                            or size(data) > MAX_CARD_BYTES - 100 * (dropped > 0)):
        els.pop(-2 if len(els) > 2 else -1)
        dropped += 1
    if dropped:
        els.insert(max(0, len(els) - 1), markdown(f"… (+{dropped})"))
    return data


def count_components(items: Any) -> int:
    """Components in a list of elements, nested ones included (a column_set with two columns
    of one button each counts 5), as Feishu counts them against its limit of 200."""
    n = 0
    for el in items if isinstance(items, list) else []:
        if isinstance(el, dict):
            n += 1 + count_components(el.get("columns")) + count_components(el.get("elements"))
    return n


def size(data: Card) -> int:
    """Bytes of the card as Feishu receives it (compact UTF-8 JSON)."""
    return len(json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode("utf-8"))


def markdown(text: str) -> dict[str, Any]:
    """A markdown element; ``text`` must already be safe (see the module docstring)."""
    return {"tag": "markdown", "content": mdtext.cut(text, MAX_MARKDOWN)}


def button(label: str, value: dict[str, Any], *, kind: str = "default") -> dict[str, Any]:
    """A button whose click arrives as ``card.action.trigger`` with ``action.value == value``."""
    return {"tag": "button", "text": {"tag": "plain_text", "content": mdtext.clip(label, 60)},
            "type": kind, "behaviors": [{"type": "callback", "value": dict(value)}]}


def elements(data: Any, *tags: str) -> list[dict[str, Any]]:
    """Every element of a card (at any depth) whose ``tag`` is one of ``tags``, in order."""
    found: list[dict[str, Any]] = []
    stack = [data]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            if node.get("tag") in tags:
                found.append(node)
            stack.extend(reversed(list(node.values())))
        elif isinstance(node, list):
            stack.extend(reversed(node))
    return found


def button_values(data: Any) -> list[dict[str, Any]]:
    """The callback values of a card's buttons, in order."""
    return [b["behaviors"][0]["value"] for b in elements(data, "button") if b.get("behaviors")]


def toast(kind: str, content: str) -> dict[str, Any]:
    """A card-action answer's toast. Feishu shows its content as plain text, so the markdown
    our texts carry (bold, code spans, escaped outside text) becomes what a reader would see:
    outside text (an exception's message) must be :func:`mdtext.escape` d in it like anywhere
    else, and then reads exactly as it was."""
    return {"toast": {"type": kind, "content": mdtext.plain(content)}}


def hr() -> dict[str, Any]:
    return {"tag": "hr"}


def mention(open_id: str) -> str:
    return f"<at id={open_id}></at>"


_AT = re.compile(r"<at\s+(?:id|email)=([^>]*)>(.*?)</at>", re.DOTALL)


def without_mentions(data: Card, note: str) -> Card:
    """``data`` with every ``<at ...></at>`` in its markdown replaced by the plain (escaped) id
    or name it named, and ``note`` (safe markdown) added last: what is sent again when Feishu
    refused the card for a mention (230099, ErrCode 100290). ``data`` is not changed."""
    def walk(node: Any) -> Any:
        if isinstance(node, dict):
            out = {k: walk(v) for k, v in node.items()}
            if out.get("tag") == "markdown" and isinstance(out.get("content"), str):
                out["content"] = _AT.sub(
                    lambda m: mdtext.escape(m.group(2).strip() or m.group(1).strip()),
                    out["content"])
            return out
        if isinstance(node, list):
            return [walk(v) for v in node]
        return node

    fixed = walk(data)
    body = fixed.get("body")
    if isinstance(body, dict) and isinstance(body.get("elements"), list):
        body["elements"].append(markdown(note))
    return fixed


def _lines(rows: list[str], limit: int = 50) -> str:
    shown = rows[:limit]
    if len(rows) > limit:
        shown.append(f"… (+{len(rows) - limit})")
    return "\n".join(shown)


# --- the cards the bot sends -------------------------------------------------------------------

def info_card(text: str, lang: str, *, title_key: str = "title.info") -> Card:
    return card(t(title_key, lang), [markdown(text)], template=TEMPLATES["info"])


def success_card(text: str, lang: str) -> Card:
    return card(t("title.done", lang), [markdown(text)], template=TEMPLATES["success"])


def error_card(text: str, lang: str) -> Card:
    return card(t("title.error", lang), [markdown(text)], template=TEMPLATES["error"])


def help_card(lang: str, *, error: str | None = None, pipelines: str = "") -> Card:
    """All commands; with ``error``, the reason the last message was not understood goes first;
    ``pipelines``: the pipeline names (and aliases) when there are several."""
    els: list[dict[str, Any]] = []
    if error:
        els += [markdown(f"**{error}**"), hr()]
    els.append(markdown(t("help.intro", lang) + "\n" +
                        "\n".join("- " + t(f"help.{name}", lang) for name in COMMANDS)))
    if pipelines:
        els.append(markdown(t("help.pipelines", lang, names=pipelines)))
    els.append(markdown(t("help.admins_only", lang)))
    return card(t("title.help", lang), els, template=TEMPLATES["warning" if error else "info"])


def refusal_card(command: str, admin_ids: Iterable[str], lang: str) -> Card:
    """Names the admins by id without @-mentioning them: anyone can send refused commands,
    and each mention would notify every admin (a spam vector)."""
    admins = ", ".join(f"`{a}`" for a in admin_ids)
    shown = mdtext.code(mdtext.clip(command, 40))
    text = (t("refused.body", lang, command=shown, admins=admins) if admins
            else t("refused.no_admins", lang, command=shown))
    return card(t("title.refused", lang), [markdown(text)], template=TEMPLATES["warning"])


def run_queued_card(batch_id: str, count: int, lang: str, *, filters: str = "",
                    pipeline: str = "") -> Card:
    els = [markdown(t("run.queued", lang, count=count, batch_id=batch_id))]
    if pipeline:
        els.append(markdown(t("run.pipeline", lang, pipeline=pipeline)))
    if filters:
        els.append(markdown(t("run.filters", lang, filters=filters)))
    els.append({"tag": "column_set", "columns": [
        {"tag": "column", "elements": [button(t("button.status", lang),
                                                      {"action": "status", "batch_id": batch_id})]},
        {"tag": "column", "elements": [button(
            t("button.cancel", lang), {"action": "cancel", "batch_id": batch_id}, kind="danger")]},
    ]})
    return card(t("title.queued", lang), els, template=TEMPLATES["success"])


def status_card(batch: dict[str, Any] | None, counts: dict[str, int] | None, lang: str, *,
                breakers: list[dict[str, Any]] = (), outbox_dead: int = 0) -> Card:
    """``outbox_dead``: outgoing messages given up on (shown with how to replay them)."""
    dead = [markdown(t("status.outbox_dead", lang, count=outbox_dead))] if outbox_dead else []
    if batch is None:
        return card(t("title.status", lang), [markdown(t("status.none", lang)), *dead],
                    template=TEMPLATES["neutral"])
    lines = [t("status.batch", lang, batch_id=batch["id"],
               status=status_word(batch["status"], lang)),
             t("status.counts", lang, **(counts or {}))]
    if batch.get("pipeline") and batch["pipeline"] != "default":
        lines.append(t("run.pipeline", lang, pipeline=mdtext.code(mdtext.clip(batch["pipeline"],
                                                                              40))))
    if batch.get("blocked_reason"):
        lines.append(t("status.blocked", lang, reason=batch["blocked_reason"]))
    if breakers:
        states = ", ".join(f"{b['service']}={breaker_word(b['state'], lang)}" for b in breakers)
        lines.append(t("status.breakers", lang, states=states))
    els = [markdown("\n".join(lines)), *dead]
    buttons = []
    if batch["status"] in ("paused", "blocked"):
        buttons.append(button(t("button.resume", lang),
                              {"action": "resume", "batch_id": batch["id"]}, kind="primary"))
    if (counts or {}).get("failed"):
        buttons.append(button(t("button.retry_failed", lang),
                              {"action": "retry_batch", "batch_id": batch["id"]}))
    if buttons:
        els.append({"tag": "column_set", "columns": [
            {"tag": "column", "elements": [b]} for b in buttons]})
    template = {"blocked": "red", "paused": "orange", "done": "green",
                "cancelled": "grey"}.get(batch["status"], "blue")
    return card(t("title.status", lang), els, template=template)


def errors_card(tasks: list[dict[str, Any]], lang: str) -> Card:
    """The latest failed tasks; their keys and messages (Bitable, Coze) are escaped here."""
    if not tasks:
        return card(t("title.errors", lang), [markdown(t("errors.none", lang))],
                    template=TEMPLATES["success"])
    shown = mdtext.escape
    rows = [t("errors.row", lang, task=mdtext.code(mdtext.clip(r["task_key"], 80)), id=r["id"],
              batch_id=mdtext.code(mdtext.clip(r["batch_id"], 80)),
              error_class=shown(r.get("error_class") or "-"),
              error_code=shown(r.get("error_code") or ""),
              message=shown(mdtext.clip(r.get("error_message") or "", 200))) for r in tasks]
    return card(t("title.errors", lang), [markdown("- " + _lines(rows).replace("\n", "\n- "))],
                template=TEMPLATES["error"])

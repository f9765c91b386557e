"""Is a chat message meant for the bot? One pure function, shared by every way messages arrive
(the webhook intake, the worker's inbox handling, the long connection).

:func:`addressed_to_bot` decides:

- a direct message (``chat_type`` other than ``group``) is always for the bot;
- in a group, with the bot's own open_id known (``GET /open-apis/bot/v3/info``, see
  :mod:`bot.chat.identity`): the message is for the bot when ``message.mentions`` holds that open_id,
  wherever the mention sits. "@Alice run" is not; "@opsbot run" and "@Alice @opsbot run" are
  (the sender picked the bot from the @ list; the parser drops every mention placeholder, so the
  command still reads "run"). A mention elsewhere in a sentence ("ask @opsbot later") is for the
  bot too: what counts is the text without mentions, and one that does not start with a
  command name gets the help card, never an action;
- in a group, with the open_id unknown (the lookup failed, or has not run yet): the older
  approximation, "the text starts with a mention placeholder" (``@_user_1 run``), which also
  takes "@Alice run" as a command. ``opsbot doctor`` says when this is the case and why.
"""
from __future__ import annotations

import json
import re
from typing import Any, Mapping

_LEADING_MENTION = re.compile(r"^\s*@_user_\d+")


def addressed_to_bot(message: Mapping[str, Any], bot_open_id: str | None = None) -> bool:
    """True when ``message`` (an ``im.message.receive_v1`` ``event.message``) is for the bot."""
    if message.get("chat_type") != "group":
        return True
    if bot_open_id:
        return bot_open_id in mentioned_open_ids(message)
    return _has_placeholder_mention(message) and _starts_with_mention(message)


def mentioned_open_ids(message: Mapping[str, Any]) -> list[str]:
    """The open_ids in ``message.mentions`` (malformed entries are skipped)."""
    mentions = message.get("mentions")
    if not isinstance(mentions, list):
        return []
    ids = (m.get("id") for m in mentions if isinstance(m, dict))
    return [i["open_id"] for i in ids if isinstance(i, dict) and isinstance(i.get("open_id"), str)]


def _has_placeholder_mention(message: Mapping[str, Any]) -> bool:
    mentions = message.get("mentions")
    return isinstance(mentions, list) and any(
        isinstance(m, dict) and str(m.get("key", "")).startswith("@_user_") for m in mentions)


def _starts_with_mention(message: Mapping[str, Any]) -> bool:
    try:
        content = json.loads(message.get("content") or "{}")
    except (TypeError, ValueError, RecursionError):
        return False
    if not isinstance(content, dict):
        return False
    if message.get("message_type") == "text":
        text = content.get("text")
        return isinstance(text, str) and bool(_LEADING_MENTION.match(text))
    body = content if "content" in content else next(
        (v for v in content.values() if isinstance(v, dict)), {})
    paragraphs = body.get("content")
    for para in paragraphs if isinstance(paragraphs, list) else []:
        elements = [el for el in para if isinstance(el, dict)
                    and not (el.get("tag") == "text" and not str(el.get("text", "")).strip())] \
            if isinstance(para, list) else []
        if elements:  # the first paragraph with something in it
            first = elements[0]
            return first.get("tag") == "at" and str(first.get("user_id", "")).startswith("@_user_")
    return False

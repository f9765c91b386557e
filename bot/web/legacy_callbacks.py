"""Old-style card callbacks (``card.action.trigger_v1``, served at ``POST /webhook/card``).

Feishu's old callback answer puts a card's ``config``, ``header`` and ``elements`` (card JSON
1.0) at the top level beside ``toast``. Every opsbot card is JSON 2.0 (``schema``, ``body``),
and Feishu refuses a card answer whose version differs from the card's (200830 for the new
callback; the old format has no place for a 2.0 body at all). Three answers were possible:
the legacy shape with whatever of a 2.0 card fits (a broken card), a refusal (buttons that do
nothing), or the toast alone plus an API PATCH of the message, which takes 2.0 cards. opsbot
does the last: the press is acted on, the presser sees the toast at once, and the card shows
its new state a moment later, when the outbox delivers the PATCH.

Each old-style callback is counted in the kv table (:data:`LEGACY_KV_KEY`), so ``opsbot doctor``
can say they arrive and how to switch to the new ``card.action.trigger``.
"""
from __future__ import annotations

from typing import Any, Mapping

from storage import kv, outbox

from bot.alerting.router import enqueue_patch

LEGACY_KV_KEY = "webhook.legacy_card"


def legacy_answer(answer: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Split a new-style callback answer into (legacy answer: the toast only, the 2.0 card
    that answer carried or None)."""
    reply = {k: v for k, v in answer.items() if k == "toast"}
    card = answer.get("card")
    data = card.get("data") if isinstance(card, dict) and card.get("type") == "raw" else None
    return reply, data if isinstance(data, dict) else None


def patch_card_later(db: Any, message_id: str, card: dict[str, Any], *, now: float) -> str:
    """Queue a PATCH of ``message_id`` to ``card``; coalesced with the card's other patches
    (same outbox target as the alert router's, when opsbot sent the card)."""
    target = outbox.uuid_for_message(db, message_id) or message_id
    return enqueue_patch(db, target, card, now=now, interval=0.0)


def note_legacy_callback(db: Any, now: float) -> None:
    """Count old-style callbacks in the kv table, so ``opsbot doctor`` can say they arrive."""
    seen = kv.get_json(db, LEGACY_KV_KEY)
    count = seen.get("count", 0) if isinstance(seen, dict) else 0
    first = seen.get("first_at", now) if isinstance(seen, dict) else now
    kv.put_json(db, LEGACY_KV_KEY, {"count": int(count) + 1, "first_at": first, "last_at": now},
                now=now)

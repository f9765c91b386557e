"""The bot's own identity: its open_id, looked up from Feishu and kept in the store.

In a group, a message is for the bot when its mentions hold the bot's open_id
(:func:`bot.chat.addressing.addressed_to_bot`). Feishu tells the app its bot's open_id at
``GET /open-apis/bot/v3/info`` (:meth:`bot.feishu.client.FeishuClient.bot_info`).

Who looks it up, and when:

- ``opsbot worker`` at start, in its Feishu thread (:class:`IdentityRefresher`); while the
  lookup fails it tries again every :data:`RETRY_SECONDS`; once known it checks again once a day
  (the open_id of an app's bot does not change; the day check notices a bot switched off);
- ``opsbot doctor``, which stores what it finds too, so a fix shows at once.

The web process never calls Feishu for it (it must boot and answer fast): the intake and the
inbox handler read the stored value (one primary-key read per group message), so both processes
apply the same rule as soon as either one stored the id. The value is stored with the app id it
belongs to and ignored for any other app, so switching ``FEISHU_APP_ID`` never makes the bot
deaf with the old app's open_id. While nothing is stored, the older rule applies (see
:mod:`bot.chat.addressing`).
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Any

from storage import kv

from bot.errors import FeishuError

log = logging.getLogger("opsbot.identity")

KV_KEY = "feishu.bot_identity"
RETRY_SECONDS = 60.0        # while the lookup fails
RECHECK_SECONDS = 86400.0   # once it succeeded
ACTIVE = 2                  # bot/v3/info activate_status: enabled in this tenant


@dataclass(frozen=True)
class BotIdentity:
    """What ``bot/v3/info`` said about the app's bot, and when (Unix seconds)."""

    app_id: str
    open_id: str
    app_name: str = ""
    activate_status: int | None = None
    checked_at: float = 0.0

    @property
    def active(self) -> bool:
        return self.activate_status in (None, ACTIVE)


def load(db: Any, app_id: str) -> BotIdentity | None:
    """The stored identity of ``app_id``'s bot, or None (none stored, or another app's)."""
    if not app_id:
        return None
    value = kv.get_json(db, KV_KEY)
    if not isinstance(value, dict) or value.get("app_id") != app_id:
        return None
    open_id = value.get("open_id")
    if not isinstance(open_id, str) or not open_id:
        return None
    status = value.get("activate_status")
    return BotIdentity(app_id, open_id, str(value.get("app_name") or ""),
                       status if isinstance(status, int) else None,
                       float(value.get("checked_at") or 0.0))


def bot_open_id(db: Any, app_id: str) -> str | None:
    """The stored open_id of ``app_id``'s bot, or None."""
    ident = load(db, app_id)
    return ident.open_id if ident else None


def store(db: Any, ident: BotIdentity, *, now: float) -> None:
    kv.put_json(db, KV_KEY, asdict(ident), now=now)


def look_up(client: Any, app_id: str, now: float) -> BotIdentity:
    """Ask Feishu (``client.bot_info()``); raises :class:`bot.errors.FeishuError`."""
    bot = client.bot_info()
    status = bot.get("activate_status")
    return BotIdentity(app_id, str(bot["open_id"]), str(bot.get("app_name") or ""),
                       status if isinstance(status, int) else None, now)


def refresh(db: Any, client: Any, app_id: str, now: float) -> BotIdentity:
    """Look the identity up and store it; raises FeishuError (the stored value stays)."""
    ident = look_up(client, app_id, now)
    store(db, ident, now=now)
    return ident


class IdentityRefresher:
    """The worker's schedule for :func:`refresh`: now, then every minute while it fails, then
    once a day. ``tick()`` is cheap when nothing is due; it never raises for Feishu errors."""

    def __init__(self, db: Any, client: Any, app_id: str, clock: Any, *,
                 retry: float = RETRY_SECONDS, recheck: float = RECHECK_SECONDS) -> None:
        self.db, self.client, self.app_id, self.clock = db, client, app_id, clock
        self.retry, self.recheck = retry, recheck
        self.next_at = 0.0
        self.failures = 0

    def tick(self) -> BotIdentity | None:
        """Refresh when due; return the new identity, or None (not due, or it failed)."""
        now = self.clock.now()
        if now < self.next_at:
            return None
        self.next_at = now + self.retry  # also when something unforeseen raises below
        try:
            ident = refresh(self.db, self.client, self.app_id, now)
        except FeishuError as exc:
            self.failures += 1
            kept = "the stored open_id stays in use" if bot_open_id(self.db, self.app_id) else \
                "group messages that start with any @mention count as commands until it works"
            log.warning("bot identity lookup failed (%s); %s; run `opsbot doctor`", exc, kept,
                        extra={"code": exc.code, "attempt": self.failures})
            return None
        self.failures = 0
        self.next_at = now + self.recheck
        if not ident.active:
            log.warning("the bot is not enabled in this tenant (activate_status %s)",
                        ident.activate_status)
        log.info("bot identity known", extra={"open_id": ident.open_id})
        return ident

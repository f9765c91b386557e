"""Feishu webhook intake, framework-free: a :class:`Request` in, a :class:`Response` out.

Each step is a small function; a protocol failure becomes a 4xx :class:`Response` with a JSON
body ``{"error": code, "message": text}``, never an exception and never a 500. Order:

1. size limit (413) — the Flask adapter already refused oversized bodies by Content-Length;
2. JSON object (400);
3. ``{"encrypt": ...}``: needs ``FEISHU_ENCRYPT_KEY`` (400 otherwise). A request carrying
   ``X-Lark-Signature`` must match hex(sha256(timestamp + nonce + encrypt_key + raw_body))
   (401), compared in constant time; then it is decrypted (400 on bad base64, length, padding or
   JSON). A request *without* a signature is only good for ``url_verification`` (Feishu exempts
   it); anything else unsigned — including undecryptable or malformed ciphertext — gets the same
   401, so an unsigned caller learns nothing about padding (no padding oracle);
4. plaintext while an encrypt key is configured: only ``url_verification`` and the legacy card
   callback with a valid SHA-1 signature pass (an unsigned legacy callback is refused with 401,
   also when no verification token is configured); other plaintext is refused (400);
5. ``url_verification``: token check (401), then ``{"challenge": ...}`` at once;
6. v2 envelope: ``schema == "2.0"`` (400 otherwise), ``header.token`` == verification token (401);
7. by event type: ``im.message.receive_v1`` from a user (in a group chat: only when it
   @-mentions the bot, by the bot's stored open_id, see :mod:`bot.chat.addressing` and
   :mod:`bot.chat.identity`) is recorded in the inbox under ``msg:<message_id>`` (Feishu's advice:
   dedupe messages by message_id, redeliveries can carry new event ids) and answered ``{}``;
   ``card.action.trigger`` is answered synchronously by the card handler; everything else gets
   200 ``{}`` and leaves no trace (a non-200 makes Feishu re-push it for hours).

Legacy card callbacks (``card.action.trigger_v1``, only at ``/webhook/card``) are acted on like
new ones but answered with the toast alone: their answer format carries JSON 1.0 cards, ours are
2.0, so the pressed card's new state is queued as an API PATCH instead (see
:mod:`bot.web.legacy_callbacks`). Each one is counted in the kv table for ``opsbot doctor``.

Timestamps: a signed request older (or newer) than :data:`MAX_SKEW` is refused. Feishu re-pushes
an unanswered event after 15 s, 5 min, 1 h and 6 h, so the window is a day, not minutes: a tight
window would reject legitimate re-pushes. Replays inside the window are harmless because every
accepted event is deduplicated durably (messages by message_id, card clicks by event_id plus a
state check).

Verification token: when configured, every request is checked. When it is not configured the
intake accepts requests (development) and logs a warning once per process.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import logging
import sqlite3
import threading
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable, ContextManager, Mapping

from Crypto.Cipher import AES

from storage import inbox

from bot.chat.addressing import addressed_to_bot
from bot.web.legacy_callbacks import legacy_answer, note_legacy_callback, patch_card_later
from bot.chat import identity
from bot.chat.i18n import t

log = logging.getLogger("opsbot.intake")

MAX_SKEW = 24 * 3600.0  # seconds; see the module docstring
MESSAGE_TYPES = ("text", "post")
EVENT_MESSAGE = "im.message.receive_v1"
EVENT_CARD = "card.action.trigger"

CardHandler = Callable[[dict[str, Any]], dict[str, Any]]


@dataclass(frozen=True)
class Request:
    """What the webhook received: raw body bytes, headers (any case) and the path."""

    body: bytes
    headers: Mapping[str, str] = field(default_factory=dict)
    path: str = "/webhook/event"

    def header(self, name: str) -> str | None:
        lower = name.lower()
        for key, value in self.headers.items():
            if key.lower() == lower:
                return value
        return None


@dataclass(frozen=True)
class Response:
    status: int
    json: dict[str, Any]


@dataclass(frozen=True)
class Outcome:
    """The response plus, when a new inbox row was written, its key (for the dispatcher)."""

    response: Response
    recorded: str | None = None


class Rejected(Exception):
    """Internal: a step refused the request; converted to a Response at one boundary."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message

    def response(self) -> Response:
        return Response(self.status, {"error": self.code, "message": self.message})


OK = Response(200, {})
_warned_no_token = threading.Event()


# --- small pure steps -------------------------------------------------------------------------

def check_size(body: bytes, limit: int) -> None:
    if len(body) > limit:
        raise Rejected(413, "too_large", f"body over {limit} bytes")


def parse_json(raw: bytes | str) -> dict[str, Any]:
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise Rejected(400, "invalid_json", "body is not valid JSON") from None
    if not isinstance(data, dict):
        raise Rejected(400, "invalid_json", "body is not a JSON object")
    return data


def signature(timestamp: str, nonce: str, encrypt_key: str, body: bytes) -> str:
    """Feishu's event signature: hex(sha256(timestamp + nonce + encrypt_key + body))."""
    return hashlib.sha256((timestamp + nonce + encrypt_key).encode() + body).hexdigest()


def legacy_signature(timestamp: str, nonce: str, token: str, body: bytes) -> str:
    """The old card callback's signature: hex(sha1(timestamp + nonce + token + body))."""
    return hashlib.sha1((timestamp + nonce + token).encode() + body).hexdigest()


def _signed_parts(req: Request) -> tuple[str, str, str] | None:
    ts = req.header("X-Lark-Request-Timestamp")
    nonce = req.header("X-Lark-Request-Nonce")
    sig = req.header("X-Lark-Signature")
    if not (ts and nonce and sig):
        return None
    return ts, nonce, sig


def check_timestamp(ts: str, now: float) -> None:
    try:
        value = float(ts)
    except ValueError:
        raise Rejected(401, "bad_signature", "timestamp is not a number") from None
    if not abs(now - value) <= MAX_SKEW:
        raise Rejected(401, "stale_request", "timestamp outside the accepted window")


def verify_signature(req: Request, encrypt_key: str, now: float) -> bool:
    """True when signed correctly, False when unsigned; raises Rejected when signed wrongly."""
    return _verify(req, now, lambda ts, nonce: signature(ts, nonce, encrypt_key, req.body))


def verify_legacy_signature(req: Request, token: str, now: float) -> bool:
    """The same for the old card callback (SHA-1 over the verification token)."""
    return _verify(req, now, lambda ts, nonce: legacy_signature(ts, nonce, token, req.body))


def _verify(req: Request, now: float, expected: Callable[[str, str], str]) -> bool:
    parts = _signed_parts(req)
    if parts is None:
        return False
    ts, nonce, sig = parts
    if not hmac.compare_digest(expected(ts, nonce).encode(), sig.strip().lower().encode()):
        raise Rejected(401, "bad_signature", "X-Lark-Signature does not match")
    check_timestamp(ts, now)
    return True


def aes_decrypt(raw: bytes, encrypt_key: str) -> bytes:
    """iv16 + AES-256-CBC ciphertext -> plaintext; ValueError on bad length or PKCS7 padding.

    Same as lark-oapi's ``AESCipher`` (not imported: lark_oapi takes seconds to import, and
    every gunicorn worker would pay that before answering its first request).
    """
    if len(raw) < 2 * AES.block_size or len(raw) % AES.block_size:
        raise ValueError("invalid ciphertext length")
    key = hashlib.sha256(encrypt_key.encode()).digest()
    plain = AES.new(key, AES.MODE_CBC, raw[:AES.block_size]).decrypt(raw[AES.block_size:])
    pad = plain[-1]
    if not 1 <= pad <= AES.block_size or plain[-pad:] != bytes([pad]) * pad:
        raise ValueError("invalid PKCS7 padding")
    return plain[:-pad]


def decrypt(encrypted: Any, encrypt_key: str) -> dict[str, Any]:
    """AES-256-CBC (key sha256(encrypt_key)), base64(iv + ciphertext), PKCS7, JSON inside."""
    if not isinstance(encrypted, str):
        raise Rejected(400, "bad_encrypt", "encrypt must be a base64 string")
    try:
        raw = base64.b64decode(encrypted.encode("ascii"), validate=True)
        plain = aes_decrypt(raw, encrypt_key)
    except (binascii.Error, ValueError, UnicodeEncodeError):
        raise Rejected(400, "bad_encrypt", "encrypt does not decrypt with the configured key") from None
    return parse_json(plain)


def check_token(given: Any, expected: str) -> None:
    """Constant-time token check; a missing expected token (dev mode) accepts anything."""
    if not expected:
        if not _warned_no_token.is_set():
            _warned_no_token.set()
            log.warning("FEISHU_VERIFICATION_TOKEN is not set: webhook requests are not "
                        "authenticated (development only)")
        return
    if not isinstance(given, str) or not hmac.compare_digest(given.encode(), expected.encode()):
        raise Rejected(401, "bad_token", "verification token does not match")


def is_url_verification(data: Mapping[str, Any]) -> bool:
    return data.get("type") == "url_verification"


def is_legacy_card(data: Mapping[str, Any]) -> bool:
    return "schema" not in data and "action" in data and "open_id" in data


def message_key(data: Mapping[str, Any],
                bot_open_id: str | None = None) -> tuple[str, dict[str, Any]] | None:
    """The inbox key of a message event to record, or None when it is to be ignored.

    ``bot_open_id`` is the bot's own open_id when known (see :mod:`bot.chat.addressing`).
    """
    event = data.get("event")
    message = event.get("message") if isinstance(event, dict) else None
    if not isinstance(message, dict) or not isinstance(message.get("message_id"), str) \
            or not message["message_id"]:
        raise Rejected(400, "bad_event", "im.message.receive_v1 without event.message.message_id")
    sender = event.get("sender") if isinstance(event.get("sender"), dict) else {}
    if sender.get("sender_type") != "user":
        return None  # bots, the app itself, system messages
    if message.get("message_type") not in MESSAGE_TYPES:
        return None
    check_message_shape(sender, message)
    if not addressed_to_bot(message, bot_open_id):
        return None  # group chatter that does not @ the bot: no trace, no help card
    return "msg:" + message["message_id"], message


def check_message_shape(sender: Mapping[str, Any], message: Mapping[str, Any]) -> None:
    """400 unless the fields the handler reads have their documented types (when present).

    Refused here rather than recorded: a row the handler cannot read would fail on every try
    and its sender would never get an answer.
    """
    sender_id = sender.get("sender_id", {})
    ok = (isinstance(sender_id, dict)
          and isinstance(sender_id.get("open_id", ""), str)
          and isinstance(message.get("chat_id", ""), str)
          and isinstance(message.get("content", ""), (str, type(None))))
    if not ok:
        raise Rejected(400, "bad_event", "im.message.receive_v1 with fields of the wrong type")


# --- the pipeline of steps --------------------------------------------------------------------

class Intake:
    """Runs the steps for one request. ``card_handler`` answers card clicks synchronously."""

    def __init__(self, settings: Any, db: Any, clock: Any, *,
                 card_handler: CardHandler | None = None,
                 db_lock: ContextManager | None = None) -> None:
        self.settings = settings
        self.db = db
        self.clock = clock
        self.card_handler = card_handler
        self._lock = db_lock if db_lock is not None else nullcontext()

    @property
    def _token(self) -> str:
        return self.settings.feishu.verification_token.get()

    @property
    def _key(self) -> str:
        return self.settings.feishu.encrypt_key.get()

    def handle(self, req: Request) -> Outcome:
        try:
            return self._handle(req)
        except Rejected as exc:
            log.info("webhook rejected %s: %s %s", req.path, exc.status, exc.code)
            return Outcome(exc.response())
        except Exception:  # noqa: BLE001 - never a 500 for Feishu to re-push forever
            log.exception("webhook: unexpected error while parsing a request")
            return Outcome(Response(400, {"error": "bad_request", "message": "unreadable request"}))

    def _handle(self, req: Request) -> Outcome:
        now = self.clock.now()
        check_size(req.body, self.settings.max_body_bytes)
        data = parse_json(req.body)
        data, signed = self._unwrap(req, data, now)
        if is_url_verification(data):
            check_token(data.get("token"), self._token)
            challenge = data.get("challenge")
            if not isinstance(challenge, str):
                raise Rejected(400, "bad_challenge", "url_verification without a challenge")
            return Outcome(Response(200, {"challenge": challenge}))
        if is_legacy_card(data) and req.path.rstrip("/").endswith("/card"):
            return Outcome(self._legacy_card(data, now))
        if not signed and self._key:
            raise Rejected(401, "unsigned", "X-Lark-Signature is required")
        return self._event(data, now)

    def _unwrap(self, req: Request, data: dict[str, Any], now: float) -> tuple[dict[str, Any], bool]:
        """Verify and decrypt; returns the inner payload and whether a signature was checked."""
        key = self._key
        if "encrypt" in data:
            if not key:
                raise Rejected(400, "encryption_not_configured",
                               "encrypted request but FEISHU_ENCRYPT_KEY is not set")
            if verify_signature(req, key, now):
                return decrypt(data["encrypt"], key), True
            try:  # unsigned: only url_verification; one uniform answer for everything else
                inner = decrypt(data["encrypt"], key)
            except Rejected:
                inner = {}
            if not is_url_verification(inner):
                raise Rejected(401, "unsigned", "X-Lark-Signature is required")
            return inner, False
        if is_url_verification(data):
            return data, False
        if is_legacy_card(data) and req.path.rstrip("/").endswith("/card"):
            if key and not self._token:
                # The legacy signature is keyed by the token: with none there is nothing to
                # check, and an encrypt key means this is not a development setup.
                raise Rejected(401, "unsigned", "X-Lark-Signature is required")
            signed = self._token and verify_legacy_signature(req, self._token, now)
            if self._token and not signed:
                raise Rejected(401, "unsigned", "X-Lark-Signature is required")
            if not self._token:
                check_token(None, "")
            return data, bool(signed)
        if key:
            raise Rejected(400, "encryption_required",
                           "plaintext event but FEISHU_ENCRYPT_KEY is configured")
        return data, False

    def handle_trusted(self, data: dict[str, Any]) -> Outcome:
        """An event that arrived over an authenticated channel (Feishu's long connection, opened
        with the app's id and secret): the steps after verification, the same as for a webhook
        event (schema, message filter and durable dedup, card handler), minus the token check."""
        try:
            return self._event(data, self.clock.now(), trusted=True)
        except Rejected as exc:
            log.info("long-connection event rejected: %s %s", exc.status, exc.code)
            return Outcome(exc.response())

    def _event(self, data: dict[str, Any], now: float, *, trusted: bool = False) -> Outcome:
        if data.get("schema") != "2.0":
            raise Rejected(400, "unknown_schema", "only schema 2.0 events are accepted")
        header = data.get("header")
        if not isinstance(header, dict):
            raise Rejected(400, "bad_event", "event without a header")
        if not trusted:
            check_token(header.get("token"), self._token)
        event_type = header.get("event_type")
        if event_type == EVENT_MESSAGE:
            found = message_key(data, self._bot_open_id())
            if found is None:
                return Outcome(OK)
            key, _ = found
            try:
                with self._lock:
                    new = inbox.record(self.db, key, event_type=event_type, payload=data,
                                       now=now, event_id=_str(header.get("event_id")))
            except sqlite3.Error:
                # Not the sender's fault: a 503 makes Feishu push the event again later.
                log.exception("webhook: could not record %s", key)
                raise Rejected(503, "store_unavailable", "could not record the event") from None
            return Outcome(OK, key if new else None)
        if event_type == EVENT_CARD:
            return Outcome(self._card(data))
        return Outcome(OK)

    def _bot_open_id(self) -> str | None:
        """The bot's own open_id as stored by the worker or ``doctor`` (None: not known)."""
        try:
            with self._lock:
                return identity.bot_open_id(self.db, self.settings.feishu.app_id)
        except sqlite3.Error:
            log.warning("webhook: could not read the bot's identity; using the older rule")
            return None

    def _card(self, data: dict[str, Any]) -> Response:
        if self.card_handler is None:
            return OK
        try:
            with self._lock:
                answer = self.card_handler(data)
        except Exception:  # noqa: BLE001 - a click must get an answer, not a 500
            log.exception("card action handler failed")
            answer = {"toast": {"type": "error",
                                "content": t("toast.error", self.settings.language)}}
        return Response(200, answer if isinstance(answer, dict) else {})

    def _legacy_card(self, data: dict[str, Any], now: float) -> Response:
        """Answer an old-style callback (``card.action.trigger_v1`` at ``/webhook/card``).

        Its answer format puts a card's ``config``/``header``/``elements`` (card JSON 1.0) at
        the top level; every opsbot card is JSON 2.0, which that format cannot carry (Feishu
        refuses a card answer of the wrong version). So the answer is the toast alone, and the
        pressed card's new state goes out as an API PATCH through the outbox (which takes 2.0
        cards), a moment later. See :mod:`bot.web.legacy_callbacks`.
        """
        answer = self._card(data).json
        reply, card = legacy_answer(answer)
        message_id = _str(data.get("open_message_id"))
        try:
            with self._lock:
                note_legacy_callback(self.db, now)
                if card is not None and message_id:
                    patch_card_later(self.db, message_id, card, now=now)
        except sqlite3.Error:  # the click was acted on: still show its toast
            log.exception("webhook: could not queue the card update of a legacy callback")
        return Response(200, reply)


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) else None

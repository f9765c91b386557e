"""Builders for Feishu webhook requests: signed, encrypted, exactly as Feishu sends them.

Used by the tests (``tests/helpers.py`` re-exports them) and by ``opsbot demo``, which plays a
chat session against the real web app. The defaults (``ADMIN``, ``CHAT``, ``TOKEN``, ...) are
test values, never real credentials.

    body, headers = signed_event(message_event("help"), encrypt_key="k", token="t")
    client.post("/webhook/event", data=body, headers=headers)

``encrypt`` uses AES-256-CBC with a random IV and PKCS7 (key sha256(encrypt_key)), base64 of
iv + ciphertext; ``sign`` computes hex(sha256(timestamp + nonce + encrypt_key + body)). Samples
come from ``/work/shared/samples`` (copies are not needed: the builders construct the same shape).
"""
from __future__ import annotations

import base64
import copy
import hashlib
import itertools
import json
import os
import time
from typing import Any

from Crypto.Cipher import AES

_ids = itertools.count(1)

ADMIN = "ou_admin"
USER = "ou_someone"
ONCALL = "ou_oncall"
#: The people of the fake Feishu's user directory (cards may only @-mention these).
DIRECTORY = (ADMIN, USER, ONCALL)
CHAT = "oc_chat"
TOKEN = "vtoken-123"
ENCRYPT_KEY = "encrypt-key-456"


def encrypt(plaintext: str | bytes, encrypt_key: str) -> str:
    """base64(iv + AES-256-CBC(PKCS7(plaintext))) with key sha256(encrypt_key)."""
    data = plaintext.encode() if isinstance(plaintext, str) else plaintext
    key = hashlib.sha256(encrypt_key.encode()).digest()
    iv = os.urandom(16)
    pad = 16 - len(data) % 16
    ct = AES.new(key, AES.MODE_CBC, iv).encrypt(data + bytes([pad]) * pad)
    return base64.b64encode(iv + ct).decode()


def sign(body: bytes, encrypt_key: str, *, timestamp: str | None = None,
         nonce: str | None = None) -> dict[str, str]:
    """The three X-Lark-* headers Feishu sends with a request signed by ``encrypt_key``."""
    ts = timestamp or str(int(time.time()))
    nonce = nonce or os.urandom(6).hex()
    sig = hashlib.sha256((ts + nonce + encrypt_key).encode() + body).hexdigest()
    return {"X-Lark-Request-Timestamp": ts, "X-Lark-Request-Nonce": nonce,
            "X-Lark-Signature": sig, "Content-Type": "application/json"}


def sign_legacy(body: bytes, token: str, *, timestamp: str | None = None,
                nonce: str | None = None) -> dict[str, str]:
    """Headers of the legacy card callback: hex(sha1(timestamp + nonce + token + body))."""
    ts = timestamp or str(int(time.time()))
    nonce = nonce or os.urandom(6).hex()
    sig = hashlib.sha1((ts + nonce + token).encode() + body).hexdigest()
    return {"X-Lark-Request-Timestamp": ts, "X-Lark-Request-Nonce": nonce,
            "X-Lark-Signature": sig, "Content-Type": "application/json"}


def signed_event(payload: dict[str, Any], *, encrypt_key: str | None = ENCRYPT_KEY,
                 timestamp: str | None = None) -> tuple[bytes, dict[str, str]]:
    """(body, headers) as Feishu sends ``payload``: encrypted and signed when a key is given."""
    if not encrypt_key:
        return json.dumps(payload).encode(), {"Content-Type": "application/json"}
    body = json.dumps({"encrypt": encrypt(json.dumps(payload), encrypt_key)}).encode()
    return body, sign(body, encrypt_key, timestamp=timestamp)


def url_verification(token: str = TOKEN, challenge: str = "ajls384kdjxxxx") -> dict[str, Any]:
    return {"challenge": challenge, "token": token, "type": "url_verification"}


def message_event(text: str, *, sender: str = ADMIN, message_id: str | None = None,
                  event_id: str | None = None, chat_id: str = CHAT, token: str = TOKEN,
                  sender_type: str = "user", mention: bool = True,
                  message_type: str = "text") -> dict[str, Any]:
    """An ``im.message.receive_v1`` event like the sample, with ``@_user_1 <text>``."""
    n = next(_ids)
    content = json.dumps({"text": ("@_user_1 " if mention else "") + text}, ensure_ascii=False)
    return {
        "schema": "2.0",
        "header": {"event_id": event_id or f"ev{n:08d}", "event_type": "im.message.receive_v1",
                   "create_time": str(int(time.time() * 1000)), "token": token,
                   "app_id": "cli_fake", "tenant_key": "tenant"},
        "event": {
            "sender": {"sender_id": {"open_id": sender, "union_id": "on_x", "user_id": "u"},
                       "sender_type": sender_type, "tenant_key": "tenant"},
            "message": {"message_id": message_id or f"om_{n:08d}", "chat_id": chat_id,
                        "chat_type": "group", "message_type": message_type,
                        "create_time": str(int(time.time() * 1000)), "content": content,
                        "mentions": [{"key": "@_user_1", "id": {"open_id": "ou_bot"},
                                      "name": "opsbot", "tenant_key": "tenant"}]},
        },
    }


def card_action_event(value: dict[str, Any], *, operator: str = ADMIN,
                      event_id: str | None = None, token: str = TOKEN,
                      message_id: str = "om_card") -> dict[str, Any]:
    n = next(_ids)
    return {
        "schema": "2.0",
        "header": {"event_id": event_id or f"cev{n:08d}", "token": token,
                   "create_time": str(int(time.time() * 1_000_000)),
                   "event_type": "card.action.trigger", "tenant_key": "tenant",
                   "app_id": "cli_fake"},
        "event": {"operator": {"open_id": operator, "tenant_key": "tenant"},
                  "token": "c-update-token",
                  "action": {"tag": "button", "value": copy.deepcopy(value)},
                  "host": "im_message",
                  "context": {"open_message_id": message_id, "open_chat_id": CHAT}},
    }


def legacy_card_action(value: dict[str, Any], *, operator: str = ADMIN,
                       message_id: str = "om_card") -> dict[str, Any]:
    return {"open_id": operator, "user_id": "u", "open_message_id": message_id,
            "open_chat_id": CHAT, "tenant_key": "tenant", "token": "c-update",
            "action": {"tag": "button", "value": copy.deepcopy(value)}}

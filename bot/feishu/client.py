"""The Feishu OpenAPI client: every Feishu call the bot makes goes through here, via lark-oapi.

Requests are built with lark-oapi's typed builders (``lark_oapi.api.im.v1``,
``lark_oapi.api.bitable.v1``) and executed through one boundary, :meth:`FeishuClient._call`,
using ``lark.Client.request``. That keeps the raw HTTP answer (status, headers, log id) even when
Feishu or a proxy answers with something that is not JSON, and it is the single place where
lark-oapi and ``requests`` failures become :class:`~bot.errors.FeishuError`. File uploads into a
Bitable (``lark_oapi.api.drive.v1`` media requests, multipart bodies encoded the way the SDK's
``drive.v1.media.upload_all`` does) pass the same boundary on a second client that shares the
token cache and allows :data:`UPLOAD_TIMEOUT` seconds a call.

Token handling: lark-oapi caches the tenant token in ``TokenManager.cache`` (process-wide, keyed
``self_tenant_token:<app_id>``, refreshed 10 min before expiry) and does not react to 99991663
(invalid token). On a token error we empty that cache entry and retry the call once.

All methods are synchronous and safe to call from several threads.
"""
from __future__ import annotations

import json
import logging
import os
import threading
import time
from typing import Any, Callable

import lark_oapi as lark
import requests
from lark_oapi.api.bitable.v1 import (AppTableRecord, BatchCreateAppTableRecordRequest,
                                      BatchCreateAppTableRecordRequestBody,
                                      BatchUpdateAppTableRecordRequest,
                                      BatchUpdateAppTableRecordRequestBody, Condition, FilterInfo,
                                      ListAppTableFieldRequest, SearchAppTableRecordRequest,
                                      SearchAppTableRecordRequestBody)
from lark_oapi.api.im.v1 import (CreateMessageRequest, CreateMessageRequestBody,
                                 IsInChatChatMembersRequest, PatchMessageRequest,
                                 PatchMessageRequestBody, ReplyMessageRequest,
                                 ReplyMessageRequestBody)
from lark_oapi.api.drive.v1 import (UploadAllMediaRequest, UploadAllMediaRequestBody,
                                    UploadFinishMediaRequest, UploadFinishMediaRequestBody,
                                    UploadPartMediaRequest, UploadPartMediaRequestBody,
                                    UploadPrepareMediaRequest, MediaUploadInfo)
from lark_oapi.core.cache import ICache
from lark_oapi.core.enum import AccessTokenType, HttpMethod
from lark_oapi.core.utils import Files
from requests_toolbelt import MultipartEncoder
from lark_oapi.core.exception import ObtainAccessTokenException
from lark_oapi.core.model import BaseRequest, BaseResponse, RequestOption
from lark_oapi.core.token.manager import TokenManager

from bot.errors import NO_CODE, TOKEN_CODES, FeishuError, FeishuNetworkError
from bot.settings import FeishuSettings

log = logging.getLogger("opsbot.feishu")

DEFAULT_TIMEOUT = 5.0  # seconds per HTTP call; Feishu answers in well under a second
UPLOAD_TIMEOUT = 120.0  # seconds per upload call (a 20 MB file on a slow uplink)
UPLOAD_ALL_LIMIT = 20 * 1024 * 1024  # bytes: Feishu's limit for one upload_all call
MAX_SEARCH_PAGE = 500  # Bitable search page_size limit
RATELIMIT_RESET_HEADER = "x-ogw-ratelimit-reset"
_JSON = "application/json; charset=utf-8"


class _TokenCache(ICache):
    """lark-oapi's token cache, made thread-safe (its LocalCache deletes keys without a lock)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._items: dict[str, tuple[str, float]] = {}

    def get(self, key: str) -> str:
        with self._lock:
            value, expire = self._items.get(key, ("", 0.0))
            if expire < time.time():
                self._items.pop(key, None)
                return ""
            return value

    def set(self, key: str, value: str, expire: int) -> None:
        with self._lock:
            self._items[key] = (value, float(expire))


class FeishuClient:
    """Sends and updates messages and reads and writes Bitable records for one Feishu app.

    Every method raises :class:`FeishuError` when Feishu answers with a non-zero code and
    :class:`FeishuNetworkError` when there is no answer; messages never contain secrets.
    """

    def __init__(self, settings: FeishuSettings, *, timeout: float = DEFAULT_TIMEOUT) -> None:
        self._app_id = settings.app_id
        # Own cache per client: building a client installs it as lark-oapi's process-wide token
        # cache, so a new client (e.g. against a new fake server in tests) starts without tokens.
        self._cache = _TokenCache()
        self._client = (lark.Client.builder()
                        .app_id(settings.app_id)
                        .app_secret(settings.app_secret.get())
                        .domain(settings.domain.rstrip("/"))
                        .timeout(timeout)
                        .cache(self._cache)
                        .log_level(lark.LogLevel.WARNING)
                        .build())
        # uploads take longer than any other call: same app, same token cache, longer timeout
        self._upload_client = (lark.Client.builder()
                               .app_id(settings.app_id)
                               .app_secret(settings.app_secret.get())
                               .domain(settings.domain.rstrip("/"))
                               .timeout(max(timeout, UPLOAD_TIMEOUT))
                               .cache(self._cache)
                               .log_level(lark.LogLevel.WARNING)
                               .build())

    # -- messages -------------------------------------------------------------------------------

    def send_card(self, chat_id: str, card: dict[str, Any], uuid: str) -> str:
        """Send an interactive card to a chat; return the new message_id.

        ``uuid`` (<= 50 chars) makes the send idempotent at Feishu for an hour.
        """
        return self._send(chat_id, "interactive", json.dumps(card, ensure_ascii=False), uuid)

    def send_text(self, chat_id: str, text: str, uuid: str) -> str:
        """Send a plain text message to a chat; return the new message_id."""
        return self._send(chat_id, "text", json.dumps({"text": text}, ensure_ascii=False), uuid)

    def reply_card(self, message_id: str, card: dict[str, Any], uuid: str) -> str:
        """Reply to a message with a card; return the reply's message_id."""
        return self._reply(message_id, "interactive", json.dumps(card, ensure_ascii=False), uuid)

    def reply_text(self, message_id: str, text: str, uuid: str) -> str:
        """Reply to a message with plain text; return the reply's message_id."""
        return self._reply(message_id, "text", json.dumps({"text": text}, ensure_ascii=False),
                           uuid)

    def patch_card(self, message_id: str, card: dict[str, Any]) -> None:
        """Replace the content of a card message (the card needs ``config.update_multi``)."""
        req = (PatchMessageRequest.builder().message_id(message_id)
               .request_body(PatchMessageRequestBody.builder()
                             .content(json.dumps(card, ensure_ascii=False)).build())
               .build())
        self._call("patch_card", req)

    def _send(self, chat_id: str, msg_type: str, content: str, uuid: str) -> str:
        req = (CreateMessageRequest.builder().receive_id_type("chat_id")
               .request_body(CreateMessageRequestBody.builder().receive_id(chat_id)
                             .msg_type(msg_type).content(content).uuid(uuid).build())
               .build())
        return str(self._call("send_message", req).get("message_id", ""))

    def _reply(self, message_id: str, msg_type: str, content: str, uuid: str) -> str:
        req = (ReplyMessageRequest.builder().message_id(message_id)
               .request_body(ReplyMessageRequestBody.builder().msg_type(msg_type)
                             .content(content).uuid(uuid).build())
               .build())
        return str(self._call("reply_message", req).get("message_id", ""))

    # -- Bitable --------------------------------------------------------------------------------

    def search_records(self, app_token: str, table_id: str, *, field_name: str, value: str,
                       page_size: int = MAX_SEARCH_PAGE,
                       max_pages: int | None = None) -> list[dict[str, Any]]:
        """All records whose ``field_name`` is ``value``, as ``{"record_id", "fields"}`` dicts.

        Follows ``page_token`` until ``has_more`` is false (or ``max_pages`` pages were read).
        Field values are normalised with :func:`normalize_value` (text segments -> str, URL -> its
        link, numbers unchanged).
        """
        page_size = max(1, min(page_size, MAX_SEARCH_PAGE))
        body = (SearchAppTableRecordRequestBody.builder()
                .filter(FilterInfo.builder().conjunction("and").conditions([
                    Condition.builder().field_name(field_name).operator("is")
                    .value([value]).build()]).build())
                .build())
        records: list[dict[str, Any]] = []
        page_token: str | None = None
        pages = 0
        while True:
            pages += 1
            builder = (SearchAppTableRecordRequest.builder().app_token(app_token)
                       .table_id(table_id).page_size(page_size).request_body(body))
            if page_token:
                builder = builder.page_token(page_token)
            data = self._call("search_records", builder.build())
            for item in data.get("items") or []:
                records.append({"record_id": item.get("record_id"),
                                "fields": normalize_fields(item.get("fields") or {})})
            page_token = data.get("page_token")
            if not data.get("has_more") or not page_token or pages == max_pages:
                return records

    def batch_update_records(self, app_token: str, table_id: str,
                             records: list[dict[str, Any]]) -> None:
        """Update up to 500 records ``[{"record_id", "fields"}]`` in one call (caller splits)."""
        if not records:
            return
        body = BatchUpdateAppTableRecordRequestBody.builder().records([
            AppTableRecord.builder().record_id(r["record_id"]).fields(r["fields"]).build()
            for r in records]).build()
        req = (BatchUpdateAppTableRecordRequest.builder().app_token(app_token)
               .table_id(table_id).request_body(body).build())
        self._call("batch_update_records", req)

    def batch_create_records(self, app_token: str, table_id: str,
                             records: list[dict[str, Any]], *,
                             client_token: str | None = None) -> list[str]:
        """Add up to 500 records (each a ``fields`` dict) in one call; return their record ids.

        ``client_token`` (a UUID) makes the call idempotent at Feishu: the same token again
        answers the first call's records and adds none, so a retry after a lost answer does
        not duplicate rows. Runs on the longer-timeout client (500 rows take a while)."""
        if not records:
            return []
        body = BatchCreateAppTableRecordRequestBody.builder().records([
            AppTableRecord.builder().fields(fields).build() for fields in records]).build()
        builder = (BatchCreateAppTableRecordRequest.builder().app_token(app_token)
                   .table_id(table_id).request_body(body))
        if client_token:
            builder = builder.client_token(client_token)
        data = self._call("batch_create_records", builder.build(), client=self._upload_client)
        return [str(r.get("record_id")) for r in data.get("records") or []
                if isinstance(r, dict)]

    # -- drive media (Bitable attachments) --------------------------------------------------------

    def upload_media(self, path: str | os.PathLike, *, parent_node: str,
                     parent_type: str = "bitable_file", file_name: str | None = None) -> str:
        """Upload a local file into a Bitable (``parent_node`` = its app token); return the
        ``file_token`` an attachment field takes (``[{"file_token": ...}]``).

        Files up to 20 MB go in one ``drive/v1/medias/upload_all`` call; larger ones in the
        parts Feishu asks for (``upload_prepare``, ``upload_part`` each block, ``upload_finish``).
        OSError when the file cannot be read.
        """
        size = os.path.getsize(path)
        name = file_name or os.path.basename(os.fspath(path))
        if size > UPLOAD_ALL_LIMIT:
            return self._upload_in_parts(path, name, size, parent_type, parent_node)

        def send(option: RequestOption) -> BaseResponse:
            with open(path, "rb") as fh:
                body = (UploadAllMediaRequestBody.builder().file_name(name)
                        .parent_type(parent_type).parent_node(parent_node).size(size)
                        .file(fh).build())
                return self._send_multipart(UploadAllMediaRequest.builder()
                                            .request_body(body).build(), option)

        data = self._call("upload_media", None, send=send)
        return _file_token("upload_media", data)

    def _upload_in_parts(self, path: str | os.PathLike, name: str, size: int, parent_type: str,
                         parent_node: str) -> str:
        info = (MediaUploadInfo.builder().file_name(name).parent_type(parent_type)
                .parent_node(parent_node).size(size).build())
        prepared = self._call("upload_prepare", UploadPrepareMediaRequest.builder()
                              .request_body(info).build(), client=self._upload_client)
        upload_id, block = prepared.get("upload_id"), prepared.get("block_size")
        blocks = prepared.get("block_num")
        if not upload_id or not isinstance(block, int) or block <= 0 \
                or not isinstance(blocks, int) or blocks != -(-size // block):
            raise FeishuError(NO_CODE, f"upload_prepare answered an unusable plan {prepared}",
                              operation="upload_prepare")
        with open(path, "rb") as fh:
            for seq in range(blocks):
                chunk = fh.read(block)

                def send(option: RequestOption, seq: int = seq, chunk: bytes = chunk):
                    import io
                    body = (UploadPartMediaRequestBody.builder().upload_id(upload_id).seq(seq)
                            .size(len(chunk)).file(io.BytesIO(chunk)).build())
                    return self._send_multipart(UploadPartMediaRequest.builder()
                                                .request_body(body).build(), option)

                self._call("upload_part", None, send=send)
        done = self._call("upload_finish", UploadFinishMediaRequest.builder().request_body(
            UploadFinishMediaRequestBody.builder().upload_id(upload_id).block_num(blocks)
            .build()).build(), client=self._upload_client)
        return _file_token("upload_finish", done)

    def _send_multipart(self, request: BaseRequest, option: RequestOption) -> BaseResponse:
        """Send ``request`` (a lark-oapi drive request with a file) as multipart/form-data,
        the way the SDK's ``drive.v1.media.upload_all`` does, through the generic executor,
        which also keeps answers that are not JSON (a gateway's 502) readable."""
        form = MultipartEncoder(Files.parse_form_data(request.body))
        request.body = form
        option.headers["Content-Type"] = form.content_type
        return self._upload_client.request(request, option)

    def list_field_names(self, app_token: str, table_id: str) -> list[str]:
        """The names of the table's columns (for ``opsbot doctor``); follows ``page_token``."""
        return [f["field_name"] for f in self.list_fields(app_token, table_id)]

    def list_fields(self, app_token: str, table_id: str) -> list[dict[str, Any]]:
        """The table's columns as ``{"field_name", "type"}`` (type: Feishu's number, e.g. 1 text,
        2 number, 5 date, 15 URL, 17 attachment); follows ``page_token``."""
        fields: list[dict[str, Any]] = []
        page_token: str | None = None
        while True:
            builder = (ListAppTableFieldRequest.builder().app_token(app_token)
                       .table_id(table_id).page_size(100))
            if page_token:
                builder = builder.page_token(page_token)
            data = self._call("list_fields", builder.build())
            fields += [{"field_name": str(f["field_name"]), "type": f.get("type")}
                       for f in data.get("items") or []
                       if isinstance(f, dict) and f.get("field_name")]
            page_token = data.get("page_token")
            if not data.get("has_more") or not page_token:
                return fields

    # -- chats ----------------------------------------------------------------------------------

    def is_bot_in_chat(self, chat_id: str) -> bool:
        """Whether this app's bot is a member of ``chat_id`` (a read; for ``opsbot doctor``)."""
        req = IsInChatChatMembersRequest.builder().chat_id(chat_id).build()
        return bool(self._call("is_in_chat", req).get("is_in_chat"))

    # -- the bot itself -------------------------------------------------------------------------

    def bot_info(self) -> dict[str, Any]:
        """The app's bot: ``{"open_id", "app_name", "activate_status", ...}`` (``GET
        /open-apis/bot/v3/info`` with the tenant token). lark-oapi has no typed request for it,
        so a plain :class:`BaseRequest` goes through the same boundary as every other call; the
        answer carries ``bot`` at the top level, not under ``data``. A bot without an open_id
        raises FeishuError.
        """
        req = (BaseRequest.builder().http_method(HttpMethod.GET).uri("/open-apis/bot/v3/info")
               .token_types({AccessTokenType.TENANT}).build())
        bot = self._call("bot_info", req, field="bot")
        if not isinstance(bot.get("open_id"), str) or not bot["open_id"]:
            raise FeishuError(NO_CODE, "bot info without an open_id", operation="bot_info")
        return bot

    # -- token ----------------------------------------------------------------------------------

    def check_token(self) -> None:
        """Fetch a fresh tenant token now (for ``opsbot doctor``); raise FeishuError if refused."""
        self._invalidate_token()
        self._guard("check_token", lambda: TokenManager.get_self_tenant_token(self._client.config))

    def _invalidate_token(self) -> None:
        # lark-oapi reads tokens through TokenManager.cache; an empty value means "fetch again".
        TokenManager.cache.set(f"self_tenant_token:{self._app_id}", "", 0)

    # -- the boundary ---------------------------------------------------------------------------

    def _call(self, operation: str, request: BaseRequest | None, *,
              send: Callable[[RequestOption], BaseResponse] | None = None,
              client: Any = None, field: str = "data") -> dict[str, Any]:
        """Execute ``request`` (JSON body) or ``send(option)`` (anything else, e.g. a file);
        return the answer's ``field`` (``data``) or raise FeishuError.

        On an invalid or expired tenant token the cached token is dropped and the call is made
        once more with a fresh one (``send`` builds its request again each time).
        """
        client = client or self._client
        for attempt in (1, 2):
            option = RequestOption()
            if send is None:
                option.headers["Content-Type"] = _JSON
                resp = self._guard(operation, lambda: client.request(request, option))
            else:
                resp = self._guard(operation, lambda: send(option))
            code = resp.code
            status = resp.raw.status_code if resp.raw is not None else None
            if code == 0 or (code is None and status is not None and 200 <= status < 300):
                return _data_of(resp, field)
            if code in TOKEN_CODES and attempt == 1:
                log.info("feishu token rejected; refreshing", extra={"operation": operation,
                                                                     "code": code})
                self._invalidate_token()
                continue
            raise _error_from(operation, resp)
        raise AssertionError("unreachable")

    def _guard(self, operation: str, fn: Callable[[], Any]) -> Any:
        """Run a lark-oapi call, translating its exceptions into the bot's error tree."""
        try:
            return fn()
        except ObtainAccessTokenException as exc:
            raise FeishuError(exc.code if isinstance(exc.code, int) else NO_CODE,
                              f"tenant token refused: {exc.msg}",
                              operation=operation) from None
        except requests.Timeout as exc:
            raise FeishuNetworkError(f"timed out ({type(exc).__name__})",
                                     operation=operation) from exc
        except requests.RequestException as exc:
            raise FeishuNetworkError(f"connection failed ({type(exc).__name__})",
                                     operation=operation) from exc
        except ValueError as exc:  # a non-JSON answer to the token request
            raise FeishuError(NO_CODE, f"unreadable answer ({type(exc).__name__})",
                              operation=operation) from exc


def _file_token(operation: str, data: dict[str, Any]) -> str:
    token = data.get("file_token")
    if not isinstance(token, str) or not token:
        raise FeishuError(NO_CODE, f"the answer carries no file_token: {data}",
                          operation=operation)
    return token


def _data_of(resp: BaseResponse, field: str = "data") -> dict[str, Any]:
    if resp.raw is None or not resp.raw.content:
        return {}
    try:
        body = json.loads(resp.raw.content)
    except ValueError:
        return {}
    data = body.get(field) if isinstance(body, dict) else None
    return data if isinstance(data, dict) else {}


def _error_from(operation: str, resp: BaseResponse) -> FeishuError:
    raw = resp.raw
    status = raw.status_code if raw is not None else None
    headers = {k.lower(): v for k, v in (raw.headers if raw is not None else {}).items()}
    code = resp.code if resp.code is not None else NO_CODE
    msg = resp.msg if resp.msg is not None else f"HTTP {status} without a Feishu code"
    return FeishuError(code, msg, log_id=resp.get_log_id() or headers.get("x-tt-logid"),
                       http_status=status,
                       retry_after=_seconds(headers.get(RATELIMIT_RESET_HEADER)),
                       operation=operation)


def _seconds(value: str | None) -> float | None:
    try:
        return max(0.0, float(value)) if value not in (None, "") else None
    except ValueError:
        return None


def normalize_fields(fields: dict[str, Any]) -> dict[str, Any]:
    """Normalise every value of a Bitable record's ``fields`` with :func:`normalize_value`."""
    return {name: normalize_value(value) for name, value in fields.items()}


def normalize_value(value: Any) -> Any:
    """Turn a Bitable value as read back into the plain value that was written.

    - text: ``[{"text": "a", "type": "text"}, {"text": "b", "type": "url", "link": ..}]``
      -> ``"ab"``
    - URL field: ``{"link": "https://..", "text": "label"}`` -> the link (text when no link)
    - formula / lookup: ``{"type": 1, "value": [...]}`` -> the normalised ``value``
    - numbers, booleans, dates (ms timestamps), plain strings and lists of strings: unchanged
    """
    if isinstance(value, list) and value and all(_is_segment(v) for v in value):
        return "".join(str(v.get("text", "")) for v in value)
    if isinstance(value, dict):
        if "link" in value:
            return value.get("link") or value.get("text") or ""
        if "value" in value and "type" in value:
            return normalize_value(value["value"])
    return value


def _is_segment(item: Any) -> bool:
    return isinstance(item, dict) and "text" in item and item.get("type") in (
        "text", "url", "mention")

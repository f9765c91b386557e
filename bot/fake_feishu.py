"""A fake Feishu OpenAPI server: real HTTP on loopback, scriptable, recording.

Used by the tests (``tests/fake_feishu.py`` re-exports this module) and by ``opsbot demo``,
which runs the whole loop on this machine without a Feishu account.

Point the real lark-oapi client at it (``FeishuSettings(domain=fake.base_url, app_id=fake.app_id,
app_secret=Secret(fake.app_secret))``) and assert on what it received::

    with FakeFeishu() as fake:
        client = FeishuClient(fake.settings())
        fake.fail("send", status=500, times=2)          # the next two sends answer 500
        ...
        fake.wait_for_messages(1)
        assert fake.messages[0]["content"]["header"] ...

Endpoints (route names in brackets, used by :meth:`FakeFeishu.fail`):

- [token] ``POST /open-apis/auth/v3/tenant_access_token/internal``: checks app_id/app_secret
  (10014 otherwise), issues ``t-1``, ``t-2``, ... Every other route checks the Bearer token:
  missing -> 99991661, unknown or expired (:meth:`expire_tokens`) -> 99991663, both HTTP 400.
- [send] ``POST /open-apis/im/v1/messages?receive_id_type=chat_id``
- [reply] ``POST /open-apis/im/v1/messages/{message_id}/reply``
- [patch] ``PATCH /open-apis/im/v1/messages/{message_id}``
- [search] ``POST /open-apis/bitable/v1/apps/{app}/tables/{table}/records/search``: rows from
  :meth:`seed_records`; filter conditions with operator ``is`` (and ``isNotEmpty``/``isEmpty``);
  ``page_size`` / ``page_token`` paging. Plain string values are answered the way Feishu reads
  them back, ``[{"text": s, "type": "text"}]``.
- [batch_update] ``POST .../records/batch_update``: merges fields into stored rows (an unknown
  record_id creates the row unless ``strict_records=True``, then 1254043); every call is kept in
  :attr:`batch_updates`.
- [bot_info] ``GET /open-apis/bot/v3/info``.
- anything else: HTTP 404 with code 404 (recorded), unless a handler was added with :meth:`on`.

Like real Feishu, a send or reply that repeats a ``uuid`` answers the first message's id and adds
no second message. Every request is recorded in :attr:`requests` (method, path, query, headers,
json, time); every message in :attr:`messages` (message_id, chat_id / receive_id, msg_type,
content parsed from JSON, uuid, reply_to, time); every patch in :attr:`patches`. A patch
replaces the stored message's ``content``; :attr:`chat_log` keeps messages (with the content they
were sent with) and patches in the order they arrived: ``("message", m)`` / ``("patch", p)``.

All state is guarded by one lock; read it from tests freely. Responses carry ``X-Tt-Logid``.
"""
from __future__ import annotations

import asyncio
import itertools
import json
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

from aiohttp import web

TOKEN_PATH = "/open-apis/auth/v3/tenant_access_token/internal"
ROUTES = ("token", "send", "reply", "patch", "search", "batch_update", "bot_info")


@dataclass
class Scripted:
    """One scripted answer: an HTTP status and Feishu code, or a dropped connection."""

    status: int
    code: int | None
    msg: str
    headers: dict[str, str]
    drop: bool
    delay: float
    body: Any
    times: int


class FakeFeishu:
    """The fake server. Use as a context manager, or call :meth:`start` / :meth:`stop`."""

    def __init__(self, *, app_id: str = "cli_fake", app_secret: str = "fake-secret",
                 token_expire: int = 7200, strict_records: bool = False,
                 clock: Any = None) -> None:
        """``clock`` (``.now()``, Unix seconds; default real time) ages send uuids: like Feishu,
        a uuid dedupes a send for one hour after its first use, no longer."""
        self.clock = clock
        self.app_id = app_id
        self.app_secret = app_secret
        self.token_expire = token_expire
        self.strict_records = strict_records
        self.base_url = ""
        self._lock = threading.Condition()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self._ids = itertools.count(1)
        self._handlers: dict[tuple[str, str], Callable[[dict[str, Any]], tuple[int, Any]]] = {}
        self.reset()

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> str:
        """Start serving on 127.0.0.1 with an ephemeral port; return ``http://127.0.0.1:PORT``."""
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="fake-feishu",
                                        daemon=True)
        self._thread.start()
        port = asyncio.run_coroutine_threadsafe(self._serve(), self._loop).result(10)
        self.base_url = f"http://127.0.0.1:{port}"
        return self.base_url

    def stop(self) -> None:
        if self._loop is None:
            return
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(10)
        self._loop.close()
        self._loop = self._thread = self._runner = None

    def __enter__(self) -> "FakeFeishu":
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def settings(self, **overrides: Any):
        """A ``FeishuSettings`` pointing at this fake with its credentials."""
        from bot.settings import FeishuSettings, Secret
        values: dict[str, Any] = {"app_id": self.app_id, "app_secret": Secret(self.app_secret),
                                  "domain": self.base_url}
        values.update(overrides)
        return FeishuSettings(**values)

    async def _serve(self) -> int:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._dispatch)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        return self._runner.addresses[0][1]

    # -- state and scripting --------------------------------------------------------------------

    def reset(self) -> None:
        """Forget everything recorded, seeded and scripted (tokens issued stay valid)."""
        with self._lock:
            self.requests: list[dict[str, Any]] = []
            self.messages: list[dict[str, Any]] = []
            self.patches: list[dict[str, Any]] = []
            self.chat_log: list[tuple[str, dict[str, Any]]] = []
            self.batch_updates: list[dict[str, Any]] = []
            self.tables: dict[tuple[str, str], list[dict[str, Any]]] = {}
            self.tokens: list[str] = getattr(self, "tokens", [])
            self.expired: set[str] = set()
            self._by_uuid: dict[str, tuple[str, float]] = {}   # uuid -> (message_id, first use)
            self._scripts: dict[str, list[Scripted]] = {r: [] for r in ROUTES}

    def fail(self, route: str, *, status: int | None = None, code: int | None = None,
             msg: str | None = None, headers: dict[str, str] | None = None, times: int = 1,
             drop: bool = False, delay: float = 0.0, body: Any = None) -> None:
        """Script the next ``times`` calls of ``route`` to fail (queued after earlier scripts).

        ``code`` answers ``{"code": code, "msg": msg}`` (HTTP ``status``, default 400);
        without a code the answer is a plain-text HTTP ``status`` (default 500), like a gateway
        error. ``drop=True`` closes the connection without an answer. ``delay`` (seconds) waits
        first, to provoke client timeouts. ``body`` replaces the JSON body entirely.
        Examples: ``fail("send", status=500, times=2)``; ``fail("send", code=99991400,
        status=429, headers={"x-ogw-ratelimit-reset": "1"})``; ``fail("send", code=230020)``.
        """
        if route not in ROUTES:
            raise ValueError(f"unknown route {route!r}; one of {ROUTES}")
        if status is None:
            status = 400 if code is not None else 500
        if msg is None:
            msg = f"scripted failure {code if code is not None else status}"
        with self._lock:
            self._scripts[route].append(Scripted(status, code, msg, dict(headers or {}), drop,
                                                 delay, body, times))

    def expire_tokens(self) -> None:
        """Make every token issued so far invalid: calls carrying one get 99991663."""
        with self._lock:
            self.expired.update(self.tokens)

    def seed_records(self, app_token: str, table_id: str,
                     rows: list[dict[str, Any]]) -> list[str]:
        """Add rows (each a ``fields`` dict, or ``{"record_id", "fields"}``); return record ids."""
        ids = []
        with self._lock:
            table = self.tables.setdefault((app_token, table_id), [])
            for row in rows:
                if "fields" in row and set(row) <= {"record_id", "fields"}:
                    rid, fields = row.get("record_id") or self._record_id(), row["fields"]
                else:
                    rid, fields = self._record_id(), row
                table.append({"record_id": rid, "fields": dict(fields)})
                ids.append(rid)
        return ids

    def records(self, app_token: str, table_id: str) -> dict[str, dict[str, Any]]:
        """The stored rows of a table as ``{record_id: fields}`` (values as written)."""
        with self._lock:
            return {r["record_id"]: dict(r["fields"])
                    for r in self.tables.get((app_token, table_id), [])}

    def on(self, method: str, path: str,
           handler: Callable[[dict[str, Any]], tuple[int, Any]]) -> None:
        """Serve ``method path`` (exact path) with ``handler(request_record) -> (status, body)``."""
        self._handlers[(method.upper(), path)] = handler

    def requests_to(self, path_part: str, method: str | None = None) -> list[dict[str, Any]]:
        """Recorded requests whose path contains ``path_part`` (and with ``method``, if given)."""
        with self._lock:
            return [r for r in self.requests if path_part in r["path"]
                    and (method is None or r["method"] == method.upper())]

    def wait_for(self, predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
        """Wait until ``predicate()`` (called under the lock) holds; False on timeout."""
        with self._lock:
            return self._lock.wait_for(predicate, timeout)

    def wait_for_messages(self, n: int, timeout: float = 5.0) -> list[dict[str, Any]]:
        """Wait until at least ``n`` messages arrived; return them. AssertionError on timeout."""
        if not self.wait_for(lambda: len(self.messages) >= n, timeout):
            raise AssertionError(f"expected {n} messages within {timeout}s, "
                                 f"got {len(self.messages)}: {self.messages}")
        with self._lock:
            return list(self.messages)

    def wait_for_patches(self, n: int, timeout: float = 5.0) -> list[dict[str, Any]]:
        if not self.wait_for(lambda: len(self.patches) >= n, timeout):
            raise AssertionError(f"expected {n} patches within {timeout}s, got {self.patches}")
        with self._lock:
            return list(self.patches)

    # -- HTTP -----------------------------------------------------------------------------------

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = None
        rec = {"method": request.method, "path": request.path, "query": dict(request.query),
               "headers": dict(request.headers), "json": body, "time": time.time()}
        route, params = self._route(request.method, request.path)
        with self._lock:
            self.requests.append(rec)
            script = self._next_script(route) if route else None
            self._lock.notify_all()
        if script is not None:
            return await self._scripted(request, script)
        if (request.method, request.path) in self._handlers:
            status, out = self._handlers[(request.method, request.path)](rec)
            return self._json(out, status)
        if route is None:
            return self._json({"code": 404, "msg": "404 page not found (fake)"}, 404)
        if route != "token":
            denied = self._check_token(request.headers.get("Authorization", ""))
            if denied is not None:
                return denied
        with self._lock:
            status, out = getattr(self, f"_on_{route}")(rec, **params)
            self._lock.notify_all()
        return self._json(out, status)

    @staticmethod
    def _route(method: str, path: str) -> tuple[str | None, dict[str, str]]:
        parts = path.strip("/").split("/")
        if method == "POST" and path == TOKEN_PATH:
            return "token", {}
        if method == "GET" and path == "/open-apis/bot/v3/info":
            return "bot_info", {}
        if parts[:3] == ["open-apis", "im", "v1"] and len(parts) >= 4 and parts[3] == "messages":
            if method == "POST" and len(parts) == 4:
                return "send", {}
            if method == "POST" and len(parts) == 6 and parts[5] == "reply":
                return "reply", {"message_id": parts[4]}
            if method == "PATCH" and len(parts) == 5:
                return "patch", {"message_id": parts[4]}
        if (method == "POST" and parts[:3] == ["open-apis", "bitable", "v1"] and len(parts) == 9
                and parts[3] == "apps" and parts[5] == "tables" and parts[7] == "records"):
            action = {"search": "search", "batch_update": "batch_update"}.get(parts[8])
            if action:
                return action, {"app": parts[4], "table": parts[6]}
        return None, {}

    def _next_script(self, route: str) -> Scripted | None:
        queue = self._scripts.get(route) or []
        if not queue:
            return None
        script = queue[0]
        script.times -= 1
        if script.times <= 0:
            queue.pop(0)
        return script

    async def _scripted(self, request: web.Request, s: Scripted) -> web.StreamResponse:
        if s.delay:
            await asyncio.sleep(s.delay)
        if s.drop:
            if request.transport is not None:
                request.transport.abort()
            raise asyncio.CancelledError  # nothing more is written on the aborted connection
        if s.body is not None:
            return self._json(s.body, s.status, s.headers)
        if s.code is None:
            return web.Response(status=s.status, text=f"fake gateway error {s.status}",
                                headers={**s.headers, "X-Tt-Logid": self._log_id()})
        return self._json({"code": s.code, "msg": s.msg, "data": {}}, s.status, s.headers)

    def _check_token(self, auth: str) -> web.Response | None:
        token = auth[len("Bearer "):] if auth.startswith("Bearer ") else ""
        with self._lock:
            if not token:
                return self._json({"code": 99991661, "msg": "Missing access token"}, 400)
            if token not in self.tokens or token in self.expired:
                return self._json({"code": 99991663, "msg": "Invalid access token for "
                                   "authorization. Please make a request with token attached."},
                                  400)
        return None

    def _json(self, body: Any, status: int = 200,
              headers: dict[str, str] | None = None) -> web.Response:
        return web.json_response(body, status=status,
                                 headers={**(headers or {}), "X-Tt-Logid": self._log_id()})

    def _log_id(self) -> str:
        return f"fake-log-{next(self._ids)}"

    def _record_id(self) -> str:
        return f"rec{next(self._ids):08d}"

    # -- route handlers (called under the lock) ------------------------------------------------

    def _on_token(self, rec: dict[str, Any]) -> tuple[int, Any]:
        body = rec["json"] or {}
        if body.get("app_id") != self.app_id or body.get("app_secret") != self.app_secret:
            return 400, {"code": 10014, "msg": "app secret invalid"}
        token = f"t-{len(self.tokens) + 1}"
        self.tokens.append(token)
        return 200, {"code": 0, "msg": "ok", "tenant_access_token": token,
                     "expire": self.token_expire}

    def _on_bot_info(self, rec: dict[str, Any]) -> tuple[int, Any]:
        return 200, {"code": 0, "msg": "ok",
                     "bot": {"app_name": "fake bot", "open_id": "ou_fakebot"}}

    def _on_send(self, rec: dict[str, Any]) -> tuple[int, Any]:
        if rec["query"].get("receive_id_type") not in ("chat_id", "open_id", "user_id",
                                                       "union_id", "email"):
            return 400, {"code": 230001, "msg": "invalid receive_id_type"}
        body = rec["json"] or {}
        return self._add_message(body, chat_id=body.get("receive_id"), reply_to=None)

    def _on_reply(self, rec: dict[str, Any], message_id: str) -> tuple[int, Any]:
        parent = next((m for m in self.messages if m["message_id"] == message_id), None)
        chat_id = parent["chat_id"] if parent else None
        return self._add_message(rec["json"] or {}, chat_id=chat_id, reply_to=message_id)

    def _add_message(self, body: dict[str, Any], *, chat_id: str | None,
                     reply_to: str | None) -> tuple[int, Any]:
        uuid = body.get("uuid")
        now = self.clock.now() if self.clock is not None else time.time()
        seen = self._by_uuid.get(uuid) if uuid else None
        if seen and now - seen[1] < 3600:  # Feishu: same uuid within an hour = same message
            message = next(m for m in self.messages if m["message_id"] == seen[0])
            return 200, {"code": 0, "msg": "success", "data": self._message_data(message)}
        try:
            content = json.loads(body.get("content") or "null")
        except ValueError:
            return 400, {"code": 230001, "msg": "content is not valid JSON"}
        message = {"message_id": f"om_{next(self._ids):06x}", "chat_id": chat_id,
                   "receive_id": body.get("receive_id"), "msg_type": body.get("msg_type"),
                   "content": content, "uuid": uuid, "reply_to": reply_to, "time": time.time()}
        self.messages.append(message)
        self.chat_log.append(("message", dict(message)))
        if uuid:
            self._by_uuid[uuid] = (message["message_id"], now)
        return 200, {"code": 0, "msg": "success", "data": self._message_data(message)}

    @staticmethod
    def _message_data(m: dict[str, Any]) -> dict[str, Any]:
        return {"message_id": m["message_id"], "chat_id": m["chat_id"], "msg_type": m["msg_type"],
                "parent_id": m["reply_to"] or "", "root_id": m["reply_to"] or "",
                "body": {"content": json.dumps(m["content"], ensure_ascii=False)}}

    def _on_patch(self, rec: dict[str, Any], message_id: str) -> tuple[int, Any]:
        message = next((m for m in self.messages if m["message_id"] == message_id), None)
        if message is None:
            return 400, {"code": 230011, "msg": "message not found (fake)"}
        content = json.loads((rec["json"] or {}).get("content") or "null")
        message["content"] = content
        patch = {"message_id": message_id, "content": content, "time": time.time()}
        self.patches.append(patch)
        self.chat_log.append(("patch", patch))
        return 200, {"code": 0, "msg": "success", "data": {}}

    def _on_search(self, rec: dict[str, Any], app: str, table: str) -> tuple[int, Any]:
        size = min(int(rec["query"].get("page_size", 20)), 500)
        start = int(rec["query"].get("page_token") or 0)
        conditions = (((rec["json"] or {}).get("filter") or {}).get("conditions")) or []
        rows = [r for r in self.tables.get((app, table), [])
                if all(_matches(r["fields"], c) for c in conditions)]
        page = rows[start:start + size]
        more = start + size < len(rows)
        return 200, {"code": 0, "msg": "success", "data": {
            "items": [{"record_id": r["record_id"], "fields": _readback(r["fields"])}
                      for r in page],
            "has_more": more, "page_token": str(start + size) if more else "",
            "total": len(rows)}}

    def _on_batch_update(self, rec: dict[str, Any], app: str, table: str) -> tuple[int, Any]:
        records = (rec["json"] or {}).get("records") or []
        if len(records) > 1000:
            return 400, {"code": 1254104, "msg": "records exceed 1000"}
        stored = self.tables.setdefault((app, table), [])
        by_id = {r["record_id"]: r for r in stored}
        missing = [r.get("record_id") for r in records if r.get("record_id") not in by_id]
        if missing and self.strict_records:
            return 400, {"code": 1254043, "msg": f"RecordIdNotFound {missing[0]}"}
        for r in records:
            row = by_id.get(r["record_id"])
            if row is None:
                row = {"record_id": r["record_id"], "fields": {}}
                stored.append(row)
                by_id[r["record_id"]] = row
            row["fields"].update(r.get("fields") or {})
        self.batch_updates.append({"app_token": app, "table_id": table, "records": records,
                                   "time": time.time()})
        return 200, {"code": 0, "msg": "success", "data": {"records": records}}


def _plain(value: Any) -> Any:
    """A stored value as text for filtering (text segments joined)."""
    if isinstance(value, list) and value and all(isinstance(v, dict) and "text" in v
                                                 for v in value):
        return "".join(str(v["text"]) for v in value)
    if isinstance(value, dict) and "text" in value:
        return value["text"]
    return value


def _matches(fields: dict[str, Any], condition: dict[str, Any]) -> bool:
    value = _plain(fields.get(condition.get("field_name")))
    operator = condition.get("operator", "is")
    wanted = (condition.get("value") or [None])[0]
    if operator == "is":
        return value is not None and str(value) == str(wanted)
    if operator == "isNot":
        return value is None or str(value) != str(wanted)
    if operator == "isEmpty":
        return value in (None, "", [])
    if operator == "isNotEmpty":
        return value not in (None, "", [])
    if operator == "contains":
        return value is not None and str(wanted) in str(value)
    raise ValueError(f"fake Feishu does not support filter operator {operator!r}")


def _readback(fields: dict[str, Any]) -> dict[str, Any]:
    """Values as Feishu reads them back: plain strings become text segments."""
    return {k: ([{"text": v, "type": "text"}] if isinstance(v, str) else v)
            for k, v in fields.items()}

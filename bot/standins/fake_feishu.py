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
- [bot_info] ``GET /open-apis/bot/v3/info``: ``{"code": 0, "bot": {"open_id", "app_name",
  "activate_status"}}`` from the constructor's ``bot_open_id`` / ``bot_name`` /
  ``bot_activate_status`` (attributes, change them freely); Bearer token checked like the rest.
- [batch_create] ``POST .../records/batch_create``: adds rows (at most 500 a call, else 1254104;
  a field the table does not have, when its fields were set with :meth:`set_fields`, 1254045);
  every call that added rows is kept in :attr:`batch_creates`. A ``client_token`` query
  parameter (a UUID, else 1254001) makes it idempotent like Feishu: the same token again gets
  the first answer and adds no rows.
- [list_fields] ``GET /open-apis/bitable/v1/apps/{app}/tables/{table}/fields``: the fields set
  with :meth:`set_fields`, else the names seen in the table's rows (as text fields); paged.
- [upload_all] ``POST /open-apis/drive/v1/medias/upload_all`` (multipart): strict like Feishu:
  ``parent_type`` must be ``bitable_file`` or ``bitable_image`` and ``parent_node`` the app
  token of a known Bitable (one with seeded rows or set fields), else 1061002 / 1061044; the file
  must not be empty and must match the declared ``size`` (1061002 / 1062009) and be at most
  20 MB (1061043). Each upload is kept in :attr:`uploads` (file_token, file_name, parent_type,
  parent_node, size, data).
- [upload_prepare] / [upload_part] / [upload_finish] ``POST /open-apis/drive/v1/medias/...``:
  the same upload in 4 MB blocks (any size above 0); parts must match the plan (1061002).
- anything else: HTTP 404 with code 404 (recorded), unless a handler was added with :meth:`on`.

Cards are checked as strictly as Feishu checks them (:mod:`bot.standins.card_rules`): a send, reply or
PATCH whose ``interactive`` content breaks a rule is refused with HTTP 400 and code 230099
(``ErrCode: 11310`` for the structure, ``ErrCode: 100290`` for a mention of no user) or 230025
(too big), stores nothing, and is kept in :attr:`refusals`. Mentions must name a user of the
fake's directory (:attr:`users`: ``bot.standins.events.DIRECTORY`` plus ``users=`` and
:meth:`add_users`); ``<at id=all>`` passes only in chats where :meth:`allow_mention_all` was
called (the group owner's setting). The test suite fails any test during which a fake refused a
card it was not told to expect: a test that provokes a refusal on purpose takes it with
:meth:`take_refusals`. :meth:`check_answer` applies the same rules to a card-callback answer;
:meth:`lock_card` scripts Feishu's "card action is lock" refusal of the next PATCHes.

A PATCH is refused like Feishu refuses it (HTTP 400, code 230001, recorded in :attr:`refusals`)
when the message is not ``interactive``, when its card (or the new one) is not shared
(``config.update_multi: true``), or when it was sent more than 14 days ago by the fake's
``clock`` (see the constructor; real time unless given).

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
import uuid as uuidlib
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Iterable

from aiohttp import web

from bot.standins import card_rules
from bot.standins.events import DIRECTORY

TOKEN_PATH = "/open-apis/auth/v3/tenant_access_token/internal"
ROUTES = ("token", "send", "reply", "patch", "search", "batch_update", "bot_info",
          "batch_create", "list_fields", "upload_all", "upload_prepare", "upload_part",
          "upload_finish")

PATCH_REFUSED = 230001           # Feishu: invalid request parameter (PATCH not allowed here)
PATCH_MAX_AGE = 14 * 86400       # seconds: Feishu updates messages up to 14 days old

_LIVE: "weakref.WeakSet[FakeFeishu]" = weakref.WeakSet()
LOCKED_MSG = ("Failed to update card content, ext=ErrCode: 11310; ErrMsg: card action is lock; "
              "ErrorValue: ;")


def unexpected_refusals() -> list[dict[str, Any]]:
    """Refusals of every fake in this process not yet taken or reported (then marked reported).

    The test suite's conftest calls this after each test and fails the test when it is not
    empty: a card the bot built was refused, as Feishu would refuse it.
    """
    found = []
    for fake in list(_LIVE):
        with fake._lock:
            found += fake.refusals[fake._reported:]
            fake._reported = len(fake.refusals)
    return found


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
                 users: Iterable[str] = (), bot_open_id: str = "ou_bot",
                 bot_name: str = "opsbot", bot_activate_status: int = 2,
                 clock: Any = None) -> None:
        """``clock`` (an object with ``.now()``, or a callable; Unix seconds; default real
        time): like Feishu, a send uuid dedupes for one hour after its first use, and a message
        can be patched for 14 days after it was sent."""
        self.app_id = app_id
        self.clock = clock
        self.bot_open_id, self.bot_name = bot_open_id, bot_name
        self.bot_activate_status = bot_activate_status
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
        self.users: set[str] = {*DIRECTORY, *users}
        self.mention_all_chats: set[str] = set()
        self.reset()
        _LIVE.add(self)

    # -- lifecycle ------------------------------------------------------------------------------


    def _now(self) -> float:
        """Unix seconds on the injected clock (``.now()`` or a callable), else real time."""
        if self.clock is None:
            return time.time()
        return self.clock.now() if hasattr(self.clock, "now") else self.clock()
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
        app = web.Application(client_max_size=64 * 1024 ** 2)  # uploads: 20 MB and parts
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
            self.refusals: list[dict[str, Any]] = []
            self._reported = 0
            self.tables: dict[tuple[str, str], list[dict[str, Any]]] = {}
            self.tokens: list[str] = getattr(self, "tokens", [])
            self.expired: set[str] = set()
            self._by_uuid: dict[str, tuple[str, float]] = {}   # uuid -> (message_id, first use)
            self._scripts: dict[str, list[Scripted]] = {r: [] for r in ROUTES}
            self._reset_drive()

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

    def add_users(self, *open_ids: str) -> None:
        """Add people to the directory: cards may then @-mention them."""
        with self._lock:
            self.users.update(open_ids)

    def allow_mention_all(self, chat_id: str, allowed: bool = True) -> None:
        """The group owner lets (or no longer lets) bots mention everyone in ``chat_id``."""
        with self._lock:
            (self.mention_all_chats.add if allowed else self.mention_all_chats.discard)(chat_id)

    def check_card(self, card: Any, chat_id: str | None = None) -> list[card_rules.Violation]:
        """What this fake would refuse in ``card`` sent to ``chat_id``."""
        with self._lock:
            return card_rules.check_card(card, users=set(self.users),
                                         mention_all=chat_id in self.mention_all_chats)

    def check_answer(self, answer: Any, chat_id: str | None = None) -> list[card_rules.Violation]:
        """What Feishu would refuse in a ``card.action.trigger`` answer shown in ``chat_id``."""
        with self._lock:
            return card_rules.check_answer(answer, users=set(self.users),
                                           mention_all=chat_id in self.mention_all_chats)

    def take_refusals(self) -> list[dict[str, Any]]:
        """The refusals so far (each ``{"route", "chat_id", "message_id", "code", "msg",
        "violations", "card"}``), forgotten here: a test that expects a refusal takes it."""
        with self._lock:
            taken, self.refusals, self._reported = self.refusals, [], 0
            return taken

    def lock_card(self, times: int = 1) -> None:
        """The next ``times`` PATCHes are refused as Feishu refuses a card someone is pressing a
        button on at that moment: HTTP 400, 230099, "ErrCode: 11310; ErrMsg: card action is
        lock" (retry shortly)."""
        self.fail("patch", status=400, code=card_rules.CARD_INVALID, msg=LOCKED_MSG, times=times)

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
               "headers": dict(request.headers), "json": body, "time": time.time(),
               "form": _form(request.headers.get("Content-Type", ""), raw)}
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
            action = {"search": "search", "batch_update": "batch_update",
                      "batch_create": "batch_create"}.get(parts[8])
            if action:
                return action, {"app": parts[4], "table": parts[6]}
        return FakeFeishu._drive_route(method, parts)

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
                     "bot": {"activate_status": self.bot_activate_status, "app_name": self.bot_name,
                             "avatar_url": "", "ip_white_list": [], "open_id": self.bot_open_id}}

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
        now = self._now()
        seen = self._by_uuid.get(uuid) if uuid else None
        if seen and now - seen[1] < 3600:  # Feishu: same uuid within an hour = same message
            message = next(m for m in self.messages if m["message_id"] == seen[0])
            return 200, {"code": 0, "msg": "success", "data": self._message_data(message)}
        try:
            content = json.loads(body.get("content") or "null")
        except ValueError:
            return 400, {"code": 230001, "msg": "content is not valid JSON"}
        refused = self._refuse_card(body.get("msg_type"), content, chat_id,
                                    route="reply" if reply_to else "send", message_id=reply_to)
        if refused is not None:
            return refused
        message = {"message_id": f"om_{next(self._ids):06x}", "chat_id": chat_id,
                   "receive_id": body.get("receive_id"), "msg_type": body.get("msg_type"),
                   "content": content, "uuid": uuid, "reply_to": reply_to, "time": self._now()}
        self.messages.append(message)
        self.chat_log.append(("message", dict(message)))
        if uuid:
            self._by_uuid[uuid] = (message["message_id"], now)
        return 200, {"code": 0, "msg": "success", "data": self._message_data(message)}

    def _refuse_card(self, msg_type: Any, content: Any, chat_id: str | None, *, route: str,
                     message_id: str | None) -> tuple[int, Any] | None:
        """Feishu's answer refusing a card that breaks a rule (recorded), or None."""
        if msg_type != "interactive" or (isinstance(content, dict)
                                         and content.get("type") == "template"):
            return None  # a template card is checked where it was built, not here
        violations = card_rules.check_card(content, users=self.users,
                                           mention_all=chat_id in self.mention_all_chats)
        if not violations:
            return None
        too_big = [v for v in violations if v.code == card_rules.CARD_TOO_BIG]
        code = card_rules.CARD_TOO_BIG if too_big else card_rules.CARD_INVALID
        msg = ("The message content is too long (card over 30 KB)" if too_big
               else card_rules.refusal_message(violations))
        self.refusals.append({"route": route, "chat_id": chat_id, "message_id": message_id,
                              "code": code, "msg": msg, "card": content,
                              "violations": [str(v) for v in violations], "time": time.time()})
        return 400, {"code": code, "msg": msg, "data": {}}

    def _refuse_patch(self, message: dict[str, Any], content: Any) -> tuple[int, Any] | None:
        """Feishu's refusal of a PATCH the message itself does not allow (recorded), or None:
        only ``interactive`` messages, only shared cards (``config.update_multi: true`` before
        and after), only messages up to :data:`PATCH_MAX_AGE` old (on :attr:`clock`)."""
        def shared(card: Any) -> bool:
            return (isinstance(card, dict) and (card.get("type") == "template" or (
                isinstance(card.get("config"), dict)
                and card["config"].get("update_multi") is True)))

        if message["msg_type"] != "interactive":
            why = f"only interactive messages can be updated, this one is {message['msg_type']}"
        elif not shared(message["content"]):
            why = "the card was not sent as a shared card (config.update_multi: true)"
        elif not shared(content):
            why = "the new card must declare config.update_multi: true too"
        elif self._now() - message["time"] > PATCH_MAX_AGE:
            why = "the message was sent more than 14 days ago and can no longer be updated"
        else:
            return None
        msg = f"Your request contains an invalid request parameter, ext={why}"
        self.refusals.append({"route": "patch", "chat_id": message["chat_id"],
                              "message_id": message["message_id"], "code": PATCH_REFUSED,
                              "msg": msg, "card": content, "violations": [why],
                              "time": time.time()})
        return 400, {"code": PATCH_REFUSED, "msg": msg, "data": {}}

    @staticmethod
    def _message_data(m: dict[str, Any]) -> dict[str, Any]:
        return {"message_id": m["message_id"], "chat_id": m["chat_id"], "msg_type": m["msg_type"],
                "parent_id": m["reply_to"] or "", "root_id": m["reply_to"] or "",
                "body": {"content": json.dumps(m["content"], ensure_ascii=False)}}

    def _on_patch(self, rec: dict[str, Any], message_id: str) -> tuple[int, Any]:
        message = next((m for m in self.messages if m["message_id"] == message_id), None)
        if message is None:
            return 400, {"code": 230011, "msg": "message not found (fake)"}
        try:
            content = json.loads((rec["json"] or {}).get("content") or "null")
        except ValueError:
            return 400, {"code": 230001, "msg": "content is not valid JSON"}
        refused = self._refuse_patch(message, content)
        if refused is None:
            refused = self._refuse_card(message["msg_type"], content, message["chat_id"],
                                        route="patch", message_id=message_id)
        if refused is not None:
            return refused
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

    # -- drive uploads, field lists, record creation (attachments and the log table) ------------

    UPLOAD_ALL_LIMIT = 20 * 1024 * 1024
    BLOCK = 4 * 1024 * 1024
    PARENT_TYPES = ("bitable_file", "bitable_image")

    def _reset_drive(self) -> None:
        self.uploads: list[dict[str, Any]] = []
        self.batch_creates: list[dict[str, Any]] = []
        self._creates_by_token: dict[tuple[str, str, str], tuple[int, Any]] = {}
        self.fields: dict[tuple[str, str], list[dict[str, Any]]] = {}
        self._sessions: dict[str, dict[str, Any]] = {}

    def set_fields(self, app_token: str, table_id: str, names: list[str],
                   types: dict[str, int] | None = None) -> None:
        """Give a table these fields (type 1 text unless ``types`` says otherwise, e.g. 17
        attachment); batch_create then refuses any other field name."""
        with self._lock:
            self.fields[(app_token, table_id)] = [
                {"field_id": f"fld{i:04d}", "field_name": n, "type": (types or {}).get(n, 1)}
                for i, n in enumerate(names)]
            self.tables.setdefault((app_token, table_id), [])

    @staticmethod
    def _drive_route(method: str, parts: list[str]) -> tuple[str | None, dict[str, str]]:
        if (method == "GET" and parts[:4] == ["open-apis", "bitable", "v1", "apps"]
                and len(parts) == 8 and parts[5] == "tables" and parts[7] == "fields"):
            return "list_fields", {"app": parts[4], "table": parts[6]}
        if method == "POST" and parts[:4] == ["open-apis", "drive", "v1", "medias"] \
                and len(parts) == 5 and parts[4] in ("upload_all", "upload_prepare",
                                                     "upload_part", "upload_finish"):
            return parts[4], {}
        return None, {}

    def _apps(self) -> set[str]:
        return {app for app, _ in self.tables} | {app for app, _ in self.fields}

    def _table_fields(self, app: str, table: str) -> list[dict[str, Any]]:
        if (app, table) in self.fields:
            return self.fields[(app, table)]
        names = dict.fromkeys(n for r in self.tables.get((app, table), []) for n in r["fields"])
        return [{"field_id": f"fld{i:04d}", "field_name": n, "type": 1}
                for i, n in enumerate(names)]

    def _on_list_fields(self, rec: dict[str, Any], app: str, table: str) -> tuple[int, Any]:
        if (app, table) not in self.tables and (app, table) not in self.fields:
            return 400, {"code": 1254041, "msg": "TableIdNotFound"}
        items = self._table_fields(app, table)
        size = min(int(rec["query"].get("page_size", 20)), 100)
        start = int(rec["query"].get("page_token") or 0)
        more = start + size < len(items)
        return 200, {"code": 0, "msg": "success", "data": {
            "items": items[start:start + size], "has_more": more,
            "page_token": str(start + size) if more else "", "total": len(items)}}

    def _on_batch_create(self, rec: dict[str, Any], app: str, table: str) -> tuple[int, Any]:
        token = rec["query"].get("client_token")
        if token:
            try:
                uuidlib.UUID(token)
            except ValueError:
                return 400, {"code": 1254001, "msg": "WrongRequestBody: client_token must be "
                                                     "a UUID"}
            if (app, table, token) in self._creates_by_token:  # Feishu: same token, same answer
                return self._creates_by_token[(app, table, token)]
        answer = self._batch_create(rec, app, table)
        if token and answer[0] == 200:
            self._creates_by_token[(app, table, token)] = answer
        return answer

    def _batch_create(self, rec: dict[str, Any], app: str, table: str) -> tuple[int, Any]:
        records = (rec["json"] or {}).get("records") or []
        if len(records) > 500:
            return 400, {"code": 1254104, "msg": "records exceed 500"}
        if (app, table) in self.fields:
            known = {f["field_name"] for f in self.fields[(app, table)]}
            unknown = sorted({k for r in records for k in (r.get("fields") or {})} - known)
            if unknown:
                return 400, {"code": 1254045, "msg": f"FieldNameNotFound {unknown[0]}"}
        stored = self.tables.setdefault((app, table), [])
        made = []
        for r in records:
            row = {"record_id": self._record_id(), "fields": dict(r.get("fields") or {})}
            stored.append(row)
            made.append(row)
        self.batch_creates.append({"app_token": app, "table_id": table, "records": records,
                                   "time": time.time()})
        return 200, {"code": 0, "msg": "success", "data": {"records": made}}

    def _check_parent(self, form: dict[str, Any]) -> tuple[int, Any] | None:
        if form.get("parent_type") not in self.PARENT_TYPES:
            return 400, {"code": 1061002, "msg": f"params error: parent_type "
                                                 f"{form.get('parent_type')!r}"}
        if form.get("parent_node") not in self._apps():
            return 400, {"code": 1061044, "msg": "parent node not exist"}
        return None

    def _on_upload_all(self, rec: dict[str, Any]) -> tuple[int, Any]:
        form = rec["form"] or {}
        data = form.get("file")
        if not isinstance(data, bytes) or not form.get("file_name") or not data:
            return 400, {"code": 1061002, "msg": "params error: file and file_name required"}
        refused = self._check_parent(form)
        if refused:
            return refused
        if len(data) > self.UPLOAD_ALL_LIMIT:
            return 400, {"code": 1061043, "msg": "file size beyond limit"}
        if str(len(data)) != str(form.get("size")):
            return 400, {"code": 1062009, "msg": "the actual size is inconsistent with the "
                                                 "parameter declaration size"}
        return 200, {"code": 0, "msg": "success", "data": {"file_token": self._store(form, data)}}

    def _store(self, form: dict[str, Any], data: bytes) -> str:
        token = f"boxcn{next(self._ids):010d}"
        self.uploads.append({"file_token": token, "file_name": form.get("file_name"),
                             "parent_type": form.get("parent_type"),
                             "parent_node": form.get("parent_node"), "size": len(data),
                             "data": data, "time": time.time()})
        return token

    def _on_upload_prepare(self, rec: dict[str, Any]) -> tuple[int, Any]:
        form = rec["json"] or {}
        refused = self._check_parent(form)
        if refused:
            return refused
        size = form.get("size")
        if not isinstance(size, int) or size <= 0 or not form.get("file_name"):
            return 400, {"code": 1061002, "msg": "params error: size and file_name required"}
        upload_id = f"up{next(self._ids):08d}"
        blocks = -(-size // self.BLOCK)
        self._sessions[upload_id] = {**form, "blocks": blocks, "parts": {}}
        return 200, {"code": 0, "msg": "success", "data": {
            "upload_id": upload_id, "block_size": self.BLOCK, "block_num": blocks}}

    def _on_upload_part(self, rec: dict[str, Any]) -> tuple[int, Any]:
        form = rec["form"] or {}
        session = self._sessions.get(str(form.get("upload_id")))
        data = form.get("file")
        try:
            seq = int(form.get("seq"))
        except (TypeError, ValueError):
            seq = -1
        if session is None or not isinstance(data, bytes) or not 0 <= seq < session["blocks"]:
            return 400, {"code": 1061002, "msg": "params error: upload_id, seq or file"}
        last = seq == session["blocks"] - 1
        want = session["size"] - self.BLOCK * seq if last else self.BLOCK
        if len(data) != want or str(len(data)) != str(form.get("size")):
            return 400, {"code": 1061002, "msg": f"params error: block {seq} must be {want} "
                                                 "bytes"}
        session["parts"][seq] = data
        return 200, {"code": 0, "msg": "success", "data": {}}

    def _on_upload_finish(self, rec: dict[str, Any]) -> tuple[int, Any]:
        body = rec["json"] or {}
        session = self._sessions.get(str(body.get("upload_id")))
        if session is None or body.get("block_num") != session["blocks"] \
                or len(session["parts"]) != session["blocks"]:
            return 400, {"code": 1061002, "msg": "params error: upload not complete"}
        del self._sessions[str(body["upload_id"])]
        data = b"".join(session["parts"][i] for i in range(session["blocks"]))
        return 200, {"code": 0, "msg": "success", "data": {"file_token": self._store(session,
                                                                                    data)}}


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


def _form(content_type: str, raw: bytes) -> dict[str, Any] | None:
    """The fields of a multipart/form-data body (file parts as bytes), else None."""
    if not content_type.startswith("multipart/form-data") or not raw:
        return None
    from email.parser import BytesParser
    from email.policy import HTTP

    message = BytesParser(policy=HTTP).parsebytes(
        f"Content-Type: {content_type}\r\n\r\n".encode() + raw)
    form: dict[str, Any] = {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        payload = part.get_payload(decode=True) or b""
        is_file = name == "file" or part.get_filename() is not None
        form[name] = payload if is_file else payload.decode("utf-8")
    return form

"""A stand-in for Feishu's long-connection endpoint: discovery and a WebSocket server on loopback.

Used by the tests of ``FEISHU_CONNECTION=ws`` (and usable by a demo). It speaks the protocol
that lark-oapi's ``ws.Client`` speaks (facts in ``../shared/PLATFORM.md``, "Long connection"):

- Discovery, ``POST {domain}/callback/ws/endpoint`` with ``{"AppID", "AppSecret"}``, served on
  a :class:`~bot.standins.fake_feishu.FakeFeishu`'s domain (through its :meth:`~FakeFeishu.on` hook).
  Right credentials answer ``{"code": 0, "data": {"URL": "ws://127.0.0.1:PORT/ws/v2?
  device_id=..&service_id=..&ticket=..", "ClientConfig": {...}}}``; wrong or missing ones answer
  code 514 (AuthFailed), which the SDK treats as fatal. Each ticket opens one connection.
- The WebSocket server refuses a handshake without a valid ticket (HTTP 403 with the
  ``Handshake-Status`` / ``Handshake-Msg`` / ``Handshake-Autherrcode`` headers the SDK reads).
- Frames are ``lark_oapi.ws.pb.pbbp2_pb2.Frame`` protobufs. A client ping (control frame, header
  ``type=ping``, ``service`` = the connection's service_id) gets a pong carrying the current
  ClientConfig as JSON. An event goes out as a data frame with headers ``type=event``,
  ``message_id``, ``trace_id``, ``sum``, ``seq`` (optionally split into ``parts`` frames); the
  client's answer is the same frame back with payload ``{"code": 200, "data": base64(JSON)}``.
  An answer later than :data:`ANSWER_DEADLINE` seconds is recorded as ``late`` (Feishu shows the
  user an error for a card callback not answered within 3 s).

Recorded: :attr:`discoveries`, :attr:`connections` (with close codes), :attr:`pings`,
:attr:`answers` (by frame message_id: code, decoded data, latency, late) and
:attr:`protocol_errors` (frames that break the protocol). Scripted: :meth:`fail_discovery`
(non-zero codes, e.g. a fatal answer during a reconnect), :meth:`refuse_handshake`, :meth:`drop`
(abort every open socket, no close frame), :attr:`client_config`.

    with FakeFeishu() as fake, FakeFeishuWS(fake) as ws:
        settings = fake.settings(connection="ws")
        ...                                   # start the bot's long connection
        ws.wait_connected()
        mid = ws.send_event(message_event("help"))
        ws.wait_answer(mid)["code"] == 200
"""
from __future__ import annotations

import asyncio
import base64
import itertools
import json
import secrets
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, urlsplit

from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from lark_oapi.ws.pb.pbbp2_pb2 import Frame

from bot.standins.fake_feishu import FakeFeishu

DISCOVERY_PATH = "/callback/ws/endpoint"
ANSWER_DEADLINE = 3.0
AUTH_FAILED = 514           # the SDK's AuthFailed: fatal, start() raises
EXCEED_CONN_LIMIT = 1000040350
MAX_CONNECTIONS = 50        # per app
CONTROL, DATA = 0, 1

# Short intervals so tests and demos reconnect quickly (Feishu sends -1 / 120 / 30 / 120).
FAST_CONFIG = {"ReconnectCount": -1, "ReconnectInterval": 1, "ReconnectNonce": 0,
               "PingInterval": 1}


@dataclass
class _Conn:
    device_id: str
    service_id: int
    socket: ServerConnection
    opened_at: float
    closed_at: float | None = None
    close_code: int | None = None


class FakeFeishuWS:
    """The long-connection stand-in. Use as a context manager, or :meth:`start` / :meth:`stop`."""

    def __init__(self, fake: FakeFeishu, *, client_config: dict[str, int] | None = None) -> None:
        self.fake = fake
        self.client_config = dict(client_config or FAST_CONFIG)
        self.port = 0
        self._lock = threading.Condition()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: Any = None
        self._ids = itertools.count(1)
        self.discoveries: list[dict[str, Any]] = []
        self.connections: list[_Conn] = []
        self.pings = 0
        self.answers: dict[str, dict[str, Any]] = {}
        self.protocol_errors: list[str] = []
        self._tickets: dict[str, tuple[str, int]] = {}
        self._sent: dict[str, float] = {}
        self._discovery_script: list[list[Any]] = []
        self._handshake_script: list[list[Any]] = []

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> "FakeFeishuWS":
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="fake-feishu-ws",
                                        daemon=True)
        self._thread.start()
        self.port = asyncio.run_coroutine_threadsafe(self._serve(), self._loop).result(10)
        self.fake.on("POST", DISCOVERY_PATH, self._discover)
        return self

    async def _serve(self) -> int:
        self._server = await serve(self._session, "127.0.0.1", 0,
                                   process_request=self._check_handshake)
        return self._server.sockets[0].getsockname()[1]

    def stop(self) -> None:
        if self._loop is None:
            return

        async def close() -> None:
            self._server.close()
            await self._server.wait_closed()

        asyncio.run_coroutine_threadsafe(close(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(10)
        self._loop.close()
        self._loop = self._thread = None

    def __enter__(self) -> "FakeFeishuWS":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # -- scripting ------------------------------------------------------------------------------

    def fail_discovery(self, code: int = AUTH_FAILED, msg: str = "scripted failure", *,
                       times: int = 1, status: int = 200) -> None:
        """The next ``times`` discoveries answer ``{"code": code, "msg": msg}`` (HTTP status).

        Codes as the SDK reads them: 1 (busy) and 1000040343 (internal) are retried; any other
        non-zero code is fatal (``ClientException``); a non-200 status is retried."""
        with self._lock:
            self._discovery_script.append([code, msg, times, status])

    def refuse_handshake(self, status: int = AUTH_FAILED, msg: str = "scripted refusal", *,
                         auth_code: int = 0, times: int = 1) -> None:
        """The next ``times`` WebSocket handshakes are refused with ``Handshake-Status``."""
        with self._lock:
            self._handshake_script.append([status, msg, auth_code, times])

    def drop(self) -> int:
        """Abort every open socket without a close frame; return how many were dropped."""
        with self._lock:
            open_ = [c for c in self.connections if c.closed_at is None]
        for c in open_:
            self._loop.call_soon_threadsafe(c.socket.transport.abort)
        return len(open_)

    # -- driving --------------------------------------------------------------------------------

    def send_event(self, payload: dict[str, Any], *, message_id: str | None = None,
                   parts: int = 1, connection: int = -1) -> str:
        """Push ``payload`` (a 2.0 event envelope) as data frame(s); return the frame message_id.

        ``connection`` picks one of the open connections (default: the newest)."""
        with self._lock:
            open_ = [c for c in self.connections if c.closed_at is None]
        if not open_:
            raise AssertionError("no open long connection to send an event on")
        conn = open_[connection]
        mid = message_id or uuid.uuid4().hex
        body = json.dumps(payload, ensure_ascii=False).encode()
        size = -(-len(body) // parts)
        chunks = [body[i * size:(i + 1) * size] for i in range(parts)]
        seq_id = next(self._ids)
        frames = []
        for seq, chunk in enumerate(chunks):
            frame = Frame(SeqID=seq_id, LogID=seq_id, service=conn.service_id, method=DATA,
                          payload=chunk)
            for key, value in (("type", "event"), ("message_id", mid),
                               ("trace_id", f"trace-{seq_id}"), ("sum", str(parts)),
                               ("seq", str(seq))):
                frame.headers.add(key=key, value=value)
            frames.append(frame.SerializeToString())
        with self._lock:
            self._sent[mid] = time.monotonic()

        async def send() -> None:
            for f in frames:
                await conn.socket.send(f)

        asyncio.run_coroutine_threadsafe(send(), self._loop).result(5)
        return mid

    def wait_for(self, predicate: Any, timeout: float = 5.0) -> bool:
        with self._lock:
            return self._lock.wait_for(predicate, timeout)

    def wait_answer(self, message_id: str, timeout: float = 5.0) -> dict[str, Any]:
        if not self.wait_for(lambda: message_id in self.answers, timeout):
            raise AssertionError(f"no answer to frame {message_id} within {timeout}s")
        with self._lock:
            return self.answers[message_id]

    def wait_connected(self, n: int = 1, timeout: float = 10.0) -> None:
        """Wait until ``n`` connections were opened so far and one is open now."""
        if not self.wait_for(lambda: len(self.connections) >= n and self.open_count() > 0,
                             timeout):
            raise AssertionError(f"expected {n} connection(s) within {timeout}s; got "
                                 f"{len(self.connections)}, discoveries {self.discoveries}")

    def open_count(self) -> int:
        return sum(1 for c in self.connections if c.closed_at is None)

    # -- discovery (on the FakeFeishu's HTTP server) -------------------------------------------

    def _discover(self, rec: dict[str, Any]) -> tuple[int, Any]:
        body = rec.get("json") if isinstance(rec.get("json"), dict) else {}
        entry = {"app_id": body.get("AppID"), "time": time.time()}
        with self._lock:
            script = self._discovery_script[0] if self._discovery_script else None
            if script is not None:
                script[2] -= 1
                if script[2] <= 0:
                    self._discovery_script.pop(0)
            if script is not None:
                code, msg, _, status = script
                self.discoveries.append({**entry, "code": code})
                self._lock.notify_all()
                return status, {"code": code, "msg": msg}
            if body.get("AppID") != self.fake.app_id or body.get("AppSecret") != self.fake.app_secret:
                self.discoveries.append({**entry, "code": AUTH_FAILED})
                self._lock.notify_all()
                return 200, {"code": AUTH_FAILED, "msg": "auth failed: app_id or app_secret "
                                                         "is wrong"}
            n = next(self._ids)
            ticket = secrets.token_hex(8)
            device_id, service_id = f"dev-{n}", 1000 + n
            self._tickets[ticket] = (device_id, service_id)
            self.discoveries.append({**entry, "code": 0})
            self._lock.notify_all()
        url = (f"ws://127.0.0.1:{self.port}/ws/v2?fpid=1&aid=1&device_id={device_id}"
               f"&access_key=fake&service_id={service_id}&ticket={ticket}")
        return 200, {"code": 0, "msg": "ok",
                     "data": {"URL": url, "ClientConfig": dict(self.client_config)}}

    # -- the WebSocket side ---------------------------------------------------------------------

    def _check_handshake(self, connection: ServerConnection, request: Any) -> Any:
        query = parse_qs(urlsplit(request.path).query)
        ticket = (query.get("ticket") or [""])[0]
        with self._lock:
            script = self._handshake_script[0] if self._handshake_script else None
            if script is not None:
                script[3] -= 1
                if script[3] <= 0:
                    self._handshake_script.pop(0)
                status, msg, auth_code = script[0], script[1], script[2]
            elif ticket not in self._tickets:
                status, msg, auth_code = AUTH_FAILED, "invalid or used ticket", 0
            elif self.open_count() >= MAX_CONNECTIONS:
                status, msg, auth_code = AUTH_FAILED, "too many connections", EXCEED_CONN_LIMIT
            else:
                return None
        response = connection.respond(403, msg + "\n")
        response.headers["Handshake-Status"] = str(status)
        response.headers["Handshake-Msg"] = msg
        response.headers["Handshake-Autherrcode"] = str(auth_code)
        return response

    async def _session(self, socket: ServerConnection) -> None:
        ticket = (parse_qs(urlsplit(socket.request.path).query).get("ticket") or [""])[0]
        with self._lock:
            device_id, service_id = self._tickets.pop(ticket)
            conn = _Conn(device_id, service_id, socket, time.time())
            self.connections.append(conn)
            self._lock.notify_all()
        try:
            async for raw in socket:
                self._receive(conn, raw)
        except ConnectionClosed:
            pass
        finally:
            with self._lock:
                conn.closed_at = time.time()
                conn.close_code = socket.close_code
                self._lock.notify_all()

    def _receive(self, conn: _Conn, raw: Any) -> None:
        if not isinstance(raw, bytes):
            self._error(f"text frame on {conn.device_id}: the protocol is binary")
            return
        frame = Frame()
        try:
            frame.ParseFromString(raw)
        except Exception:  # noqa: BLE001 - any undecodable frame is a protocol error
            self._error(f"undecodable frame on {conn.device_id}")
            return
        headers = {h.key: h.value for h in frame.headers}
        if frame.service != conn.service_id:
            self._error(f"frame with service {frame.service} on service {conn.service_id}")
        if frame.method == CONTROL and headers.get("type") == "ping":
            with self._lock:
                self.pings += 1
            pong = Frame(SeqID=0, LogID=0, service=conn.service_id, method=CONTROL,
                         payload=json.dumps(self.client_config).encode())
            pong.headers.add(key="type", value="pong")
            asyncio.ensure_future(conn.socket.send(pong.SerializeToString()))
        elif frame.method == DATA:
            self._answer(conn, frame, headers)
        else:
            self._error(f"unexpected frame method={frame.method} headers={headers}")

    def _answer(self, conn: _Conn, frame: Frame, headers: dict[str, str]) -> None:
        mid = headers.get("message_id", "")
        try:
            body = json.loads(frame.payload)
            data = json.loads(base64.b64decode(body["data"])) if body.get("data") else None
        except (ValueError, KeyError, TypeError):
            self._error(f"unreadable answer to {mid}: {frame.payload[:200]!r}")
            return
        with self._lock:
            sent = self._sent.get(mid)
            if sent is None:
                self.protocol_errors.append(f"answer to unknown frame {mid}")
            latency = time.monotonic() - sent if sent is not None else None
            self.answers[mid] = {"code": body.get("code"), "data": data, "headers": headers,
                                 "latency": latency, "device_id": conn.device_id,
                                 "late": latency is not None and latency > ANSWER_DEADLINE}
            self._lock.notify_all()

    def _error(self, text: str) -> None:
        with self._lock:
            self.protocol_errors.append(text)
            self._lock.notify_all()

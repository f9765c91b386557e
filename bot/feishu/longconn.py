"""Feishu's long connection (``FEISHU_CONNECTION=ws``): lark-oapi's ``ws.Client``, supervised.

The worker opens the connection itself, so Feishu needs no public URL, no encrypt key and no
verification token (the connection is authenticated by the app id and secret). What arrives goes
through the webhook's own steps, :meth:`bot.web.intake.Intake.handle_trusted`: a message is filtered
and recorded in the inbox under ``msg:<message_id>`` (a redelivery is recorded once; the worker's
inbox processing answers it, cards go through the outbox as usual) and a button press is
answered by :func:`bot.chat.handlers.handle_card_action`; its toast (and card) goes back in the answer
frame, inside Feishu's 3 s. A store failure answers 500, so Feishu delivers the event again.

The SDK's event loop
--------------------
``lark_oapi.ws.client`` takes an event loop when it is first imported (``asyncio.
get_event_loop()``) and keeps it in its module global ``loop``: ``Client.start()`` runs that
loop for ever and every task it makes (receive loop, pings, reconnects) goes on it. If the
first import happens inside the worker's running loop, that global *is* the worker's loop, and
``start()`` fails from any thread ("This event loop is already running"); started naively in the
main thread it would block the worker. ``Client()`` also schedules a cache-cleaning task on the
constructing thread's current loop. So each :class:`Session`:

1. runs in its own thread with a new loop, set as that thread's current loop;
2. points the SDK's module global at that loop and builds the client *in* that thread, under a
   process-wide lock (the global is one per process, so only one client may live at a time);
3. when stopped, cancels every task of its loop from outside (``call_soon_threadsafe``), closes
   the socket, lets the cancelled tasks finish, closes the loop and puts the global back.

The worker's loop never runs SDK code; the SDK's loop runs only our handlers, which record (one
INSERT) or answer a button (a few SQLite statements) and return.

Supervision
-----------
The SDK re-discovers and reconnects by itself after a dropped socket. It gives up in two ways:
``start()`` raises (a fatal discovery answer at start, such as wrong credentials), or a
reconnect meets a fatal answer (or runs out of ``ReconnectCount``): the task that was
reconnecting dies and the client stays disconnected while ``start()`` keeps blocking. The
session's loop has a task factory (a public asyncio hook on our own loop) that sees a task end
with the SDK's ``ClientException`` or ``ServerUnreachableException``. In either case, and also
when the client has been reconnecting for longer than ``down_limit``, :class:`LongConnection`
stops that session and starts a new client after a backoff (``backoff[0]`` s, doubling up to
``backoff[1]``; back to the start after a session that lived ``stable_after`` s).

Known limit: the SDK's discovery request has no timeout and blocks its loop; a session stuck in
it cannot be interrupted, so a restart waits for it and ``stop()`` gives up after its timeout
(the threads are daemons: the process still exits).
"""
from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import threading
import time
from typing import Any, Callable

from bot.errors import OpsbotError
from bot.settings import FeishuSettings, Settings

log = logging.getLogger("opsbot.longconn")

DISCOVERY_PATH = "/callback/ws/endpoint"
SDK_LOOP_LOCK = threading.Lock()   # guards lark_oapi.ws.client.loop: one SDK client at a time
CLOSE_TIMEOUT = 2.0
KEEP = 100         # sessions and restart reasons kept for inspection
STORE_WAIT = 2.0   # seconds a handler waits for SQLite's write lock


class StoreUnavailable(OpsbotError):
    """The event could not be recorded: the SDK answers 500 and Feishu delivers it again."""


def restart_delay(failures: int, first: float, maximum: float) -> float:
    """Backoff before the ``failures``-th restart in a row (1-based): first, 2x, 4x … maximum."""
    return min(maximum, first * 2 ** max(0, failures - 1))


def event_dict(event: Any) -> dict[str, Any]:
    """A lark-oapi event object back to the JSON shape Feishu sent (what the intake reads)."""
    from lark_oapi.core.json import JSON

    return json.loads(JSON.marshal(event) or "{}")


def build_event_handler(intake: Any, on_recorded: Callable[[str], None] | None = None) -> Any:
    """The SDK's dispatcher, built with blank credentials (the connection is authenticated):
    messages and button presses go to ``intake.handle_trusted``."""
    import lark_oapi as lark

    from bot.web.intake import EVENT_MESSAGE

    def answer(event: Any) -> dict[str, Any]:
        outcome = intake.handle_trusted(event_dict(event))
        if outcome.response.status >= 500:
            raise StoreUnavailable(outcome.response.json.get("message", "store unavailable"))
        if outcome.recorded and on_recorded is not None:
            on_recorded(outcome.recorded)
        # A refused (malformed) event is answered with nothing to show: it stays refused, so
        # answering 500 would only make Feishu push it again.
        return outcome.response.json if outcome.response.status == 200 else {}

    def on_message(event: Any) -> None:
        answer(event)

    return (lark.EventDispatcherHandler.builder("", "")
            .register_p2_customized_event(EVENT_MESSAGE, on_message)
            .register_p2_card_action_trigger(answer)
            .build())


class Session:
    """One ``lark.ws.Client`` in one thread with its own event loop, from start to close."""

    def __init__(self, settings: Settings, handler_factory: Callable[[], tuple[Any, Callable]],
                 number: int, changed: threading.Event) -> None:
        self.settings = settings
        self.handler_factory = handler_factory
        self.number = number
        self.changed = changed
        self.thread = threading.Thread(target=self._main, name=f"feishu-ws-{number}",
                                       daemon=True)
        self.loop: asyncio.AbstractEventLoop | None = None    # while it can be interrupted
        self.event_loop: asyncio.AbstractEventLoop | None = None  # kept, to check it closed
        self.ended = threading.Event()
        self.started_at = time.monotonic()
        self.error: BaseException | None = None     # start() raised it
        self.gave_up: BaseException | None = None   # a task of the SDK ended with it
        self.down_since: float | None = None        # reconnecting since (monotonic)
        self._lock = threading.Lock()
        self._stopping = False
        self._closing = False

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        """Ask the session to end (from any thread); it closes its socket and loop itself."""
        with self._lock:
            self._stopping = True
            loop = self.loop
        if loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                loop.call_soon_threadsafe(self._cancel_all)

    @property
    def finished_reason(self) -> str | None:
        if self.gave_up is not None:
            return f"the SDK gave up ({type(self.gave_up).__name__}: {self.gave_up})"
        if self.error is not None:
            return f"start failed ({type(self.error).__name__}: {self.error})"
        if self.ended.is_set():
            return "the client ended"
        return None

    # -- in the session's thread ----------------------------------------------------------------

    def _main(self) -> None:
        loop = self.event_loop = asyncio.new_event_loop()
        loop.set_task_factory(self._task_factory)
        asyncio.set_event_loop(loop)
        release: Callable[[], None] | None = None
        try:
            import lark_oapi as lark
            from lark_oapi.ws import client as sdk

            with SDK_LOOP_LOCK:
                saved, sdk.loop = sdk.loop, loop
                try:
                    with self._lock:
                        if self._stopping:
                            return
                        self.loop = loop
                    handler, release = self.handler_factory()
                    f = self.settings.feishu
                    client = lark.ws.Client(f.app_id, f.app_secret.get(), event_handler=handler,
                                            domain=f.domain, log_level=lark.LogLevel.WARNING)
                    client.on_reconnecting = self._on_reconnecting
                    client.on_reconnected = self._on_reconnected
                    log.info("long connection: client %d starting", self.number)
                    try:
                        client.start()
                    except asyncio.CancelledError:
                        pass  # stop() cancelled it
                    except Exception as exc:  # noqa: BLE001 - reported to the supervisor
                        self.error = exc
                        log.error("long connection: client %d stopped: %s: %s", self.number,
                                  type(exc).__name__, exc)
                    finally:
                        self._close(loop, client)
                finally:
                    sdk.loop = saved
        except Exception:  # noqa: BLE001 - the supervisor restarts a session that crashed
            log.exception("long connection: client %d crashed", self.number)
            self.error = self.error or RuntimeError("session crashed")
        finally:
            with self._lock:
                self.loop = None
            if not loop.is_closed():
                self._close(loop, None)
            asyncio.set_event_loop(None)
            if release is not None:
                release()
            self.ended.set()
            self.changed.set()

    def _close(self, loop: asyncio.AbstractEventLoop, client: Any) -> None:
        """Cancel what is left, close the socket (with a close frame), close the loop."""
        self._closing = True
        # Cancel first, so nothing reconnects when the socket closes. A task may swallow one
        # cancellation (the SDK's ping loop sleeps a whole PingInterval in a ``finally``), so
        # cancel again what is left, a few times, never waiting long.
        pending = {t for t in asyncio.all_tasks(loop) if not t.done()}
        for _ in range(3):
            if not pending:
                break
            for task in pending:
                task.cancel()
            _, pending = loop.run_until_complete(asyncio.wait(pending, timeout=CLOSE_TIMEOUT))
        if pending:
            log.warning("long connection: client %d left %d task(s) that ignore cancellation",
                        self.number, len(pending))
        # The SDK has no public close; its socket is ``Client._conn`` (None when disconnected).
        conn = getattr(client, "_conn", None)
        if conn is not None:
            async def close() -> None:
                try:
                    await asyncio.wait_for(conn.close(), CLOSE_TIMEOUT)
                except Exception:  # noqa: BLE001 - a dead peer: drop the transport instead
                    transport = getattr(conn, "transport", None)
                    if transport is not None:
                        transport.abort()
            loop.run_until_complete(close())
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.run_until_complete(loop.shutdown_default_executor())
        loop.close()

    def _cancel_all(self) -> None:
        if self._closing:
            return
        for task in asyncio.all_tasks():
            task.cancel()

    def _task_factory(self, loop: asyncio.AbstractEventLoop, coro: Any, **kwargs: Any):
        task = asyncio.Task(coro, loop=loop, **kwargs)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task) -> None:
        if task.cancelled():
            return
        exc = task.exception()  # retrieved here, so asyncio does not log it again
        if exc is None:
            return
        from lark_oapi.ws.exception import ClientException, ServerUnreachableException

        if not isinstance(exc, (ClientException, ServerUnreachableException)) or self._closing:
            log.debug("long connection: task %s ended: %r", task.get_name(), exc)
            return
        log.error("long connection: client %d gave up: %s: %s", self.number,
                  type(exc).__name__, exc)
        self.gave_up = exc
        self.changed.set()

    def _on_reconnecting(self) -> None:
        if self.down_since is None:
            self.down_since = time.monotonic()
        log.warning("long connection: client %d lost its connection, reconnecting", self.number)
        self.changed.set()

    def _on_reconnected(self) -> None:
        self.down_since = None
        log.info("long connection: client %d reconnected", self.number)
        self.changed.set()


class LongConnection:
    """Keeps one long connection open until :meth:`stop`: restarts the client when needed."""

    def __init__(self, settings: Settings, clock: Any = None, *,
                 on_recorded: Callable[[str], None] | None = None, down_limit: float = 60.0,
                 backoff: tuple[float, float] = (1.0, 60.0), stable_after: float = 60.0) -> None:
        from pipeline.clock import Clock

        self.settings = settings
        self.clock = clock or Clock()
        self.on_recorded = on_recorded
        self.down_limit = down_limit
        self.backoff = backoff
        self.stable_after = stable_after
        self.sessions: list[Session] = []   # the latest KEEP, the current one last
        self.restarts: list[str] = []       # why each restart happened (the latest KEEP)
        self.delays: list[float] = []       # and the backoff before it
        self._numbers = itertools.count(1)
        self._stop = threading.Event()
        self._changed = threading.Event()
        self._thread = threading.Thread(target=self._supervise, name="feishu-ws", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> bool:
        """Close the connection; True when every thread ended within ``timeout``."""
        self._stop.set()
        self._changed.set()
        deadline = time.monotonic() + timeout
        if self._thread.ident is not None:
            self._thread.join(max(0.0, deadline - time.monotonic()))
        for session in list(self.sessions):
            session.stop()
            session.thread.join(max(0.0, deadline - time.monotonic()))
        alive = [t.name for t in [self._thread, *(s.thread for s in self.sessions)]
                 if t.is_alive()]
        if alive:
            log.warning("long connection: %s did not end within %.0f s (blocked in a Feishu "
                        "request); leaving it to the process exit", ", ".join(alive), timeout)
            return False
        log.info("long connection closed")
        return True

    @property
    def current(self) -> Session | None:
        return self.sessions[-1] if self.sessions else None

    def _handler_factory(self) -> tuple[Any, Callable[[], None]]:
        """Per session: an intake on the session's own DB connection, and its release."""
        from storage.db import open_db, set_lock_wait

        from bot.chat import handlers
        from bot.web.intake import Intake

        settings, clock = self.settings, self.clock
        db = open_db(settings.db_path, migrate=False)
        # Fail fast on a locked store: the SDK then answers 500 and Feishu delivers again,
        # instead of this loop waiting 30 s (a button must be answered within 3 s).
        set_lock_wait(db, STORE_WAIT)
        intake = Intake(settings, db, clock, db_lock=threading.RLock(),
                        card_handler=lambda p: handlers.handle_card_action(db, settings, p, clock))
        return build_event_handler(intake, self.on_recorded), db.conn.close

    def _supervise(self) -> None:
        failures = 0
        while not self._stop.is_set():
            session = Session(self.settings, self._handler_factory, next(self._numbers),
                              self._changed)
            self.sessions.append(session)
            del self.sessions[:-KEEP]   # the older ones have ended (one client at a time)
            session.start()
            reason = self._watch(session)
            session.stop()
            while not session.ended.wait(1.0):
                if self._stop.is_set():
                    return  # stop() joins what is left, with its own deadline
            if self._stop.is_set():
                return
            lived = time.monotonic() - session.started_at
            failures = 1 if lived >= self.stable_after else failures + 1
            delay = restart_delay(failures, *self.backoff)
            self.restarts.append(reason)
            self.delays.append(delay)
            del self.restarts[:-KEEP], self.delays[:-KEEP]
            log.warning("long connection: restarting the client in %.1f s: %s", delay, reason)
            self._stop.wait(delay)

    def _watch(self, session: Session) -> str:
        """Block until the session must end; return why."""
        while True:
            self._changed.clear()
            if self._stop.is_set():
                return "stopping"
            reason = session.finished_reason
            if reason is not None:
                return reason
            down = session.down_since
            if down is not None and time.monotonic() - down > self.down_limit:
                return f"disconnected for over {self.down_limit:g} s"
            wait = 1.0 if down is None else max(0.05, min(1.0, down + self.down_limit
                                                          - time.monotonic() + 0.01))
            self._changed.wait(wait)


def probe_endpoint(feishu: FeishuSettings, timeout: float) -> tuple[int, str, dict[str, Any]]:
    """One discovery request, as the SDK makes it but bounded by ``timeout``.

    Returns ``(code, msg, client_config)``; code 0 means Feishu would hand out a connection. The
    answer's URL carries a ticket and is not returned. No connection is opened: an open one
    would take events away from the worker (each event goes to one connection). Raises
    ``requests.RequestException`` when the domain does not answer, ``ValueError`` on an answer
    that is not JSON."""
    import requests

    resp = requests.post(feishu.domain.rstrip("/") + DISCOVERY_PATH, timeout=timeout,
                         json={"AppID": feishu.app_id, "AppSecret": feishu.app_secret.get()},
                         headers={"locale": "zh"})
    try:
        body = resp.json()
    except ValueError:
        raise ValueError(f"HTTP {resp.status_code}, not JSON") from None
    if not isinstance(body, dict):
        raise ValueError(f"HTTP {resp.status_code}, not a JSON object")
    code = body.get("code")
    if resp.status_code != 200 and not code:
        code = resp.status_code
    data = body.get("data") if isinstance(body.get("data"), dict) else {}
    config = data.get("ClientConfig") if isinstance(data.get("ClientConfig"), dict) else {}
    if code == 0 and not data.get("URL"):
        return -1, "answer without a connection URL", config
    return int(code) if isinstance(code, int) else -1, str(body.get("msg") or ""), config

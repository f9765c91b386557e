"""The web process: ``create_app()`` builds the Flask app that gunicorn serves.

Routes: ``POST /webhook/event`` and ``POST /webhook/card`` (both through :mod:`bot.web.intake`),
``GET /healthz``, ``GET /metrics`` (Prometheus text, :mod:`bot.metrics`).

The request only validates, records and answers; the HTTP answer never waits for Feishu. By
default the worker process answers recorded commands (:func:`bot.chat.handlers.process_inbox`). With
``OPSBOT_WEB_DISPATCH=1`` a per-process :class:`Dispatcher` thread (started lazily, so it lives in
each gunicorn worker after the fork) also claims inbox rows, runs the commands and flushes the
message outbox; rows it does not finish are left to the worker once their lease runs out.
Card button presses are answered inside the request (Feishu shows the toast and new card).

Threads: request threads share one connection behind a lock (gunicorn sync workers serve one
request at a time; the dev server is threaded); the dispatcher opens its own connection.
"""
from __future__ import annotations

import logging
import os
import queue as queuelib
import socket
import threading
import time
import uuid
from typing import Any

from flask import Flask, Response as FlaskResponse, jsonify

from pipeline.clock import Clock
from storage.db import database_file, open_db, ping

from bot.chat import handlers
from bot.metrics import render_metrics
from bot.web.http_flask import json_errors, webhook_view
from bot.web.intake import Intake
from bot.settings import Settings, load_settings

log = logging.getLogger("opsbot.app")

IDLE_SWEEP = 5.0   # seconds between dispatcher sweeps for rows nobody claimed


class AppState:
    """What the views share: settings, clock, the DB (per process), Feishu client, dispatcher."""

    def __init__(self, settings: Settings, *, db: Any = None, feishu_client: Any = None,
                 clock: Any = None) -> None:
        self.settings = settings
        self.clock = clock or Clock()
        self.lock = threading.RLock()
        self._db = db
        self._db_pid = os.getpid() if db is not None else None
        self._explicit_db = db is not None
        self._feishu = feishu_client
        self._dispatcher: Dispatcher | None = None
        self._metrics_db: tuple[int, Any, Any] | None = None
        self._totals: Any = None

    @property
    def db(self) -> Any:
        with self.lock:
            if self._db is None or (not self._explicit_db and self._db_pid != os.getpid()):
                self._db = open_db(self.settings.db_path)
                self._db_pid = os.getpid()
            return self._db

    @property
    def db_file(self) -> str:
        """The SQLite file path ('' for an in-memory store)."""
        if self._explicit_db:
            return database_file(self._db) or ""
        return str(self.settings.db_path)

    @property
    def feishu(self) -> Any:
        if self._feishu is None and self.settings.feishu.configured:
            from bot.feishu.client import FeishuClient
            self._feishu = FeishuClient(self.settings.feishu)
        return self._feishu

    def intake(self) -> Intake:
        db = self.db
        return Intake(self.settings, db, self.clock, db_lock=self.lock,
                      card_handler=lambda p: handlers.handle_card_action(db, self.settings, p,
                                                                         self.clock))

    def metrics_connection(self) -> tuple[Any, Any]:
        """The /metrics view's own connection and lock (per process), so a scrape does not
        take :attr:`lock`, which every webhook request holds. An in-memory store cannot be
        opened twice: it is shared, behind the request lock."""
        cached = self._metrics_db
        if cached is not None and cached[0] == os.getpid():
            return cached[1], cached[2]
        path = self.db_file
        if not path or path == ":memory:":
            return self.db, self.lock
        with self.lock:  # once per process
            if self._metrics_db is None or self._metrics_db[0] != os.getpid():
                self.db  # noqa: B018 - opening the main connection migrates the store first
                self._metrics_db = (os.getpid(), open_db(path, migrate=False), threading.Lock())
                self._totals = None
            return self._metrics_db[1], self._metrics_db[2]

    def attempt_totals(self) -> Any:
        """This process's running attempt totals (see :class:`bot.metrics.AttemptTotals`)."""
        if self._totals is None:
            from bot.metrics import AttemptTotals
            self._totals = AttemptTotals()
        return self._totals

    def dispatcher(self) -> "Dispatcher":
        with self.lock:
            if self._dispatcher is None or self._dispatcher.pid != os.getpid():
                self._dispatcher = Dispatcher(self)
            return self._dispatcher


class Dispatcher:
    """One daemon thread per process: handles recorded messages and flushes the outbox."""

    def __init__(self, state: AppState) -> None:
        self.state = state
        self.pid = os.getpid()
        # unique per process start: containers can share a hostname and a PID
        self.owner = f"web-{socket.gethostname()}-{self.pid}-{uuid.uuid4().hex}"
        self.keys: queuelib.Queue[str | None] = queuelib.Queue()
        self.idle = threading.Event()
        self._thread = threading.Thread(target=self._run, name="opsbot-dispatcher", daemon=True)
        self._started = False
        self._lock = threading.Lock()
        self._sender: Any = None

    def notify(self, key: str | None) -> None:
        with self._lock:
            if not self._started:
                self._started = True
                self._thread.start()
        self.keys.put(key)

    def _connection(self) -> tuple[Any, Any]:
        path = self.state.db_file
        if path and path != ":memory:":
            return open_db(path, migrate=False), threading.Lock()
        return self.state.db, self.state.lock  # in-memory: share, serialised

    def _run(self) -> None:
        db, lock = self._connection()
        while True:
            try:
                key = self.keys.get(timeout=IDLE_SWEEP)
            except queuelib.Empty:
                key = None
            self.idle.clear()
            try:
                with lock:
                    self.step(db, key)
            except Exception:  # noqa: BLE001 - the thread must survive anything
                log.exception("dispatcher step failed")
            if self.keys.empty():
                self.idle.set()

    def step(self, db: Any, key: str | None) -> None:
        s = self.state
        handlers.process_inbox(db, s.settings, s.feishu, s.clock, self.owner, key=key)
        if s.feishu is not None:
            if self._sender is None:
                from bot.feishu.sender import OutboxSender
                # messages only: Bitable writes stay with the worker (one writer per table)
                self._sender = OutboxSender(db, s.feishu, clock=s.clock, owner=self.owner,
                                            kinds=("send", "reply", "patch"),
                                            lang=s.settings.language)
            self._sender.deliver_due()


def create_app(settings: Settings | None = None, *, db: Any = None, feishu_client: Any = None,
               clock: Any = None, dispatch: bool = True) -> Flask:
    """Build the web app. Without ``settings`` they are read from ``os.environ`` (entry point).

    ``dispatch=False`` leaves recorded messages in the inbox (tests drive ``process_inbox``).
    """
    if settings is None:  # the gunicorn entry point: configure the process once
        from bot.logs import register_settings_secrets, setup_logging

        setup_logging(os.environ.get("OPSBOT_LOG_LEVEL", "INFO"))
        settings = load_settings(os.environ)
        register_settings_secrets(settings)
    state = AppState(settings, db=db, feishu_client=feishu_client, clock=clock)
    app = Flask("opsbot")
    app.extensions["opsbot"] = state
    json_errors(app)

    def handle(req):
        from bot.metrics import WEBHOOK_LATENCY, WEBHOOK_REQUESTS

        started = time.perf_counter()
        status = 500
        try:
            outcome = state.intake().handle(req)
            status = outcome.response.status
            return outcome
        finally:
            WEBHOOK_LATENCY.observe(time.perf_counter() - started)
            WEBHOOK_REQUESTS.labels(status=str(status)).inc()

    dispatch = dispatch and settings.web_dispatch
    if dispatch and settings.feishu.configured:
        # Import lark-oapi (seconds of CPU) while the process boots, not on the first message
        # while requests are being served.
        from bot.feishu import client as feishu  # noqa: F401

    def on_recorded(key: str) -> None:
        if dispatch:
            state.dispatcher().notify(key)

    view = webhook_view(handle, settings.max_body_bytes, on_recorded)
    app.add_url_rule("/webhook/event", "webhook_event", view, methods=["POST"])
    app.add_url_rule("/webhook/card", "webhook_card", view, methods=["POST"])

    @app.get("/healthz")
    def healthz():
        """Liveness with a DB round trip."""
        try:
            with state.lock:
                ping(state.db)
        except Exception as exc:  # noqa: BLE001
            resp = jsonify({"ok": False, "error": type(exc).__name__})
            resp.status_code = 503
            return resp
        return jsonify({"ok": True})

    @app.get("/metrics")
    def metrics():
        """Prometheus text: the full set from ``bot.metrics``."""
        db, lock = state.metrics_connection()
        with lock:  # not the request lock: a scrape never holds up a webhook answer
            text = render_metrics(db, totals=state.attempt_totals())
        return FlaskResponse(text, mimetype="text/plain; version=0.0.4")

    return app

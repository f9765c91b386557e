"""gunicorn settings of the web process (the Procfile passes ``-c python:bot.web.gunicorn_conf``).

Its job is the log: gunicorn's own lines, the access log (one line per request, on stdout) and
its error log (boot, worker exits, timeouts, on stderr), come out as the same JSON lines as
opsbot's (:class:`bot.logs.JsonFormatter`, secrets redacted), so one log pipeline reads all of
them. An access line carries ``method``, ``path`` (no query string), ``status``,
``duration_ms``, ``response_bytes``, ``remote_addr`` and ``user_agent``.

And metrics that add up across web workers: see :mod:`bot.web.gunicorn_metrics` (its hooks are this
config's ``on_starting``, ``child_exit`` and ``on_exit``).
"""
from __future__ import annotations

import os

from bot.web import gunicorn_metrics

# first, before any worker is forked (and before anything imports prometheus_client), so every
# worker writes its samples in multiprocess mode
gunicorn_metrics.configure(os.environ)

from gunicorn import glogging  # noqa: E402

from bot.web.gunicorn_metrics import child_exit, on_exit, on_starting  # noqa: E402,F401 - hooks
from bot.logs import JsonFormatter  # noqa: E402

accesslog = "-"


class JsonLogger(glogging.Logger):
    """gunicorn's logger with JSON lines for both of its logs."""

    def setup(self, cfg) -> None:
        super().setup(cfg)
        for log in (self.error_log, self.access_log):
            for handler in log.handlers:
                handler.setFormatter(JsonFormatter())

    def access(self, resp, req, environ, request_time) -> None:
        if not getattr(self, "access_log_enabled", bool(self.cfg.accesslog)):
            return
        status = str(resp.status or "").split(None, 1)[0]
        try:
            self.access_log.info("%s %s %s", req.method, req.path, status, extra={
                "method": req.method, "path": req.path,
                "status": int(status) if status.isdigit() else status,
                "duration_ms": round(request_time.total_seconds() * 1000, 3),
                "response_bytes": getattr(resp, "sent", None),
                "remote_addr": environ.get("REMOTE_ADDR"),
                "user_agent": environ.get("HTTP_USER_AGENT"),
            })
        except Exception:  # noqa: BLE001 - a log line must never break a response
            self.exception("access log line failed")


logger_class = JsonLogger

"""Coze OpenAPI client (aiohttp): submit a workflow run, poll its status.

This module is the one boundary where ``aiohttp`` / ``asyncio`` errors become
:mod:`pipeline.errors` exceptions. Decisions taken here:

* every call first takes a token from the shared :class:`~pipeline.ratelimit.RateLimiter`
  (submits and polls spend one budget); a 429, or Coze code 4009 / 4020, makes the limiter pause
  every caller for the Retry-After and slow down;
* ``poll`` returns a ``Fail`` status instead of raising (``status.as_error()`` gives the
  :class:`~pipeline.errors.RunFailed`); every other failure raises a
  :class:`~pipeline.errors.CozeError`;
* payloads are parsed leniently: an empty ``data`` list means Coze has no history for the run yet
  (it lags right after submit), so it is reported as ``Running`` and the caller's run timeout
  bounds it; an unknown ``execute_status`` is treated as ``Running`` and logged; ``error_code``
  may be missing, ``null`` or a number; ``output`` is kept as the JSON string Coze sends (an
  object is serialised); ``create_time`` / ``update_time`` (the run's start and, once it ended,
  its end, in Unix seconds) are exposed as floats, None when missing or not a number;
* the API token never appears in an error message or a log line.
"""
from __future__ import annotations

import asyncio
import dataclasses
import email.utils
import json
import logging
import time
from dataclasses import dataclass
from typing import Any

import aiohttp

from .errors import CozeError, CozeNetworkError, RunFailed, node_from_message, redact
from .ratelimit import RateLimiter

__all__ = ["CozeClient", "SubmitResult", "RunStatus", "DEFAULT_BASE_URL"]

log = logging.getLogger(__name__)

DEFAULT_BASE_URL = "https://api.coze.cn"
_SLOW_DOWN_CODES = ("4009", "4020")   # system limit, RPM over quota: the whole account backs off
_STATUS_NAMES = {"running": "Running", "success": "Success", "succeeded": "Success",
                 "fail": "Fail", "failed": "Fail"}


@dataclass(frozen=True)
class SubmitResult:
    execute_id: str
    debug_url: str | None = None
    log_id: str | None = None


@dataclass(frozen=True)
class RunStatus:
    """One poll's answer. ``status`` is ``Running``, ``Success`` or ``Fail``."""

    status: str
    output: str | None = None       # the workflow's output, a JSON string
    error_code: str = ""
    error_message: str = ""
    debug_url: str | None = None
    log_id: str | None = None
    node: str | None = None         # failing node, when the error message names it
    execute_id: str = ""
    create_time: float | None = None  # Coze's start of the run, Unix seconds (None: not given)
    update_time: float | None = None  # for an ended run, its end (whole seconds, like create_time)

    @property
    def done(self) -> bool:
        return self.status != "Running"

    def as_error(self) -> RunFailed:
        """The :class:`RunFailed` for a ``Fail`` status (call it only for one)."""
        return RunFailed(self.error_code, self.error_message or "workflow run failed",
                         log_id=self.log_id, node=self.node, debug_url=self.debug_url)

    def output_data(self) -> Any:
        """``output`` decoded from JSON (the raw string when it is not JSON; None when empty)."""
        if not self.output:
            return None
        try:
            return json.loads(self.output)
        except ValueError:
            return self.output


class CozeClient:
    """Async client for the Coze workflow API; use as ``async with CozeClient(...) as coze:``."""

    def __init__(self, base_url: str, token: str, *, limiter: RateLimiter | None = None,
                 session: aiohttp.ClientSession | None = None, timeout: float = 30.0) -> None:
        self.base_url = (base_url or DEFAULT_BASE_URL).rstrip("/")
        self._token = token
        self.limiter = limiter
        self._session = session
        self._own_session = session is None
        self._timeout = aiohttp.ClientTimeout(total=timeout)

    async def __aenter__(self) -> "CozeClient":
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the HTTP session if this client created it."""
        if self._own_session and self._session is not None and not self._session.closed:
            await self._session.close()
        self._session = None if self._own_session else self._session

    async def submit(self, workflow_id: str, parameters: dict) -> SubmitResult:
        """Start an asynchronous run; raises :class:`CozeError` when Coze refuses it."""
        body = {"workflow_id": workflow_id, "parameters": parameters, "is_async": True}
        data, log_id = await self._call("POST", "/v1/workflow/run", body)
        execute_id = data.get("execute_id")
        if execute_id in (None, ""):
            raise CozeError("bad_response", "run answer carries no execute_id",
                            http_status=200, log_id=log_id)
        return SubmitResult(str(execute_id), data.get("debug_url") or None, log_id)

    async def poll(self, workflow_id: str, execute_id: str) -> RunStatus:
        """The run's current status; a ``Fail`` run is returned, not raised."""
        path = f"/v1/workflows/{workflow_id}/run_histories/{execute_id}"
        data, log_id = await self._call("GET", path, None)
        status = _parse_history(data, log_id, execute_id)
        if self._token and self._token in status.error_message:  # a workflow quoting its caller
            status = dataclasses.replace(
                status, error_message=redact(status.error_message, self._token))
        return status

    # -- transport --------------------------------------------------------------------------

    def _session_for_call(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            if not self._own_session:
                raise CozeError("closed", "the injected HTTP session is closed")
            self._session = aiohttp.ClientSession(timeout=self._timeout)
        return self._session

    async def _call(self, method: str, path: str, body: dict | None) -> tuple[dict, str | None]:
        """One request: limiter, send, translate errors. Returns (decoded body, log id)."""
        if self.limiter is not None:
            await self.limiter.acquire()
        headers = {"Authorization": f"Bearer {self._token}", "Accept": "application/json"}
        try:
            async with self._session_for_call().request(
                    method, self.base_url + path, json=body, headers=headers,
                    timeout=self._timeout) as resp:
                raw = await resp.read()
                return self._check(resp.status, resp.headers, raw, path)
        except CozeError:
            raise
        except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as exc:
            # refused, DNS, connect timeout: the request never left this machine
            text = redact(f"{type(exc).__name__}: {exc}", self._token)
            raise CozeNetworkError(f"{text} ({method} {path})", sent=False) from exc
        except asyncio.TimeoutError as exc:
            raise CozeNetworkError(f"no answer in {self._timeout.total}s: {method} {path}") from exc
        except (aiohttp.ClientError, OSError) as exc:
            text = redact(f"{type(exc).__name__}: {exc}", self._token)
            raise CozeNetworkError(f"{text} ({method} {path})") from exc

    def _check(self, status: int, headers: Any, raw: bytes, path: str) -> tuple[dict, str | None]:
        body = _decode(raw)
        log_id = headers.get("X-Tt-Logid") or _body_logid(body)
        retry_after = _retry_after(headers)
        code = body.get("code") if isinstance(body, dict) else None
        if status < 400 and isinstance(body, dict) and code in (0, "0", None):
            if code is None and "execute_id" not in body and "data" not in body:
                raise CozeError("bad_response", f"unexpected answer from {path}",
                                http_status=status, log_id=log_id)
            return body, log_id
        if status < 400 and not isinstance(body, dict):
            raise CozeError("bad_response", f"answer from {path} is not a JSON object",
                            http_status=status, log_id=log_id)
        err_code = str(code) if code not in (None, 0, "0", "") else f"http_{status}"
        message = (body.get("msg") if isinstance(body, dict) else None) or _snippet(raw, status)
        if status == 429 or err_code in _SLOW_DOWN_CODES:
            if self.limiter is not None:
                self.limiter.slow_down(retry_after if retry_after is not None else 1.0)
        raise CozeError(err_code, redact(str(message), self._token), http_status=status,
                        log_id=log_id, retry_after=retry_after)


def _parse_history(body: dict, log_id: str | None, execute_id: str) -> RunStatus:
    data = body.get("data")
    if isinstance(data, str):
        data = _decode(data.encode())
    if isinstance(data, list):
        data = data[0] if data else None
    if not isinstance(data, dict):
        log.debug("coze: no run history yet for %s; reporting Running", execute_id)
        return RunStatus("Running", log_id=log_id, execute_id=execute_id)
    raw_status = str(data.get("execute_status") or "")
    status = _STATUS_NAMES.get(raw_status.lower())
    if status is None:
        log.warning("coze: unknown execute_status %r for %s; treating as Running",
                    raw_status, execute_id)
        status = "Running"
    output = data.get("output")
    if output is not None and not isinstance(output, str):
        output = json.dumps(output, ensure_ascii=False)
    error_code = data.get("error_code")
    error_code = "" if error_code in (None, 0, "0") else str(error_code)
    message = str(data.get("error_message") or "")
    return RunStatus(status=status, output=output or None, error_code=error_code,
                     error_message=message, debug_url=data.get("debug_url") or None,
                     log_id=log_id or data.get("logid"), node=node_from_message(message),
                     execute_id=str(data.get("execute_id") or execute_id),
                     create_time=_unix_seconds(data.get("create_time")),
                     update_time=_unix_seconds(data.get("update_time")))


def _unix_seconds(value: Any) -> float | None:
    """A Coze timestamp (seconds, as a number or a string) as float seconds; None when absent
    or unusable. Milliseconds or microseconds (some gateways) are recognised by their size."""
    if isinstance(value, bool) or value in (None, ""):
        return None
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        return None
    if not (seconds > 0 and seconds == seconds and seconds != float("inf")):
        return None
    while seconds > 1e11:   # milliseconds, microseconds: seconds stay below 1e11 until 5138
        seconds /= 1000.0
    return seconds


def _decode(raw: bytes) -> Any:
    try:
        return json.loads(raw.decode("utf-8", "replace")) if raw else None
    except ValueError:
        return None


def _body_logid(body: Any) -> str | None:
    if isinstance(body, dict) and isinstance(body.get("detail"), dict):
        return body["detail"].get("logid") or None
    return None


def _snippet(raw: bytes, status: int) -> str:
    text = raw.decode("utf-8", "replace").strip()[:200]
    return text or f"HTTP {status}"


def _retry_after(headers: Any) -> float | None:
    """Seconds to wait from ``Retry-After`` (seconds or HTTP date) or ``x-ratelimit-reset``."""
    value = headers.get("Retry-After")
    if value:
        try:
            return max(0.0, float(value))
        except ValueError:
            try:
                when = email.utils.parsedate_to_datetime(value)
                return max(0.0, when.timestamp() - time.time())
            except (TypeError, ValueError):
                pass
    value = headers.get("x-ratelimit-reset")
    if value:
        try:
            seconds = float(value)
        except ValueError:
            return None
        # Some gateways send an epoch timestamp rather than a delay.
        return max(0.0, seconds - time.time()) if seconds > 1e9 else max(0.0, seconds)
    return None

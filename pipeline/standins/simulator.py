"""A Coze OpenAPI simulator on loopback: real HTTP, scripted outcomes, recorded traffic.

Serves ``POST /v1/workflow/run`` (async runs) and
``GET /v1/workflows/{workflow_id}/run_histories/{execute_id}`` with real-looking payloads
(numeric execute ids, ``debug_url``, ``X-Tt-Logid`` header, ``output`` as a JSON string), plus
two helper endpoints for out-of-process tests: ``GET /_sim/stats`` and ``POST /_sim/script``,
and the generated images, audio and clips a video workflow's output links to
(``GET /_sim/assets/{name}``, see :mod:`pipeline.standins.sim_assets`).

A run's outcome is scripted per task (the task key is ``parameters["task_id"]``, else a counter)
with :class:`Script`. A run ends once ``clock.now() >= submitted + duration``; share a
:class:`~pipeline.clock.FakeClock` with the code under test and nothing waits.

Faults injected on submit, per task, happen in this order: dropped connections, HTTP 429 (with
Retry-After), HTTP 500, then ``code_on_submit``; a submit that gets past them creates its run, and
``drop_answer_first_n`` then drops the connection instead of answering (the run still goes on,
like a Coze answer lost on the way back). Globally: :meth:`CozeSimulator.set_token_valid`,
:meth:`CozeSimulator.set_down` (every connection is dropped), :meth:`CozeSimulator.storm_429`.

Accounts: every API token is one Coze account (:class:`Account`) with its own limits, none by
default. The simulator starts with one account, ``token``; :meth:`CozeSimulator.add_account` adds
more (or changes one's limits). A request with any other token answers HTTP 401, code 4100
(Coze's "authentication is invalid"). Past an account's ``qps`` (its requests, run and
run_histories together, in any second of clock time) a request answers HTTP 429, code 4020
(Coze's "RPM over quota") without Retry-After, before it reaches a task. A submit that would
exceed its ``max_runs`` (runs created and not yet ended) answers code 4009 (Coze's "system
request limit reached, retry later": Coze documents no code of its own for too many runs at
once), after the scripted faults, and creates nothing. A run is polled only with the token
that created it: another account's token answers code 4101 (no permission). What each account
did is recorded (:class:`AccountStats`): requests, runs, the most runs it had in flight at once,
the most requests in any 1 s window, and its refusals.

Run it as a process::

    python -m pipeline.standins.simulator --port 0 --script FILE.json \
        [--max-runs N] [--qps Q] [--account TOKEN:MAX_RUNS:QPS ...]

prints ``listening http://127.0.0.1:PORT`` as its first stdout line. The script file is
``{"default_duration": 1.0, "token": "...", "default": {Script fields}, "tasks": {"t1": {...}},
"accounts": {"TOKEN": {"max_runs": 4, "qps": 10}}}``.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import signal
import socket
import sys
import threading
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Callable

from aiohttp import web

from pipeline.clock import Clock
from pipeline.standins.sim_assets import AssetServer

__all__ = ["CozeSimulator", "Script", "TaskStats", "RequestRecord", "Account", "AccountStats"]

#: Coze's codes for what an account's limits refuse (see the module docstring)
CODE_AUTH = 4100          # HTTP 401: the token is no account's
CODE_NO_PERMISSION = 4101  # a run polled with another account's token
CODE_QPS = 4020           # HTTP 429: the account's requests per second are spent
CODE_RUN_LIMIT = 4009     # the account already has max_runs runs in flight

# the token of an accepted request, kept on the request (web.RequestKey from aiohttp 3.12 on)
_ACCOUNT = web.RequestKey("account", str) if hasattr(web, "RequestKey") else "account"


@dataclass
class Script:
    """How the simulator treats one task's runs. Durations in seconds."""

    duration: float | None = None          # None: the simulator's default_duration
    outcome: str = "Success"                # "Success" | "Fail"
    error_code: str = "720701002"           # for Fail runs
    error_message: str = "Access plugin server url timed out"
    node: str = ""                          # named in the failure message when set
    output: dict | None = None              # Success output (default: {"output": "result <task>"})
    fail_first_n_runs: int = 0              # the first N runs Fail, later ones Succeed
    http_429_first_n: int = 0
    retry_after: float = 1.0                # Retry-After seconds on scripted 429s
    http_500_first_n: int = 0
    drop_connection_first_n: int = 0
    code_on_submit: int | str | None = None  # e.g. 4100, 4000: submit answers this Coze code
    code_on_submit_first_n: int | None = None  # None: every submit; N: the first N after faults
    poll_500_first_n: int = 0               # the first N polls of the task answer HTTP 500
    drop_answer_first_n: int = 0            # the first N runs are created, then the connection
                                            # drops before the answer (the run goes on)
    submit_delay: float = 0.0               # real seconds between creating a run and answering

    @classmethod
    def from_dict(cls, data: dict) -> "Script":
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown Script fields: {sorted(unknown)}")
        return cls(**data)


@dataclass
class Account:
    """One Coze account's limits (None: no limit)."""

    max_runs: int | None = None   # runs in flight at once
    qps: float | None = None      # requests (run and run_histories together) per second

    def __post_init__(self) -> None:
        if self.max_runs is not None and (isinstance(self.max_runs, bool) or
                                          not isinstance(self.max_runs, int) or self.max_runs < 1):
            raise ValueError(f"max_runs must be a whole number >= 1, not {self.max_runs!r}")
        if self.qps is not None and (isinstance(self.qps, bool) or
                                     not isinstance(self.qps, (int, float)) or not self.qps > 0):
            raise ValueError(f"qps must be a number > 0, not {self.qps!r}")

    @classmethod
    def from_dict(cls, data: dict) -> "Account":
        unknown = set(data) - {"max_runs", "qps"}
        if unknown:
            raise ValueError(f"unknown Account fields: {sorted(unknown)}")
        return cls(**data)

    @classmethod
    def parse(cls, text: str) -> tuple[str, "Account"]:
        """``TOKEN[:MAX_RUNS[:QPS]]`` (an empty part: no limit) -> (token, account)."""
        token, _, rest = text.partition(":")
        runs, _, qps = rest.partition(":")
        if not token:
            raise ValueError(f"no token in {text!r}")
        try:
            return token, cls(int(runs) if runs else None, float(qps) if qps else None)
        except ValueError as exc:
            raise ValueError(f"bad account {text!r}: {exc}") from None


@dataclass
class AccountStats:
    """What one account did. ``times``: clock time of each request it sent, refused ones too."""

    requests: int = 0           # every request with this token, refused ones included
    submits: int = 0            # run requests that got past the QPS check
    polls: int = 0              # run_histories requests that got past the QPS check
    runs: int = 0               # runs created
    max_concurrent: int = 0     # the most of its runs in flight at once
    refused_qps: int = 0        # answered HTTP 429 / 4020
    refused_run_limit: int = 0  # answered 4009
    refused_permission: int = 0  # polls of another account's run, answered 4101
    workflows: dict = field(default_factory=dict)   # workflow id -> runs created
    times: list = field(default_factory=list)

    def max_rps(self, window: float = 1.0) -> int:
        """The most requests this account sent in any ``window`` seconds of clock time."""
        return max_in_window(self.times, window)

    def as_dict(self) -> dict:
        data = asdict(self)
        del data["times"]
        return {**data, "max_rps": self.max_rps()}


@dataclass
class TaskStats:
    submits: int = 0            # submit calls, faulted ones included
    runs: list = field(default_factory=list)   # execute ids, in order
    polls: int = 0
    late_polls: int = 0         # polls of a run that had already ended


@dataclass(frozen=True)
class RequestRecord:
    method: str
    path: str
    time: float
    status: int


@dataclass
class _Run:
    execute_id: str
    task: str
    workflow_id: str
    submitted: float
    duration: float
    outcome: str
    script: Script
    seen_final: bool = False
    account: str = ""

    def ended(self, now: float) -> bool:
        return now >= self.submitted + self.duration


class CozeSimulator:
    """The simulator; see the module docstring. Counters are plain attributes."""

    def __init__(self, *, clock: Clock | None = None, token: str = "sim-token",
                 workflow_id: str | None = None,
                 default_duration: float | Callable[[str], float] = 1.0, seed: int = 0,
                 host: str = "127.0.0.1", max_runs: int | None = None,
                 qps: float | None = None) -> None:
        """``token`` is the first account's, with ``max_runs`` and ``qps`` as its limits."""
        self.clock = clock or Clock()
        self._token = token
        self.accounts: dict[str, Account] = {token: Account(max_runs, qps)}
        self.workflow_id = workflow_id
        self.default_duration = default_duration
        self.default_script = Script()
        self.host = host
        self._rng = random.Random(seed)
        self._scripts: dict[str, Script] = {}
        self._lock = threading.Lock()
        self.reset()
        self._token_valid = True
        self._down = False
        self.assets = AssetServer()  # media for video outputs: pipeline/standins/sim_assets.py
        self._storm_until = 0.0
        self._storm_retry_after = 1.0
        self._runner: web.AppRunner | None = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.base_url = ""

    # -- scripting ------------------------------------------------------------------------

    def script(self, task_key: str, script: Script | None = None, **kwargs: Any) -> None:
        """Script ``task_key``'s runs: ``sim.script("t1", Script(outcome="Fail"))`` or kwargs."""
        self._scripts[str(task_key)] = script or Script(**kwargs)

    @property
    def token(self) -> str:
        """The first account's token; setting it gives that account (and its limits) a new one."""
        return self._token

    @token.setter
    def token(self, value: str) -> None:
        if value != self._token:
            self.accounts[value] = self.accounts.pop(self._token)
            if self._token in self.account_stats:
                self.account_stats[value] = self.account_stats.pop(self._token)
            self._token = value

    def add_account(self, token: str, max_runs: int | None = None,
                    qps: float | None = None) -> None:
        """Add an account (its API token) with its limits, or set a known one's limits."""
        if not token:
            raise ValueError("an account needs a token")
        self.accounts[str(token)] = Account(max_runs, qps)

    def reset(self) -> None:
        """Forget runs and counters (scripts and accounts stay)."""
        self.runs: dict[str, _Run] = {}
        self.tasks: dict[str, TaskStats] = {}
        self.requests: list[RequestRecord] = []
        self.account_stats: dict[str, AccountStats] = {}
        self.unknown_token_requests = 0
        self._accepted: dict[str, list[float]] = {}   # per account: recent accepted request times
        self.polls_after_final: dict[str, int] = {}
        self.peak_in_flight = 0
        self._counter = 0
        self._next_id = 7_431_040_978_805_850_000 + self._rng.randrange(10_000) * 1000

    def set_token_valid(self, valid: bool) -> None:
        self._token_valid = valid

    def set_down(self, down: bool) -> None:
        """While down, every connection is closed without an answer."""
        self._down = down

    def storm_429(self, seconds: float, retry_after: float = 1.0) -> None:
        """Every request answers HTTP 429 for the next ``seconds`` of clock time."""
        self._storm_until = self.clock.now() + seconds
        self._storm_retry_after = retry_after

    # -- records --------------------------------------------------------------------------

    @property
    def total_requests(self) -> int:
        return len(self.requests)

    def task(self, task_key: str) -> TaskStats:
        """Counters of one task (zeros for a task never seen)."""
        return self.tasks.get(str(task_key), TaskStats())

    def in_flight(self) -> int:
        """Runs submitted and not yet ended at the current clock time."""
        now = self.clock.now()
        return sum(1 for run in self.runs.values() if not run.ended(now))

    def max_rps(self, window: float = 1.0) -> int:
        """The most requests seen in any ``window`` seconds of clock time."""
        return max_in_window([r.time for r in self.requests], window)

    def account(self, token: str) -> AccountStats:
        """What the account of ``token`` did (zeros for one never seen)."""
        return self.account_stats.get(str(token), AccountStats())

    def account_in_flight(self, token: str) -> int:
        """The account's runs submitted and not yet ended at the current clock time."""
        now = self.clock.now()
        return sum(1 for run in self.runs.values() if run.account == token and not run.ended(now))

    def stats(self) -> dict:
        """Everything recorded, as JSON-able data."""
        return {
            "total_requests": self.total_requests,
            "peak_in_flight": self.peak_in_flight,
            "max_rps": self.max_rps(),
            "tasks": {k: asdict(v) for k, v in self.tasks.items()},
            "polls_after_final": dict(self.polls_after_final),
            "accounts": {token: {**asdict(self.accounts[token]),
                                 **self.account(token).as_dict()} for token in self.accounts},
            "unknown_token_requests": self.unknown_token_requests,
            "runs": {eid: {"task": r.task, "outcome": r.outcome, "submitted": r.submitted,
                           "duration": r.duration} for eid, r in self.runs.items()},
        }

    # -- HTTP -----------------------------------------------------------------------------

    def make_app(self) -> web.Application:
        app = web.Application(middlewares=[self._record])
        app.router.add_post("/v1/workflow/run", self._handle_run)
        app.router.add_get("/v1/workflows/{workflow_id}/run_histories/{execute_id}",
                           self._handle_history)
        app.router.add_get("/_sim/stats", self._handle_stats)
        app.router.add_post("/_sim/script", self._handle_script)
        self.assets.add_routes(app)  # GET /_sim/assets/{name}
        return app

    @web.middleware
    async def _record(self, request: web.Request, handler: Callable) -> web.StreamResponse:
        if request.path.startswith("/_sim/"):
            return await handler(request)
        if self._down:
            return self._drop(request)
        status = 200
        try:
            token = _bearer(request.headers.get("Authorization", ""))
            if self.clock.now() < self._storm_until:
                response = self._error(429, 4020, "rate limited",
                                       retry_after=self._storm_retry_after)
            elif not self._token_valid or token not in self.accounts:
                self.unknown_token_requests += token not in self.accounts
                response = self._error(401, CODE_AUTH, "authentication is invalid")
            elif not self._within_qps(token):
                response = self._error(429, CODE_QPS,
                                       "rate limited: requests per second over the quota")
            else:
                request[_ACCOUNT] = token
                response = await handler(request)
            status = response.status
            return response
        finally:
            self.requests.append(RequestRecord(request.method, request.path,
                                               self.clock.now(), status))

    def _within_qps(self, token: str) -> bool:
        """Record a request of ``token``'s account; False when its QPS quota is spent."""
        now = self.clock.now()
        stats = self.account_stats.setdefault(token, AccountStats())
        stats.requests += 1
        stats.times.append(now)
        qps = self.accounts[token].qps
        if qps is None:
            return True
        recent = [t for t in self._accepted.get(token, ()) if now - t < 1.0]
        if len(recent) + 1 > qps:
            self._accepted[token] = recent
            stats.refused_qps += 1
            return False
        recent.append(now)
        self._accepted[token] = recent
        return True

    def _drop(self, request: web.Request) -> web.Response:
        if request.transport is not None:
            request.transport.abort()
        return web.Response(status=599)

    def _logid(self) -> str:
        return "2025" + "".join(self._rng.choice("0123456789ABCDEF") for _ in range(28))

    def _json(self, body: dict, status: int = 200, headers: dict | None = None) -> web.Response:
        logid = self._logid()
        body = {**body, "detail": {"logid": logid}}
        return web.json_response(body, status=status,
                                 headers={"X-Tt-Logid": logid, **(headers or {})})

    def _error(self, status: int, code: int, msg: str,
               retry_after: float | None = None) -> web.Response:
        headers = {"Retry-After": _fmt(retry_after)} if retry_after is not None else None
        return self._json({"code": code, "msg": msg}, status=status, headers=headers)

    async def _handle_run(self, request: web.Request) -> web.Response:
        self.account_stats[request[_ACCOUNT]].submits += 1
        try:
            body = await request.json()
        except ValueError:
            return self._error(400, 4000, "request body is not valid JSON")
        params = body.get("parameters") if isinstance(body, dict) else None
        workflow_id = str(body.get("workflow_id") or "") if isinstance(body, dict) else ""
        if not workflow_id or not isinstance(params, dict):
            return self._error(200, 4000, "invalid parameter: workflow_id and parameters needed")
        if self.workflow_id is not None and workflow_id != self.workflow_id:
            return self._error(200, 4200, "workflow not found or not published")
        with self._lock:
            response = self._submit(request, workflow_id, params)
        task = str(params.get("task_id") or "")
        delay = self._scripts.get(task, self.default_script).submit_delay
        if delay > 0:
            await asyncio.sleep(delay)
        return response

    def _submit(self, request: web.Request, workflow_id: str, params: dict) -> web.Response:
        self._counter += 1
        task = str(params.get("task_id") or f"task-{self._counter}")
        script = self._scripts.get(task, self.default_script)
        stats = self.tasks.setdefault(task, TaskStats())
        stats.submits += 1
        n = stats.submits
        for limit, fault in ((script.drop_connection_first_n, "drop"),
                             (script.http_429_first_n, "429"), (script.http_500_first_n, "500")):
            if n <= limit:
                if fault == "drop":
                    return self._drop(request)
                if fault == "429":
                    return self._error(429, 4020, "rate limited: requests per minute over quota",
                                       retry_after=script.retry_after)
                return self._error(500, 5000, "internal server error")
            n -= limit
        if script.code_on_submit is not None and (
                script.code_on_submit_first_n is None or n <= script.code_on_submit_first_n):
            return self._error(200, int(script.code_on_submit), _CODE_MESSAGES.get(
                str(script.code_on_submit), "request refused"))
        account = request[_ACCOUNT]
        limit = self.accounts[account].max_runs
        if limit is not None and self.account_in_flight(account) >= limit:
            self.account_stats[account].refused_run_limit += 1
            return self._error(200, CODE_RUN_LIMIT, _CODE_MESSAGES["4009"])
        answer = self._start_run(task, workflow_id, script, stats, account)
        if len(stats.runs) <= script.drop_answer_first_n:
            return self._drop(request)
        return answer

    def _start_run(self, task: str, workflow_id: str, script: Script,
                   stats: TaskStats, account: str) -> web.Response:
        self._next_id += self._rng.randrange(1, 997)
        execute_id = str(self._next_id)
        failed = len(stats.runs) < script.fail_first_n_runs or (
            script.outcome == "Fail" and len(stats.runs) >= script.fail_first_n_runs)
        now = self.clock.now()
        run = _Run(execute_id, task, workflow_id, now, self._duration(task, script),
                   "Fail" if failed else "Success", script, account=account)
        self.runs[execute_id] = run
        stats.runs.append(execute_id)
        self.peak_in_flight = max(self.peak_in_flight, self.in_flight())
        account_stats = self.account_stats[account]
        account_stats.runs += 1
        account_stats.workflows[workflow_id] = account_stats.workflows.get(workflow_id, 0) + 1
        account_stats.max_concurrent = max(account_stats.max_concurrent,
                                           self.account_in_flight(account))
        return self._json({"code": 0, "msg": "", "execute_id": execute_id,
                           "debug_url": _debug_url(execute_id, workflow_id)})

    def _duration(self, task: str, script: Script) -> float:
        if script.duration is not None:
            return float(script.duration)
        if callable(self.default_duration):
            return float(self.default_duration(task))
        return float(self.default_duration)

    async def _handle_history(self, request: web.Request) -> web.Response:
        with self._lock:
            account = request[_ACCOUNT]
            self.account_stats[account].polls += 1
            return self._history(request.match_info["workflow_id"],
                                 request.match_info["execute_id"], account)

    def _history(self, workflow_id: str, execute_id: str, account: str) -> web.Response:
        run = self.runs.get(execute_id)
        if run is None or run.workflow_id != workflow_id:
            return self._error(200, 4314, "execute history not found")
        if run.account != account:
            self.account_stats[account].refused_permission += 1
            return self._error(200, CODE_NO_PERMISSION, _CODE_MESSAGES["4101"])
        stats = self.tasks[run.task]
        stats.polls += 1
        if stats.polls <= run.script.poll_500_first_n:
            return self._error(500, 5000, "internal server error")
        now = self.clock.now()
        if run.ended(now):
            stats.late_polls += 1
            if run.seen_final:
                self.polls_after_final[execute_id] = self.polls_after_final.get(execute_id, 0) + 1
            run.seen_final = True
        return self._json({"code": 0, "msg": "", "data": [self._history_item(run, now)]})

    def _history_item(self, run: _Run, now: float) -> dict:
        status = run.outcome if run.ended(now) else "Running"
        # Like Coze: whole Unix seconds; an ended run's update_time is its end, not the poll's
        # time, so a client can learn the exact run time (to the second) from one answer.
        updated = run.submitted + run.duration if status != "Running" else now
        item = {"execute_id": run.execute_id, "execute_status": status,
                "create_time": int(run.submitted), "update_time": int(updated),
                "debug_url": _debug_url(run.execute_id, run.workflow_id), "logid": self._logid(),
                "error_code": "", "error_message": "", "output": "", "run_mode": 0,
                "usage": {"input_count": 50, "token_count": 150, "output_count": 100}}
        if status == "Success":
            output = run.script.output or {"output": f"result {run.task}"}
            item["output"] = json.dumps(output, ensure_ascii=False)
        elif status == "Fail":
            message = run.script.error_message
            if run.script.node:
                message = f'node "{run.script.node}" failed: {message}'
            item.update(error_code=str(run.script.error_code), error_message=message)
        return item

    async def _handle_stats(self, request: web.Request) -> web.Response:
        with self._lock:
            return web.json_response(self.stats())

    async def _handle_script(self, request: web.Request) -> web.Response:
        body = await request.json()
        try:
            for key, data in body.get("tasks", {}).items():
                self.script(key, Script.from_dict(data))
            for token, data in body.get("accounts", {}).items():
                self.add_account(token, **asdict(Account.from_dict(data)))
        except (TypeError, ValueError) as exc:
            return web.json_response({"error": str(exc)}, status=400)
        return web.json_response({"ok": True})

    # -- lifecycle ------------------------------------------------------------------------

    async def start(self, port: int = 0) -> str:
        """Serve in the running event loop; returns the base URL."""
        self._runner = web.AppRunner(self.make_app(), access_log=None)
        await self._runner.setup()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, port))
        site = web.SockSite(self._runner, sock)
        await site.start()
        self.port = sock.getsockname()[1]
        self.base_url = f"http://{self.host}:{self.port}"
        return self.base_url

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def start_in_thread(self, port: int = 0) -> str:
        """Serve from a background thread with its own event loop; returns the base URL."""
        ready = threading.Event()
        failure: list[BaseException] = []

        def serve() -> None:
            self._loop = asyncio.new_event_loop()
            try:
                self._loop.run_until_complete(self.start(port))
            except BaseException as exc:  # reported to the caller below
                failure.append(exc)
                ready.set()
                return
            ready.set()
            self._loop.run_forever()
            self._loop.run_until_complete(self.stop())
            self._loop.close()

        self._thread = threading.Thread(target=serve, name="coze-simulator", daemon=True)
        self._thread.start()
        ready.wait(10)
        if failure:
            raise failure[0]
        return self.base_url

    def stop_thread(self) -> None:
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            self._thread = None
            self._loop = None


_CODE_MESSAGES = {
    "4000": "invalid parameter", "4008": "daily limit reached",
    "4009": "system request limit reached, retry later",
    "4011": "insufficient balance", "4013": "model rate limit", "4019": "account in arrears",
    "4020": "RPM over quota", "4100": "authentication is invalid", "4101": "permission denied",
    "4200": "workflow not found or not published", "5000": "internal server error",
    "6003": "async run is not allowed on this plan",
}


def max_in_window(times: list[float], window: float) -> int:
    """The most of ``times`` that lie less than ``window`` apart."""
    times = sorted(times)
    best, lo = 0, 0
    for hi, t in enumerate(times):
        while t - times[lo] >= window:
            lo += 1
        best = max(best, hi - lo + 1)
    return best


def _bearer(header: str) -> str:
    return header[len("Bearer "):] if header.startswith("Bearer ") else ""


def _fmt(seconds: float) -> str:
    return str(int(seconds)) if float(seconds).is_integer() else f"{seconds:g}"


def _debug_url(execute_id: str, workflow_id: str) -> str:
    return (f"https://www.coze.cn/work_flow?execute_id={execute_id}"
            f"&workflow_id={workflow_id}&space_id=7431040978805850000")


def load_script_file(sim: CozeSimulator, path: str) -> None:
    """Apply a JSON script file (format in the module docstring) to ``sim``."""
    with open(path, encoding="utf-8") as fh:
        data = json.load(fh)
    if "token" in data:
        sim.token = str(data["token"])
    if "default_duration" in data:
        sim.default_duration = float(data["default_duration"])
    if "workflow_id" in data:
        sim.workflow_id = data["workflow_id"]
    if "default" in data:
        sim.default_script = Script.from_dict(data["default"])
    for key, item in data.get("tasks", {}).items():
        sim.script(key, Script.from_dict(item))
    for token, item in data.get("accounts", {}).items():
        sim.add_account(token, **asdict(Account.from_dict(item)))


async def _serve(args: argparse.Namespace) -> None:
    sim = CozeSimulator(token=args.token, default_duration=args.duration, seed=args.seed,
                        max_runs=args.max_runs, qps=args.qps)
    for token, account in args.account:
        sim.add_account(token, account.max_runs, account.qps)
    if args.script:
        load_script_file(sim, args.script)
    base_url = await sim.start(args.port)
    print(f"listening {base_url}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await sim.stop()


def _account_arg(text: str) -> tuple[str, Account]:
    try:
        return Account.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.standins.simulator",
                                     description="Coze OpenAPI simulator on loopback")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--script", help="JSON script file")
    parser.add_argument("--token", default="sim-token")
    parser.add_argument("--duration", type=float, default=1.0, help="default run seconds")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-runs", type=int, default=None,
                        help="runs in flight at once for --token's account (default: no limit)")
    parser.add_argument("--qps", type=float, default=None,
                        help="requests per second for --token's account (default: no limit)")
    parser.add_argument("--account", action="append", default=[], type=_account_arg,
                        metavar="TOKEN:MAX_RUNS:QPS",
                        help="another account (repeatable); an empty limit is no limit")
    args = parser.parse_args(argv)
    asyncio.run(_serve(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The ``opsbot worker`` process: pipeline worker + inbox fallback + outbox sender + scheduler.

Everything shares one SQLite file with the web process. The pipeline runs on the asyncio loop;
the Feishu side (inbox commands, outbox delivery, the scheduler) calls lark-oapi, which is
synchronous, so it runs in one background thread with its own DB connection. Both stop cleanly on
SIGTERM/SIGINT; whatever they held (leases) is handed back or expires, and the next worker resumes.

With ``FEISHU_CONNECTION=ws`` the worker also holds Feishu's long connection
(:class:`bot.feishu.longconn.LongConnection`, its own threads and event loop): messages it records wake
the Feishu thread, which answers them as it answers the web process's.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable

from pipeline.clock import Clock
from pipeline.coze import CozeClient
from pipeline.notify import Notifier
from pipeline.ratelimit import coze_limiter
from pipeline.worker import Worker, make_owner
from storage import inbox, outbox
from storage.db import open_db, prune

from bot.settings import Settings

log = logging.getLogger("opsbot.service")


def build_notifier(db, settings: Settings, clock: Clock, *,
                   submit: Callable[..., Any] | None = None) -> tuple[Notifier, Any]:
    """The pipeline's notifier (alert router + Bitable write-back) and the alert router.

    With ``submit`` (see :class:`NotifierThread`) each hook call is handed to it instead of
    running in the caller."""
    from bot.alerting.router import AlertRouter
    from bot.feishu.bitable_sync import BitableWriteBack

    router = AlertRouter(db, settings, clock)
    return FanOut([router, BitableWriteBack(db, settings, clock)], submit=submit), router


class FanOut:
    """Calls every notifier; one failing notifier never stops the others or the pipeline.

    With ``submit``, a hook call is queued (``submit(fn, *args)``) and the caller goes on; the
    task dicts passed along are copied first, as the worker keeps changing its own."""

    def __init__(self, notifiers: list[Any], *, submit: Callable[..., Any] | None = None) -> None:
        self.notifiers = notifiers
        self._submit = submit

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)

        def call(*args: Any, **kwargs: Any) -> None:
            if self._submit is None:
                self._call_all(name, args, kwargs)
                return
            args = tuple(dict(a) if isinstance(a, dict) else a for a in args)
            self._submit(self._call_all, name, args, kwargs)
        return call

    def _call_all(self, name: str, args: tuple, kwargs: dict) -> None:
        for n in self.notifiers:
            hook = getattr(n, name, None)
            if hook is None:  # a notifier need not care about every hook
                continue
            try:
                hook(*args, **kwargs)
            except Exception:
                log.exception("notifier failed", extra={"hook": name})


class NotifierThread:
    """The notifier's hooks and the worker's ticks (report, canary, progress, pruning) on one
    thread of their own, with their own SQLite connection, in the order they were asked for.

    The alert router and the Bitable write-back write to the store; on the worker's loop a
    store locked by another process (the web process, ``opsbot run``) would freeze every poll
    and lease renewal for as long as the lock is held. Here only this thread waits.
    """

    def __init__(self, db: Any, settings: Settings, clock: Clock) -> None:
        path = settings.db_path
        # an in-memory store cannot be opened twice: its hooks share the caller's connection
        self.own_db = str(path) != ":memory:"
        self.db = open_db(path, migrate=False) if self.own_db else db
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="opsbot-notify")
        self.notifier, self.router = build_notifier(self.db, settings, clock, submit=self.submit)

    def submit(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Future:
        """Queue ``fn(*args, **kwargs)``; a failure is logged."""
        fut = self._pool.submit(fn, *args, **kwargs)
        fut.add_done_callback(_log_failure)
        return fut

    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``fn(*args)`` on the thread, after everything queued before it."""
        return await asyncio.wrap_future(self._pool.submit(fn, *args))

    def close(self) -> None:
        """Wait for what is queued, then close the connection."""
        self._pool.shutdown(wait=True)
        if self.own_db:
            self.db.conn.close()


def _log_failure(fut: Future) -> None:
    if not fut.cancelled() and fut.exception() is not None:
        log.error("notifier call failed", exc_info=fut.exception())


class FeishuLoop:
    """Background thread: look up the bot's identity (at start, see :mod:`bot.chat.identity`),
    handle leftover inbox rows and deliver the outbox."""

    def __init__(self, settings: Settings, clock: Clock, owner: str, interval: float = 0.2,
                 feishu_client: Any = None) -> None:
        self.settings = settings
        self.clock = clock
        self.owner = owner
        self.interval = interval
        self.feishu_client = feishu_client
        self.stop_event = threading.Event()
        self._wake = threading.Event()
        self.thread = threading.Thread(target=self._run, name="feishu-loop", daemon=True)
        self.errors = 0
        self.identity: Any = None

    def start(self) -> None:
        self.thread.start()

    def wake(self, key: str | None = None) -> None:
        """Something was recorded (by the long connection): look at the inbox now."""
        self._wake.set()

    def stop(self, timeout: float = 10.0) -> None:
        self.stop_event.set()
        self._wake.set()
        self.thread.join(timeout)

    def _run(self) -> None:
        from bot.feishu.client import FeishuClient
        from bot.chat.handlers import process_inbox
        from bot.chat.identity import IdentityRefresher
        from bot.feishu.sender import OutboxSender

        db = open_db(self.settings.db_path)
        client = self.feishu_client or FeishuClient(self.settings.feishu)
        sender = OutboxSender(db, client, clock=self.clock, owner=self.owner,
                              lang=self.settings.language)
        # the bot's own open_id, for "is this group message for the bot" (bot.chat.identity)
        self.identity = IdentityRefresher(db, client, self.settings.feishu.app_id, self.clock)
        while not self.stop_event.is_set():
            try:
                self.identity.tick()
                # rows the web process accepted but did not finish (it died, or was busy)
                if inbox.pending(db):
                    process_inbox(db, self.settings, client, self.clock, self.owner)
                sender.deliver_due()
            except Exception:
                self.errors += 1
                log.exception("feishu loop iteration failed")
            self._wake.wait(self.interval)
            self._wake.clear()
        # a last delivery so a final summary card is not left behind on shutdown
        with contextlib.suppress(Exception):
            sender.deliver_due()


async def _tick_loop(scheduler: Any, router: Any, canary: Any, interval: float,
                     hooks: NotifierThread) -> None:
    """Report, latency, progress, canary, and once an hour the pruning of old inbox and outbox
    rows, on the notifier's thread (the router's connection lives there), after the hooks
    queued before."""
    prune_at = 0.0

    def tick() -> None:
        nonlocal prune_at
        scheduler.tick()
        canary.tick()
        router.flush()
        now = router.clock.now()
        if now >= prune_at:
            prune_at = now + 3600
            removed = prune(router.db, now=now)
            if any(removed.values()):
                log.info("pruned old rows", extra=removed)

    while True:
        try:
            await hooks.run(tick)
        except Exception:
            log.exception("scheduler tick failed")
        await asyncio.sleep(interval)


async def run_worker(settings: Settings, *, drain: bool = False, simulator: Any | None = None,
                     clock: Clock | None = None, stop: asyncio.Event | None = None,
                     tick_interval: float = 3.0,
                     stages: frozenset[str] = frozenset(("coze", "synthesis"))) -> int:
    """Run until stopped (or drained). Returns the process exit code.

    ``stages`` limits the pipeline to those stages (see :class:`pipeline.worker.Worker`); a
    synthesis-only worker needs no Coze account. ``simulator``: an unstarted Coze stand-in (the
    operator tools pass :class:`pipeline.standins.simulator.CozeSimulator` for ``--simulate``)
    that the worker starts, uses instead of Coze, and stops; production code never imports it."""
    ws_mode = settings.feishu.connection == "ws"
    if ws_mode and not settings.feishu.configured:
        log.error("FEISHU_CONNECTION=ws needs FEISHU_APP_ID and FEISHU_APP_SECRET: the long "
                  "connection is opened with the app's credentials")
        return 2
    clock = clock or Clock()
    owner = make_owner()
    db = open_db(settings.db_path)
    stop = stop or asyncio.Event()
    _install_signals(stop)
    sim = simulator
    sim_account = None
    if sim is not None:
        sim_account = (await sim.start(), sim.token)
    elif "coze" in stages:
        problem = coze_problem(settings)
        if problem:
            log.error("%s, or run `opsbot worker --simulate`", problem)
            return 2
    feishu = FeishuLoop(settings, clock, owner) if settings.feishu.configured else None
    if feishu is None:
        log.warning("Feishu is not configured (FEISHU_APP_ID / FEISHU_APP_SECRET): no chat "
                    "replies, alerts or Bitable write-back will be delivered; they stay queued")
    else:
        feishu.start()
    longconn = None
    if ws_mode and drain:
        log.info("--drain: the long connection is not opened (no new commands are taken)")
    elif ws_mode:
        from bot.feishu.longconn import LongConnection

        longconn = LongConnection(settings, clock, on_recorded=feishu.wake)
        longconn.start()
    # one budget per Coze account, shared through the store with any `opsbot run` beside us
    limiters = []
    try:
        from bot.alerting.canary import Canary
        from bot.alerting.scheduler import Scheduler

        hooks = NotifierThread(db, settings, clock)
        router = hooks.router
        ticker = asyncio.create_task(_tick_loop(
            Scheduler(hooks.db, settings, clock, router=router), router,
            Canary(hooks.db, settings, clock, router), tick_interval, hooks))
        try:
            async with contextlib.AsyncExitStack() as clients:
                routing = await open_routing(settings, clock, clients, limiters,
                                             simulated=sim_account)
                worker = Worker(db, settings.pipeline, None, "", clock=clock, routing=routing,
                                notifier=hooks.notifier, owner=owner, stages=stages)
                log.info("worker started", extra={"owner": owner, "drain": drain,
                                                  "stages": ",".join(sorted(stages))})
                try:
                    await worker.run(drain=drain, stop=stop)
                finally:
                    worker.synth.close()
                    ticker.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await ticker
                    await hooks.run(router.flush)
        finally:
            await asyncio.to_thread(hooks.close)
        if drain and feishu is not None:
            await _drain_outbox(db, clock, seconds=30.0)
    finally:
        if longconn is not None:  # first: no new command is taken while the rest shuts down
            await asyncio.to_thread(longconn.stop)
        for limiter in limiters:
            limiter.close()
        if feishu is not None:
            feishu.stop()
        if sim is not None:
            await sim.stop()
    log.info("worker stopped", extra={"owner": owner})
    return 0


def coze_problem(settings: Settings, pipeline: str | None = None) -> str | None:
    """Why the Coze stage cannot run (of ``pipeline``, else of every pipeline), or None."""
    specs = settings.pipelines if pipeline is None else (settings.pipeline_of(pipeline),)
    for spec in specs:
        if not spec.workflow_id:
            return (f"no Coze workflow for pipeline {spec.name!r}: set COZE_WORKFLOW_ID"
                    if spec.name == "default" else
                    f"pipeline {spec.name!r} has no workflow_id")
        account = settings.account(spec.coze_account)
        if not account.api_token:
            return (f"no Coze token for pipeline {spec.name!r}: set "
                    f"{account.token_source}")
    return None


async def open_routing(settings: Settings, clock: Clock, clients: contextlib.AsyncExitStack,
                       limiters: list, *, simulated: tuple[str, str] | None = None,
                       only: str | None = None) -> Any:
    """One Coze client per account in use (its QPS budget shared through the store), entered on
    ``clients``; returns the worker's :class:`pipeline.routing.Routing`. ``only``: that
    pipeline alone (``opsbot run --pipeline``). ``simulated``: every account talks to the
    simulator at ``(base_url, token)``."""
    from pipeline.routing import Account, Route, Routing

    specs = settings.pipelines if only is None else (settings.pipeline_of(only),)
    routes = tuple(Route(s.name, s.workflow_id or ("sim-workflow" if simulated else ""),
                         s.fallback_workflow_id, s.coze_account) for s in specs)
    accounts = []
    for name in dict.fromkeys(s.coze_account for s in specs):
        account = settings.account(name)
        base_url, token = simulated or (account.base_url, account.api_token.get())
        limiter = coze_limiter(account.qps, clock, store=settings.db_path, base_url=base_url,
                               token=token)
        limiters.append(limiter)
        coze = await clients.enter_async_context(CozeClient(base_url, token, limiter=limiter))
        # every pipeline on the account, also those this process does not run: they share
        # its run limit
        on_account = tuple(s.name for s in settings.pipelines if s.coze_account == name)
        accounts.append(Account(name, coze, account.max_runs, account.qps,
                                breaker_service=account.breaker_service, pipelines=on_account))
    return Routing(tuple(accounts), routes)


async def _drain_outbox(db, clock: Clock, seconds: float) -> None:
    """With --drain: give the sender a moment to deliver what is due before exiting."""
    deadline = clock.monotonic() + seconds
    while clock.monotonic() < deadline:
        due = outbox.next_due(db)
        if due is None or due > clock.now() + 5:
            return
        await asyncio.sleep(0.2)


def _install_signals(stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(sig, stop.set)

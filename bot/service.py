"""The ``opsbot worker`` process: pipeline worker + inbox fallback + outbox sender + scheduler.

Everything shares one SQLite file with the web process. The pipeline runs on the asyncio loop;
the Feishu side (inbox commands, outbox delivery, the scheduler) calls lark-oapi, which is
synchronous, so it runs in one background thread with its own DB connection. Both stop cleanly on
SIGTERM/SIGINT; whatever they held (leases) is handed back or expires, and the next worker resumes.

With ``FEISHU_CONNECTION=ws`` the worker also holds Feishu's long connection
(:class:`bot.longconn.LongConnection`, its own threads and event loop): messages it records wake
the Feishu thread, which answers them as it answers the web process's.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
from typing import Any

from pipeline.clock import Clock
from pipeline.coze import CozeClient
from pipeline.notify import Notifier
from pipeline.ratelimit import coze_limiter
from pipeline.worker import Worker, make_owner
from storage import inbox, outbox
from storage.db import open_db, prune

from .settings import Settings

log = logging.getLogger("opsbot.service")


def build_notifier(db, settings: Settings, clock: Clock) -> tuple[Notifier, Any]:
    """The pipeline's notifier (alert router + Bitable write-back) and the alert router."""
    from .alerts import AlertRouter
    from .bitable_sync import BitableWriteBack

    router = AlertRouter(db, settings, clock)
    return FanOut([router, BitableWriteBack(db, settings, clock)]), router


class FanOut:
    """Calls every notifier; one failing notifier never stops the others or the pipeline."""

    def __init__(self, notifiers: list[Any]) -> None:
        self.notifiers = notifiers

    def __getattr__(self, name: str):
        def call(*args: Any, **kwargs: Any) -> None:
            for n in self.notifiers:
                hook = getattr(n, name, None)
                if hook is None:  # a notifier need not care about every hook
                    continue
                try:
                    hook(*args, **kwargs)
                except Exception:
                    log.exception("notifier failed", extra={"hook": name})
        return call


class FeishuLoop:
    """Background thread: look up the bot's identity (at start, see :mod:`bot.identity`),
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
        from .feishu import FeishuClient
        from .handlers import process_inbox
        from .identity import IdentityRefresher
        from .sender import OutboxSender

        db = open_db(self.settings.db_path)
        client = self.feishu_client or FeishuClient(self.settings.feishu)
        sender = OutboxSender(db, client, clock=self.clock, owner=self.owner,
                              lang=self.settings.language)
        # the bot's own open_id, for "is this group message for the bot" (bot.identity)
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


async def _tick_loop(scheduler: Any, router: Any, canary: Any, interval: float) -> None:
    """On the worker's loop (the router shares its DB connection): report, latency, progress,
    canary, and once an hour the pruning of old inbox and outbox rows."""
    prune_at = 0.0
    while True:
        try:
            scheduler.tick()
            canary.tick()
            router.flush()
            now = router.clock.now()
            if now >= prune_at:
                prune_at = now + 3600
                removed = prune(router.db, now=now)
                if any(removed.values()):
                    log.info("pruned old rows", extra=removed)
        except Exception:
            log.exception("scheduler tick failed")
        await asyncio.sleep(interval)


async def run_worker(settings: Settings, *, drain: bool = False, simulate: bool = False,
                     clock: Clock | None = None, stop: asyncio.Event | None = None,
                     tick_interval: float = 3.0,
                     stages: frozenset[str] = frozenset(("coze", "synthesis"))) -> int:
    """Run until stopped (or drained). Returns the process exit code.

    ``stages`` limits the pipeline to those stages (see :class:`pipeline.worker.Worker`); a
    synthesis-only worker needs no Coze account."""
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
    sim = None
    base_url, token = settings.coze.base_url, settings.coze.api_token.get()
    workflow_id = settings.coze.workflow_id
    if simulate:
        from pipeline.simulator import CozeSimulator

        sim = CozeSimulator(default_duration=1.0, seed=1)
        base_url = await sim.start()
        token, workflow_id = sim.token, workflow_id or "sim-workflow"
    elif not settings.coze.configured and "coze" in stages:
        log.error("no Coze account configured: set COZE_API_TOKEN and COZE_WORKFLOW_ID, "
                  "or run `opsbot worker --simulate`")
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
        from .longconn import LongConnection

        longconn = LongConnection(settings, clock, on_recorded=feishu.wake)
        longconn.start()
    # one budget per Coze account, shared through the store with any `opsbot run` beside us
    limiter = coze_limiter(settings.pipeline.coze_qps, clock, store=settings.db_path,
                           base_url=base_url, token=token)
    try:
        from .canary import Canary
        from .scheduler import Scheduler

        notifier, router = build_notifier(db, settings, clock)
        ticker = asyncio.create_task(_tick_loop(
            Scheduler(db, settings, clock, router=router), router,
            Canary(db, settings, clock, router), tick_interval))
        async with CozeClient(base_url, token, limiter=limiter) as coze:
            worker = Worker(db, settings.pipeline, coze, workflow_id, clock=clock,
                            notifier=notifier, owner=owner, stages=stages)
            log.info("worker started", extra={"owner": owner, "drain": drain,
                                              "stages": ",".join(sorted(stages))})
            try:
                await worker.run(drain=drain, stop=stop)
            finally:
                worker.synth.close()
                ticker.cancel()
                router.flush()
        if drain and feishu is not None:
            await _drain_outbox(db, clock, seconds=30.0)
    finally:
        if longconn is not None:  # first: no new command is taken while the rest shuts down
            await asyncio.to_thread(longconn.stop)
        limiter.close()
        if feishu is not None:
            feishu.stop()
        if sim is not None:
            await sim.stop()
    log.info("worker stopped", extra={"owner": owner})
    return 0


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

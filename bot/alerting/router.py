"""The alert router: turns what the pipeline reports into grouped, tiered alert cards.

:class:`AlertRouter` implements :class:`pipeline.notify.Notifier`. It never talks to Feishu: it
writes the ``alerts`` table and enqueues outbox rows (``send`` to the alert chat, ``patch`` of an
earlier send by its uuid, ``reply`` to a ``run`` command), which the outbox sender delivers.

Tiers (from the classifier's :class:`~pipeline.classifier.Decision`):

- LOW: a call that will be retried / a run resubmitted. Counted in :attr:`AlertRouter.stats`
  (and in the ``attempts`` table, which the daily report reads); no message.
- MEDIUM: a task failed after its retries. A card with stage, reason, task, batch, attempts,
  time, the run's debug link and buttons Retry / Ignore / Silence 1 h.
- HIGH: a fatal error blocked a batch. Sent at once, mentions the on-call people
  (``feishu.oncall_ids``; the admins when none are configured; ``<at id=all>`` when nobody is
  and ``alerts.mention_all`` is on); buttons Resume / Cancel.
- CRITICAL: a breaker opened by itself (consecutive failures), or the failure rate of tasks
  finished in the last ``alerts.failure_rate_window`` seconds passed
  ``alerts.failure_rate_threshold`` with at least ``failure_rate_min_tasks`` finished. Mentions
  everyone configured (on-call + admins), or ``<at id=all></at>`` when ``alerts.mention_all``
  is on (Feishu refuses the whole card unless the group owner allows it, so it is off by
  default). A card that wants to mention someone while nobody is configured says so. A breaker
  tripped by a fatal error (``pipeline.breaker.MANUAL``) raises no CRITICAL card of its own: the
  HIGH card of each blocked batch already says so, so one bad token gives one card.

Grouping: the key is ``batch_id:stage:error_class`` (``breaker:<service>``, ``failure_rate`` and
``batch_id:latency:slow`` for the others), so a batch id is a key prefix. An alert whose key
fires again within ``alerts.group_window`` seconds of its first occurrence is counted on the same
card, which is patched in place ("× 12, last at 10:42"); after the window the key starts a new
card and the old one is patched closed ("a newer card continues"). Patches are coalesced: at
most one pending patch row per card (a newer card replaces the payload of a pending, unclaimed row) and
at most one patch per :attr:`patch_interval` seconds per card (the row's ``next_at``).

Silences: a row in ``silences`` whose key equals the alert key, or is a prefix of it ending at a
``:`` (e.g. a batch id), or is ``*``, suppresses new sends until it ends. Suppressed occurrences
are counted; an existing card is still patched and says it is silenced.

Resolution: when the cause clears (breaker closed; every task of a MEDIUM alert succeeded or was
dropped; failure rate back under the threshold; a human resumed the batch) the alert is marked
resolved, its card is patched green and one short resolved notice is sent (uuid derived from the
card, so never twice).

Batch cards: ``batch_progress`` patches the batch's progress card (the ``run`` command's reply,
whose outbox uuid is ``storage.outbox.reply_uuid(command_message_id)``; for a batch with a chat but
no command message, a progress card is sent and its uuid stored in ``batches.progress_message_id``)
at most every :attr:`progress_interval` seconds per batch; updates skipped by the throttle are
flushed by :meth:`AlertRouter.flush`. ``batch_finished`` patches the final state and replies
with a summary card (partial results, failures by reason with advice, Retry-all-failed).

One cause, one card (inhibition, as Alertmanager's): while a HIGH alert stands for a cause, a
MEDIUM alert of that cause that would start a new card is *held* by it instead: no card is sent,
the MEDIUM row keeps counting (``details.held_by`` names the holder) and the HIGH card says how
many it holds (``details.held``). The causes: a batch blocked by a fatal error (the open
``blocked`` alert of that batch holds the batch's MEDIUM alerts) and a canary batch (the
``canary`` alert holds the canary task's own failure, even before the canary check raised it).
A MEDIUM alert that already has a card keeps being updated there. When the holder resolves, the
held alerts that are still open are released: each is sent as its own card then (a human
resumed the batch and those failed tasks still want Retry or Ignore), and the resolved HIGH
card says how many were released; the held alerts of a canary are closed with it instead (the
next canary's success shows the flow works; its old task needs nothing). A held alert whose
tasks succeed resolves quietly (it never had a card) and leaves the holder's count.

When ``feishu.alert_chat_id`` is empty, alerts are stored (and logged) but not sent.

Many pipelines (:mod:`bot.settings`): every alert belongs to one pipeline (``details.pipeline``):
a batch's alerts to the batch's pipeline, a breaker's to each pipeline on that Coze account, the
failure rate is computed per pipeline, a workflow switch to the pipeline whose workflow it is.
Its card goes to that pipeline's alert chat and mentions that pipeline's on-call people and
admins (:func:`scoped`). With more than one pipeline, the keys of the alerts that are not about
a batch end in ``:<pipeline>`` (``failure_rate:drama``, ``breaker:coze:studio:drama``), so a
silence of ``failure_rate`` still covers them all.
"""
from __future__ import annotations

import hashlib
import logging
from collections import Counter
from typing import Any, Iterable

import sqlite_utils

from pipeline.breaker import MANUAL
from storage import alerts as store_alerts, outbox, queue
from storage.db import NotFound, transaction

from bot.alerting import cards as alert_cards
from bot.feishu.bitable_sync import batch_outputs

log = logging.getLogger("opsbot.alerts")

TIERS = ("LOW", "MEDIUM", "HIGH", "CRITICAL")
OPEN_BATCH = ("queued", "running", "paused", "blocked")
TASK_DONE_OK = ("succeeded", "ignored", "cancelled")   # a MEDIUM alert resolves when all are
CANARY_KEY = "canary"    # bot.alerting.canary.KEY: the alert of a failing canary


# --- store helpers (shared with bot.alerting.actions) --------------------------------------------

def load_alert(db: sqlite_utils.Database, key: str) -> dict[str, Any] | None:
    """The alert row for ``key`` with ``details`` parsed, or None."""
    return store_alerts.get(db, key)


_load_in = store_alerts.get_in     # inside the caller's transaction
_save_in = store_alerts.save_in    # inside the caller's transaction


def save_alert(db: sqlite_utils.Database, alert: dict[str, Any]) -> None:
    store_alerts.save(db, alert)


def silenced_until(db: sqlite_utils.Database, key: str, now: float) -> float | None:
    """The end of the longest active silence covering ``key`` (None when not silenced).

    A silence covers a key when its key is equal, is ``*``, or is a prefix ending at ``:``.
    """
    best = None
    for skey, until in store_alerts.active_silences(db, now):
        if skey == key or skey == "*" or key.startswith(skey + ":"):
            best = until if best is None else max(best, until)
    return best


def alert_card_for(db: sqlite_utils.Database, settings, alert: dict[str, Any],
                   now: float) -> dict[str, Any]:
    """The current card of ``alert`` (silence state read from the store)."""
    return alert_cards.alert_card(alert, settings.language, settings.tz,
                                  silenced_until=silenced_until(db, alert["key"], now))


def enqueue_patch(db: sqlite_utils.Database, target: str, card: dict[str, Any], *, now: float,
                  ref: str | None = None, interval: float = 1.0) -> str:
    """Patch the message ``target`` (a message_id or a send's uuid) to ``card``, coalesced.

    A pending patch row for the same target that no sender holds gets the new card instead of a
    second row. Otherwise a new row is added, due no sooner than ``interval`` seconds after the
    previous patch of that target (Feishu allows 5 patches per second per message; one is
    plenty). Returns the uuid of the row carrying the card.
    """
    return outbox.enqueue_patch(db, target, {"card": card}, now=now, ref=ref, interval=interval)


def refresh_pending_patch(db: sqlite_utils.Database, target: str, card: dict[str, Any], *,
                          now: float, ref: str | None = None) -> str | None:
    """When a patch of ``target`` is still pending, make the card it delivers ``card``.

    Used after a button press: the callback's answer already shows ``card``, and an older
    pending patch would otherwise revert it. A pending row no sender holds gets the new payload;
    when the only pending row is in flight, a new row follows it. Returns the row's uuid, or
    None when nothing was pending (nothing to do: the answer updated the card).
    """
    if not outbox.has_pending_patch(db, target):
        return None
    return enqueue_patch(db, target, card, now=now, ref=ref, interval=0.0)


def _uuid(prefix: str, *parts: Any) -> str:
    """A deterministic outbox uuid (<= 50 chars): a crash-and-repeat enqueues nothing new."""
    digest = hashlib.sha256("|".join(map(str, parts)).encode()).hexdigest()[:32]
    return f"{prefix}-{digest}"


def scoped(settings, alert_or_pipeline: Any) -> Any:
    """The settings as the alert's pipeline (or the pipeline named) sees them: its chat,
    admins and on-call people. Settings without pipelines (tests' stand-ins) stay as they are."""
    name = alert_or_pipeline
    if isinstance(alert_or_pipeline, dict):
        name = (alert_or_pipeline.get("details") or {}).get("pipeline")
    scope = getattr(settings, "scoped", None)
    return scope(name) if scope is not None else settings


def pipeline_key(settings, key: str, pipeline: str | None) -> str:
    """``key`` for one pipeline's alert that is not about a batch (see the module docstring)."""
    if pipeline and getattr(settings, "many_pipelines", False):
        return f"{key}:{pipeline}"
    return key


def everyone(settings) -> list[str]:
    """Whom a CRITICAL card mentions: ``["all"]`` with ``alerts.mention_all``, else on-call
    people and admins (deduplicated; ``[]`` when nobody is configured)."""
    if settings.alerts.mention_all:
        return ["all"]
    return list(dict.fromkeys((*settings.feishu.oncall_ids, *settings.feishu.admin_ids)))


def oncall(settings) -> list[str]:
    """Whom a HIGH card mentions: on-call, else the admins, else ``["all"]`` with
    ``alerts.mention_all``, else nobody (``[]``: the card says nobody is configured)."""
    ids = list(settings.feishu.oncall_ids or settings.feishu.admin_ids)
    return ids or (["all"] if settings.alerts.mention_all else [])


def resolve_alert(db: sqlite_utils.Database, settings, key: str, *, now: float,
                  note: dict[str, Any] | None = None, patch_interval: float = 1.0) -> bool:
    """Mark an open alert resolved: patch its card green and send one resolved notice.

    Returns False (doing nothing) when the alert is not open. ``note`` (``{"by", "text"}``) is
    added to the card's action log.
    """
    with transaction(db) as conn:
        alert = _load_in(conn, key)
        if alert is None or alert["status"] != "open":
            return False
        alert["status"], alert["resolved_at"] = "resolved", now
        if note:
            _add_action(alert, note, now)
        released = _release_held(conn, settings, key, now)
        if released:
            alert["details"]["released"] = len(released)
        alert["details"].pop("held", None)
        _save_in(conn, alert)
    for held in released:
        outbox.enqueue(db, "send", scoped(settings, held).feishu.alert_chat_id,
                       {"card": alert_card_for(db, settings, held, now)}, now=now,
                       uuid=held["message_uuid"], ref=held["key"])
    if alert["details"].get("held_by"):
        refresh_holder(db, settings, alert["details"]["held_by"], now=now,
                       patch_interval=patch_interval)
    if alert.get("message_uuid"):
        enqueue_patch(db, alert["message_uuid"], alert_card_for(db, settings, alert, now), now=now,
                      ref=key, interval=patch_interval)
        chat = scoped(settings, alert).feishu.alert_chat_id
        if chat:
            outbox.enqueue(db, "send", chat,
                           {"text": alert_cards.resolved_notice(alert, settings.language)},
                           now=now, uuid=_uuid("rs", alert["message_uuid"]), ref=key)
    log.info("alert resolved", extra={"alert_key": key, "count": alert["count"]})
    return True


def held_by(conn, key: str) -> dict[str, dict[str, Any]]:
    """Open alerts held by ``key``: ``{alert_key: {"count", "tier"}}`` in first-seen order."""
    return store_alerts.held_by_in(conn, key)


def _release_held(conn, settings, key: str, now: float) -> list[dict[str, Any]]:
    """The holder ``key`` resolves: its held alerts go free (see the module docstring).

    Returns the released alerts that now need a card of their own (their ``message_uuid`` set;
    the caller enqueues the sends after the transaction)."""
    released = []
    for held_key in held_by(conn, key):
        held = _load_in(conn, held_key)
        held["details"].pop("held_by", None)
        if key.split(":")[0] == CANARY_KEY:
            held["status"], held["resolved_at"] = "resolved", now
        elif scoped(settings, held).feishu.alert_chat_id:
            held["message_uuid"] = _uuid("al", held_key, held["first_at"])
            released.append(held)
        _save_in(conn, held)
    return released


def refresh_holder(db: sqlite_utils.Database, settings, key: str, *, now: float,
                   patch_interval: float = 1.0) -> None:
    """Recount what the open alert ``key`` holds and show it on its card."""
    with transaction(db) as conn:
        alert = _load_in(conn, key)
        if alert is None or alert["status"] != "open":
            return
        held = held_by(conn, key)
        if held == (alert["details"].get("held") or {}):
            return
        alert["details"]["held"] = held
        _save_in(conn, alert)
    if alert.get("message_uuid"):
        enqueue_patch(db, alert["message_uuid"], alert_card_for(db, settings, alert, now),
                      now=now, ref=key, interval=patch_interval)


def _add_action(alert: dict[str, Any], note: dict[str, Any], now: float) -> None:
    actions = alert["details"].setdefault("actions", [])
    actions.append({"at": now, "by": note.get("by"), "text": note.get("text")})
    del actions[:-5]


def open_alerts(db: sqlite_utils.Database, *, batch_id: str | None = None,
                kinds: Iterable[str] | None = None) -> list[dict[str, Any]]:
    rows = store_alerts.open_rows(db, batch_id=batch_id)
    wanted = set(kinds) if kinds is not None else None
    return [a for a in rows if wanted is None or a["details"].get("kind") in wanted]


def resolve_batch_unblocked(db: sqlite_utils.Database, settings, batch_id: str, *, now: float,
                            by: str | None = None,
                            services: tuple[str, ...] | None = None) -> int:
    """A human resumed ``batch_id``: resolve its HIGH card and every breaker card (of
    ``services``, if given)."""
    note = {"by": by, "text": alert_cards.tr("n.resume", settings.language)} if by else None
    keys = [a["key"] for a in open_alerts(db, batch_id=batch_id, kinds=("blocked",))]
    keys += [a["key"] for a in open_alerts(db, kinds=("breaker",))
             if services is None or a["details"].get("service") in services]
    return sum(resolve_alert(db, settings, k, now=now, note=note) for k in keys)


def failures_by_class(db: sqlite_utils.Database, batch_id: str) -> list[tuple[str, int]]:
    """``[(error_class, count)]`` of the batch's failed tasks, largest first."""
    return [(cls or "unknown", n) for cls, n in queue.failures_by_class(db, batch_id)]


def failure_groups(db: sqlite_utils.Database, batch_id: str) -> list[dict[str, Any]]:
    """Failed tasks by error class with one example message and a sample of task keys."""
    groups = []
    for error_class, n in failures_by_class(db, batch_id):
        cls = None if error_class == "unknown" else error_class
        rows = queue.failed_examples(db, batch_id, cls, limit=alert_cards.LIST_LIMIT)
        groups.append({"error_class": error_class, "count": n,
                       "message": next((r[1] for r in rows if r[1]), ""),
                       "task_keys": [r[0] for r in rows]})
    return groups


def batch_card(db: sqlite_utils.Database, settings, batch_id: str,
               now: float) -> dict[str, Any]:
    """The batch's card as it should look now: summary when done, else progress."""
    batch = queue.get_batch(db, batch_id)
    counts = queue.batch_counts(db, batch_id)
    if batch["status"] == "done":
        return alert_cards.summary_card(batch, counts, failure_groups(db, batch_id),
                                        settings.language, now,
                                        outputs=batch_outputs(db, settings, batch_id))
    return alert_cards.progress_card(batch, counts, failures_by_class(db, batch_id),
                                     settings.language, now)


# --- the router -------------------------------------------------------------------------------

class AlertRouter:
    """The bot's :class:`~pipeline.notify.Notifier` (see the module docstring).

    ``clock`` has ``now()`` (Unix seconds). Intervals are seconds. Call :meth:`flush` and
    :meth:`check_latency` periodically (the scheduler's ``tick`` does).
    """

    def __init__(self, db: sqlite_utils.Database, settings, clock, *,
                 progress_interval: float = 5.0, patch_interval: float = 1.0,
                 rate_check_interval: float = 1.0) -> None:
        self.db, self.settings, self.clock = db, settings, clock
        self.progress_interval = progress_interval
        self.patch_interval = patch_interval
        self.rate_check_interval = rate_check_interval
        self.stats: Counter[str] = Counter()
        self._progress_at: dict[str, float] = {}
        self._progress_dirty: set[str] = set()
        self._rate_checked_at = float("-inf")

    @property
    def lang(self) -> str:
        return self.settings.language

    # -- Notifier ----------------------------------------------------------------------------

    def task_retrying(self, task: dict[str, Any], decision: Any, error: BaseException) -> None:
        """LOW: counted only (the attempts table keeps the detail for the report)."""
        self.stats["LOW"] += 1
        self.stats[f"LOW:{getattr(decision, 'error_class', 'unknown')}"] += 1

    def task_finished(self, task: dict[str, Any], decision: Any | None,
                      error: BaseException | None) -> None:
        if task.get("status") == "succeeded":
            self._task_succeeded(task)
            self._check_failure_rate(resolve_only=True)
        elif task.get("status") == "failed":
            self._task_failed(task, decision, error)
            self._check_failure_rate()

    def batch_blocked(self, batch_id: str, decision: Any, error: BaseException) -> None:
        """HIGH at once, mentioning on-call; the card's Resume / Cancel buttons act on the batch."""
        error_class = getattr(decision, "error_class", None) or "fatal"
        tier = _at_least(getattr(decision, "tier", "HIGH"), "HIGH")
        details = {"kind": "blocked", "stage": "coze", "error_class": error_class,
                   "reason": getattr(decision, "reason", ""), "batch_id": batch_id,
                   "error_code": _code(error), "error_message": _message(error),
                   "since": self.clock.now()}
        pipeline = self._pipeline_of(batch_id)
        details["pipeline"] = pipeline
        self.raise_alert(f"{batch_id}:coze:{error_class}", tier, details, batch_id=batch_id,
                         mentions=oncall(scoped(self.settings, pipeline)))
        self.batch_progress(batch_id, force=True)

    def breaker_changed(self, service: str, before: str, after: str, reason: str | None) -> None:
        now = self.clock.now()
        if after == "open":
            if (reason or "").startswith(MANUAL):
                log.info("breaker tripped by a fatal error; the HIGH card covers it",
                         extra={"service": service})
                return
            for pipeline in self._pipelines_of_service(service):
                details = {"kind": "breaker", "service": service, "reason": reason or "",
                           "blocked": self._open_batches(pipeline), "since": now,
                           "pipeline": pipeline}
                self.raise_alert(pipeline_key(self.settings, f"breaker:{service}", pipeline),
                                 "CRITICAL", details,
                                 mentions=everyone(scoped(self.settings, pipeline)))
        elif after == "closed":
            for alert in open_alerts(self.db, kinds=("breaker",)):
                if alert["details"].get("service") == service:
                    resolve_alert(self.db, self.settings, alert["key"], now=now,
                                  patch_interval=self.patch_interval)
            resolve_alert(self.db, self.settings, f"breaker:{service}", now=now,
                          patch_interval=self.patch_interval)
            for alert in open_alerts(self.db, kinds=("blocked",)):
                if self._batch_status(alert.get("batch_id")) != "blocked":
                    resolve_alert(self.db, self.settings, alert["key"], now=now,
                                  patch_interval=self.patch_interval)

    def workflow_switched(self, switch: Any) -> None:
        """To the fallback: one HIGH card (on-call mentioned); back to primary: resolved."""
        pipeline = getattr(switch, "pipeline", None)
        key = pipeline_key(self.settings, "workflow:fallback", pipeline)
        if switch.to_fallback:
            details = {"kind": "fallback", "reason": switch.reason, "primary": switch.primary,
                       "fallback": switch.fallback, "stage": "coze", "pipeline": pipeline}
            self.raise_alert(key, "HIGH", details,
                             mentions=oncall(scoped(self.settings, pipeline)))
        else:
            resolve_alert(self.db, self.settings, key, now=self.clock.now(),
                          note={"by": None, "text": switch.reason},
                          patch_interval=self.patch_interval)

    def batch_progress(self, batch_id: str, *, force: bool = False) -> None:
        """Patch the batch's progress card, at most every ``progress_interval`` seconds."""
        now = self.clock.now()
        if not force and now - self._progress_at.get(batch_id, float("-inf")) \
                < self.progress_interval:
            self._progress_dirty.add(batch_id)
            return
        self._progress_dirty.discard(batch_id)
        self._progress_at[batch_id] = now
        try:
            batch = queue.get_batch(self.db, batch_id)
        except NotFound:
            return
        target = self._progress_target(batch, now)
        if target is None:
            return
        card = alert_cards.progress_card(batch, queue.batch_counts(self.db, batch_id),
                                         self._failures_by_class(batch_id), self.lang, now)
        enqueue_patch(self.db, target, card, now=now, ref=batch_id, interval=self.patch_interval)

    def batch_finished(self, batch_id: str) -> None:
        """Final progress, then a summary card replying to the ``run`` message (or to the chat)."""
        self.batch_progress(batch_id, force=True)
        try:
            batch = queue.get_batch(self.db, batch_id)
        except NotFound:
            return
        now = self.clock.now()
        counts = queue.batch_counts(self.db, batch_id)
        card = alert_cards.summary_card(batch, counts, self._failure_groups(batch_id), self.lang,
                                        now, outputs=batch_outputs(self.db, self.settings,
                                                                   batch_id))
        uid = _uuid("sum", batch_id, batch.get("finished_at") or now)
        if batch.get("command_message_id"):
            outbox.enqueue(self.db, "reply", batch["command_message_id"], {"card": card}, now=now,
                           uuid=uid, ref=batch_id)
        elif batch.get("chat_id"):
            outbox.enqueue(self.db, "send", batch["chat_id"], {"card": card}, now=now, uuid=uid,
                           ref=batch_id)
        self._progress_at.pop(batch_id, None)

    # -- periodic ----------------------------------------------------------------------------

    def flush(self) -> None:
        """Send progress updates the throttle held back, once their interval has passed."""
        now = self.clock.now()
        for batch_id in sorted(self._progress_dirty):
            if now - self._progress_at.get(batch_id, float("-inf")) >= self.progress_interval:
                self.batch_progress(batch_id, force=True)

    def check_latency(self, now: float | None = None) -> int:
        """MEDIUM alert per batch for tasks running longer than ``alerts.latency_threshold``.

        Each slow task is counted once per alert. Returns how many tasks were newly flagged.
        """
        now = self.clock.now() if now is None else now
        threshold = self.settings.alerts.latency_threshold
        rows = queue.running_since(self.db, now - threshold)
        by_batch: dict[str, list[tuple]] = {}
        for row in rows:
            by_batch.setdefault(row[1], []).append(row)
        flagged = 0
        for batch_id, slow in by_batch.items():
            key = f"{batch_id}:latency:slow"
            existing = load_alert(self.db, key)
            known = set(existing["details"].get("task_ids") or []) \
                if existing and existing["status"] in ("open", "ignored") else set()
            new = [r for r in slow if r[0] not in known]
            if not new:
                continue
            details = {"kind": "latency", "stage": new[0][3], "batch_id": batch_id,
                       "task_ids": [r[0] for r in new], "task_keys": [r[2] for r in new],
                       "threshold": threshold, "longest": now - min(r[4] for r in slow)}
            self.raise_alert(key, "MEDIUM", details, batch_id=batch_id, increment=len(new))
            flagged += len(new)
        return flagged

    # -- alerts ------------------------------------------------------------------------------

    def raise_alert(self, key: str, tier: str, details: dict[str, Any], *,
                    batch_id: str | None = None, task_id: int | None = None,
                    mentions: list[str] | None = None, increment: int = 1) -> dict[str, Any]:
        """Record one occurrence of alert ``key``: a new card, or a count on the open one."""
        now = self.clock.now()
        silence = silenced_until(self.db, key, now)
        details = dict(details)
        if mentions is not None:
            details["mentions"] = mentions
        if details.get("pipeline") is None and batch_id:
            details["pipeline"] = self._pipeline_of(batch_id)
        holder = self._holder(batch_id) if tier == "MEDIUM" else None
        superseded = None
        with transaction(self.db) as conn:
            alert = _load_in(conn, key)
            grouped = (alert is not None and alert["status"] in ("open", "ignored")
                       and now - alert["first_at"] < self.settings.alerts.group_window)
            if grouped:
                alert["count"] += increment
                alert["last_at"] = now
                alert["tier"] = _at_least(tier, alert["tier"])
                _merge(alert["details"], details)
            else:
                superseded = _supersede(alert, now, self.lang)
                alert = {"key": key, "tier": tier, "status": "open", "count": increment,
                         "first_at": now, "last_at": now, "resolved_at": None,
                         "message_uuid": None, "batch_id": batch_id, "task_id": task_id,
                         "details": details}
            if silence is not None:
                alert["details"]["suppressed"] = alert["details"].get("suppressed", 0) + increment
                alert["details"]["silenced_until"] = silence
            send = (alert["message_uuid"] is None and silence is None
                    and alert["status"] == "open")
            if send and holder is not None:  # one cause, one card: the HIGH card holds it
                alert["details"]["held_by"] = holder
                send = False
            elif alert["details"].get("held_by") and alert["message_uuid"] is None:
                alert["details"].pop("held_by")  # its holder is gone: it goes out on its own
            if alert["tier"] in ("HIGH", "CRITICAL"):
                alert["details"]["held"] = held_by(conn, key)
            chat = scoped(self.settings, alert).feishu.alert_chat_id
            if send and chat:
                alert["message_uuid"] = _uuid("al", key, alert["first_at"])
            _save_in(conn, alert)
        self.stats[tier] += increment
        if superseded is not None:  # the earlier card must not stay open with live buttons
            enqueue_patch(self.db, superseded["message_uuid"],
                          alert_cards.alert_card(superseded, self.lang, self.settings.tz),
                          now=now, ref=key, interval=self.patch_interval)
        card = alert_cards.alert_card(alert, self.lang, self.settings.tz, silenced_until=silence)
        if send and chat:
            outbox.enqueue(self.db, "send", chat, {"card": card}, now=now,
                           uuid=alert["message_uuid"], ref=key)
        elif alert["message_uuid"]:
            enqueue_patch(self.db, alert["message_uuid"], card, now=now, ref=key,
                          interval=self.patch_interval)
        if alert["details"].get("held_by"):
            self.stats["held"] += increment
            refresh_holder(self.db, self.settings, holder, now=now,
                           patch_interval=self.patch_interval)
        if silence is not None:
            self.stats["silenced"] += increment
        elif send and not chat:
            log.warning("no alert chat configured (FEISHU_ALERT_CHAT_ID); alert stored only",
                        extra={"alert_key": key, "tier": tier})
        return alert

    def _holder(self, batch_id: str | None) -> str | None:
        """The key of the HIGH alert that stands for this batch's cause (see the module
        docstring), or None: the batch's open ``blocked`` alert, else ``canary`` for a canary
        batch."""
        if not batch_id:
            return None
        for alert in open_alerts(self.db, batch_id=batch_id, kinds=("blocked",)):
            return alert["key"]
        source = queue.batch_field(self.db, batch_id, "source")
        return CANARY_KEY if source == "canary" else None

    def _task_failed(self, task: dict[str, Any], decision: Any | None,
                     error: BaseException | None) -> None:
        tier = getattr(decision, "tier", None) or "MEDIUM"
        error_class = (getattr(decision, "error_class", None) or task.get("error_class")
                       or "unknown")
        if tier == "LOW":  # a rule said failures of this kind are not worth a message
            self.stats["LOW"] += 1
            return
        # the quality gate runs between coze and synthesis; its failures are its own stage
        stage = "gate" if error_class == "quality" else (task.get("stage") or "coze")
        attempts = queue.attempt_count(self.db, task["id"])
        details = {"kind": "task_failed", "stage": stage, "error_class": error_class,
                   "reason": getattr(decision, "reason", None) or "",
                   "error_code": task.get("error_code") or _code(error),
                   "error_message": task.get("error_message") or _message(error),
                   "task_id": task["id"], "task_key": task.get("task_key"),
                   "task_ids": [task["id"]], "task_keys": [task.get("task_key")],
                   "batch_id": task["batch_id"], "attempts": attempts or task.get("attempts"),
                   "debug_url": task.get("debug_url")}
        self.raise_alert(f"{task['batch_id']}:{stage}:{error_class}", tier, details,
                         batch_id=task["batch_id"], task_id=task["id"])

    def _task_succeeded(self, task: dict[str, Any]) -> None:
        """Resolve MEDIUM alerts all of whose tasks have now succeeded (or were dropped)."""
        for alert in open_alerts(self.db, batch_id=task["batch_id"],
                                 kinds=("task_failed", "latency")):
            ids = alert["details"].get("task_ids") or []
            if task["id"] not in ids:
                continue
            left = queue.count_with_status(self.db, ids, TASK_DONE_OK, negate=True)
            if alert["details"].get("kind") == "latency":
                left = queue.count_with_status(self.db, ids, ("running",))
            if left == 0:
                resolve_alert(self.db, self.settings, alert["key"], now=self.clock.now(),
                              patch_interval=self.patch_interval)

    def _check_failure_rate(self, *, resolve_only: bool = False) -> None:
        """The failure rate of each pipeline's tasks (one pipeline: of every task)."""
        now = self.clock.now()
        if now - self._rate_checked_at < self.rate_check_interval:
            return
        self._rate_checked_at = now
        a = self.settings.alerts
        many = getattr(self.settings, "many_pipelines", False)
        for spec in self.settings.pipelines if many else (None,):
            pipeline = spec.name if spec is not None else None
            n, failed = queue.finished_since(self.db, now - a.failure_rate_window,
                                             pipelines=(pipeline,) if many else None)
            rate = failed / n if n else 0.0
            over = n >= a.failure_rate_min_tasks and rate > a.failure_rate_threshold
            key = pipeline_key(self.settings, "failure_rate", pipeline)
            if over and not resolve_only:
                details = {"kind": "failure_rate", "n": n, "failed": failed, "rate": rate,
                           "window": a.failure_rate_window,
                           "threshold": a.failure_rate_threshold,
                           "blocked": self._open_batches(pipeline), "since": now,
                           "pipeline": pipeline}
                self.raise_alert(key, "CRITICAL", details,
                                 mentions=everyone(scoped(self.settings, pipeline)))
            elif not over:
                resolve_alert(self.db, self.settings, key, now=now,
                              patch_interval=self.patch_interval)

    # -- batch helpers -----------------------------------------------------------------------

    def _progress_target(self, batch: dict[str, Any], now: float) -> str | None:
        """Where the batch's progress card lives (creating it when needed); None: no chat."""
        if batch.get("progress_message_id"):
            return batch["progress_message_id"]
        if batch.get("command_message_id"):
            target = outbox.reply_uuid(  # the run command's reply carries this uuid
                batch["command_message_id"])
        elif batch.get("chat_id"):
            counts = queue.batch_counts(self.db, batch["id"])
            card = alert_cards.progress_card(batch, counts, [], self.lang, now)
            target = outbox.enqueue(self.db, "send", batch["chat_id"], {"card": card}, now=now,
                                    uuid=_uuid("pg", batch["id"]), ref=batch["id"])
        else:
            return None
        queue.set_progress_message(self.db, batch["id"], target)
        return target

    def _failures_by_class(self, batch_id: str) -> list[tuple[str, int]]:
        return failures_by_class(self.db, batch_id)

    def _failure_groups(self, batch_id: str) -> list[dict[str, Any]]:
        return failure_groups(self.db, batch_id)

    def _open_batches(self, pipeline: str | None = None) -> list[str]:
        """Open batches (of ``pipeline`` when there are several pipelines)."""
        many = pipeline and getattr(self.settings, "many_pipelines", False)
        return queue.batch_ids_with_status(self.db, OPEN_BATCH,
                                           pipelines=(pipeline,) if many else None)

    def _pipeline_of(self, batch_id: str | None) -> str | None:
        return queue.batch_field(self.db, batch_id, "pipeline") if batch_id else None

    def _pipelines_of_service(self, service: str) -> list[str | None]:
        """The pipelines on the Coze account whose breaker is ``service`` ([None]: settings
        without pipelines, or a service that is no account's)."""
        accounts = getattr(self.settings, "accounts", ())
        names = [a.name for a in accounts if a.breaker_service == service]
        found = [s.name for s in getattr(self.settings, "pipelines", ())
                 if s.coze_account in names]
        return found or [None]

    def _batch_status(self, batch_id: str | None) -> str | None:
        if not batch_id:
            return None
        return queue.batch_field(self.db, batch_id, "status")


def _supersede(alert: dict[str, Any] | None, now: float, lang: str) -> dict[str, Any] | None:
    """An open, sent alert that fired again after the group window is closed: the row goes to
    the new occurrence, so the old card is patched to say a newer card took over (returned
    for that patch; None when there is no such card)."""
    if alert is None or alert["status"] != "open" or not alert.get("message_uuid"):
        return None
    old = {**alert, "details": dict(alert["details"]), "status": "resolved", "resolved_at": now}
    old["details"]["actions"] = list(alert["details"].get("actions") or [])
    _add_action(old, {"by": None, "text": alert_cards.tr("n.superseded", lang)}, now)
    return old


def _merge(into: dict[str, Any], new: dict[str, Any]) -> None:
    """Fold a new occurrence into an alert's details.

    Task lists grow (no duplicates; the shown keys are capped); for a failed-task alert the
    first task's fields stay (the card describes the first, and counts the rest); for the other
    kinds the live numbers are replaced but ``since`` stays.
    """
    ids = into.setdefault("task_ids", [])
    keys = into.setdefault("task_keys", [])
    seen = set(ids)
    for tid, tkey in zip(new.get("task_ids") or [], new.get("task_keys") or []):
        if tid in seen:
            continue
        seen.add(tid)
        ids.append(tid)
        if len(keys) < alert_cards.LIST_LIMIT:
            keys.append(tkey)
    if new.get("kind") == "task_failed":
        return
    for k, v in new.items():
        if k not in ("since", "task_ids", "task_keys"):
            into[k] = v


def _at_least(tier: str | None, floor: str) -> str:
    tier = tier if tier in TIERS else floor
    return tier if TIERS.index(tier) >= TIERS.index(floor) else floor


def _code(error: BaseException | None) -> str | None:
    code = getattr(error, "code", None)
    return str(code) if code not in (None, "") else None


def _message(error: BaseException | None) -> str | None:
    if error is None:
        return None
    return str(getattr(error, "message", None) or error)[:500]

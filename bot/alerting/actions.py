"""Buttons on alert and batch cards: what each one does, as one self-contained function.

:func:`handle_alert_action` takes the button's value (an object with ``action`` plus ids, as the
cards in :mod:`bot.alerting.cards` build them) and returns the ``card.action.trigger`` answer:
``{"toast": {"type", "content"}, "card": {"type": "raw", "data": card}}``, the card being the
clicked alert (or batch) card in its new state. Feishu waits 3 s for it; everything here is a
few SQLite statements, and outgoing messages (resolved notices, patches of other cards) only go
to the outbox.

Actions (values)::

    retry        {"task_id", "key"?}   requeue the alert's failed tasks (or the one task)
    retry_batch  {"batch_id"}          requeue every failed task of the batch
    ignore       {"task_id"?, "key"?}  failed tasks -> ignored; open alert -> ignored
    silence      {"key", "seconds"?}   silence the key (default alerts.default_silence)
    resume       {"batch_id", "key"?}  blocked/paused -> running; for a blocked batch close
                                       every breaker and resolve the batch's HIGH card and
                                       breaker cards (a paused one leaves breakers alone)
    cancel       {"batch_id", "key"?}  cancel the batch; its open alerts -> ignored
    status       {"batch_id"}          read only: the batch's counts (anyone may press it)

Retry is one code path with the chat command ``retry`` (:func:`retry_tasks`,
:func:`retry_batch`): the failed tasks are queued again and every open failed-task alert left
with no failed task is resolved (its card turns green and notes who retried; one resolved
notice). A retried task that fails again raises a new card.

Authorisation is the caller's job (only ``FEISHU_ADMIN_IDS`` may press, except the actions in
:data:`READ_ONLY`). Double clicks and old
cards are safe by state checks, not by memory: an action whose precondition no longer holds (the
task is not failed any more, the batch is not blocked, the key is already silenced for as long)
changes nothing and says why, with toast type ``info``.
"""
from __future__ import annotations

from datetime import datetime
from typing import Any, Callable

from pipeline.breaker import reset_all
from storage import alerts as store_alerts, breakers, queue
from storage.db import Conflict, NotFound, transaction

from bot.alerting.cards import tr
from bot.alerting.router import (_add_action, _load_in, _save_in, alert_card_for, batch_card,
                     enqueue_patch, load_alert, open_alerts, refresh_pending_patch,
                     resolve_alert, resolve_batch_unblocked, silenced_until)
from bot.feishu.bitable_sync import mark_cancelled
from bot.chat.cards import toast
from bot.chat.i18n import not_found, status_word, t
from bot.chat.mdtext import code, escape

MIN_SILENCE = 60.0
MAX_SILENCE = 30 * 86400.0


class _Ctx:
    def __init__(self, db, settings, value: dict[str, Any], operator: str, clock) -> None:
        self.db, self.settings, self.value, self.operator = db, settings, value, operator
        self.now = clock.now()
        self.lang = settings.language


Result = tuple[bool, str]


def handle_alert_action(db, settings, value: dict[str, Any], operator_open_id: str,
                        clock) -> dict[str, Any]:
    """Perform one button press; return the callback answer (toast + updated card).

    ``value`` is the button's value object; ``operator_open_id`` who pressed (recorded on the
    card); ``clock.now()`` gives Unix seconds. Never raises for bad input: an unknown action, a
    missing id or an unknown task/batch answers an error toast and changes nothing.
    """
    ctx = _Ctx(db, settings, value if isinstance(value, dict) else {}, operator_open_id, clock)
    name = str(ctx.value.get("action", ""))
    action = ACTIONS.get(name)
    if action is None:
        return toast("error", tr("a.unknown", ctx.lang, action=name or "-"))
    try:
        ok, text = action(ctx)
    except NotFound as exc:
        return toast("error", not_found(exc, ctx.lang))
    except (KeyError, ValueError, TypeError) as exc:
        return toast("error", tr("a.failed", ctx.lang,
                                  error=escape(f"{type(exc).__name__}: {exc}"[:200])))
    answer = toast("success" if ok else "info", text)
    card, target = _current_card(ctx)
    if card is not None:
        answer["card"] = {"type": "raw", "data": card}
        if target:
            # A patch still waiting for this card carries its state from before the click and
            # would revert the answer's card when delivered: it must carry the new card.
            refresh_pending_patch(ctx.db, target, card, now=ctx.now,
                                  ref=str(ctx.value.get("key") or ctx.value.get("batch_id")))
    return answer


def _current_card(ctx: _Ctx) -> tuple[dict[str, Any] | None, str | None]:
    """The clicked card as it should look now (the alert's, else the batch's) and the outbox
    target its later patches use (None when unknown)."""
    key = ctx.value.get("key")
    if key:
        alert = load_alert(ctx.db, str(key))
        if alert is not None:
            return alert_card_for(ctx.db, ctx.settings, alert, ctx.now), alert.get("message_uuid")
    batch_id = ctx.value.get("batch_id")
    if batch_id:
        try:
            card = batch_card(ctx.db, ctx.settings, str(batch_id), ctx.now)
        except NotFound:
            return None, None
        return card, queue.get_batch(ctx.db, str(batch_id)).get("progress_message_id")
    return None, None


def _note(ctx: _Ctx, key: Any, text: str, *, status: str | None = None) -> None:
    """Record who did what on the alert ``key`` (and optionally change its status)."""
    if key:
        _note_alert(ctx.db, str(key), {"by": ctx.operator, "text": text}, ctx.now, status=status)


def _alert_task_ids(ctx: _Ctx) -> list[int]:
    """The tasks a button acts on: every task of its alert, else the one ``task_id``."""
    key = ctx.value.get("key")
    alert = load_alert(ctx.db, str(key)) if key else None
    if alert and alert["details"].get("task_ids"):
        return [int(i) for i in alert["details"]["task_ids"]]
    if ctx.value.get("task_id") is None:
        raise KeyError("task_id")
    task = queue.get_task(ctx.db, int(ctx.value["task_id"]))  # NotFound for an unknown task
    return [task["id"]]


def _ids_with_status(db, ids: list[int], status: str) -> list[int]:
    return queue.ids_with_status(db, ids, (status,))


def _moved_on(db, lang: str, ids: list[int]) -> str:
    if not ids:
        return tr("a.nothing_failed", lang)
    task = queue.get_task(db, ids[0])
    return tr("a.moved_on", lang, task=code(task["task_key"]),
              status=status_word(task["status"], lang))


# --- the actions ------------------------------------------------------------------------------

def _retry(ctx: _Ctx) -> Result:
    return retry_tasks(ctx.db, ctx.settings, _alert_task_ids(ctx), now=ctx.now, by=ctx.operator)


def _retry_batch(ctx: _Ctx) -> Result:
    return retry_batch(ctx.db, ctx.settings, str(ctx.value["batch_id"]), now=ctx.now,
                       by=ctx.operator)


def _status(ctx: _Ctx) -> Result:
    batch = queue.get_batch(ctx.db, str(ctx.value["batch_id"]))
    counts = queue.batch_counts(ctx.db, batch["id"])
    return True, t("status.batch", ctx.lang, batch_id=batch["id"],
                   status=status_word(batch["status"], ctx.lang)) + " " + \
        t("status.counts", ctx.lang, **counts)


def _ignore(ctx: _Ctx) -> Result:
    ids = _alert_task_ids(ctx)
    key = ctx.value.get("key")
    n = queue.ignore_failed(ctx.db, ids)
    alert = load_alert(ctx.db, str(key)) if key else None
    alert_changed = alert is not None and alert["status"] == "open"
    if alert_changed:
        _note(ctx, key, tr("n.ignore", ctx.lang), status="ignored")
    if not n and not alert_changed:
        return False, tr("a.already", ctx.lang)
    return True, tr("a.ignored", ctx.lang, n=n)


def _silence(ctx: _Ctx) -> Result:
    key = str(ctx.value["key"])
    if not key:
        raise ValueError("empty key")
    seconds = float(ctx.value.get("seconds") or ctx.settings.alerts.default_silence)
    seconds = min(max(seconds, MIN_SILENCE), MAX_SILENCE)
    until = ctx.now + seconds
    current = silenced_until(ctx.db, key, ctx.now)
    if current is not None and current >= until - MIN_SILENCE:  # a second click, or longer
        return False, tr("a.already_silenced", ctx.lang, key=code(key),
                         until=_local(ctx, current))
    store_alerts.put_silence(ctx.db, key, until, by=ctx.operator, now=ctx.now)
    _note(ctx, key, tr("n.silence", ctx.lang, until=_local(ctx, until)))
    return True, tr("a.silenced", ctx.lang, key=code(key), until=_local(ctx, until))


def _resume(ctx: _Ctx) -> Result:
    return resume_batch(ctx.db, ctx.settings, str(ctx.value["batch_id"]), now=ctx.now,
                        by=ctx.operator, patch_card=False)


def _cancel(ctx: _Ctx) -> Result:
    return cancel_batch(ctx.db, ctx.settings, str(ctx.value["batch_id"]), now=ctx.now,
                        by=ctx.operator, shown_key=ctx.value.get("key"), patch_card=False)


# --- shared with the chat commands (bot.chat.handlers): a command does what its button does --------

def retry_tasks(db, settings, task_ids: list[int], *, now: float, by: str,
                statuses: tuple[str, ...] = ("failed",)) -> Result:
    """Queue again those of ``task_ids`` whose status is in ``statuses``, then resolve every
    open failed-task alert that has no failed task left (the others get a note)."""
    lang = settings.language
    wanted = queue.ids_with_status(db, task_ids, statuses)
    n = queue.requeue_tasks(db, wanted, now=now) if wanted else 0
    if not n:   # nothing in a state to retry (a double click, an old card)
        return False, _moved_on(db, lang, list(task_ids))
    note = {"by": by, "text": tr("n.retry", lang, n=n)}
    requeued = set(wanted)
    for alert in open_alerts(db, kinds=("task_failed",)):
        ids = [int(i) for i in alert["details"].get("task_ids") or []]
        if not requeued.intersection(ids):
            continue
        if _ids_with_status(db, ids, "failed"):
            _note_alert(db, alert["key"], note, now)
        else:
            resolve_alert(db, settings, alert["key"], now=now, note=note)
    return True, tr("a.retried", lang, n=n)


def retry_batch(db, settings, batch_id: str, *, now: float, by: str) -> Result:
    """Queue again every failed task of ``batch_id`` (see :func:`retry_tasks`). Raises
    NotFound for an unknown batch."""
    batch = queue.get_batch(db, batch_id)
    failed = [task["id"] for task in queue.tasks_of(db, batch["id"], ["failed"])]
    if not failed:
        return False, tr("a.nothing_failed", settings.language)
    return retry_tasks(db, settings, failed, now=now, by=by)


def resume_batch(db, settings, batch_id: str | None, *, now: float, by: str,
                 patch_card: bool = True, pipelines: tuple[str, ...] | None = None) -> Result:
    """Resume ``batch_id`` (None: the latest blocked, else paused, batch, of ``pipelines`` when
    given). Raises NotFound. ``patch_card``: patch the batch's progress card (a button's answer
    already shows it).

    Breakers are reset only when a human vouches for the cause of a fatal stop: resuming a
    *blocked* batch, a ``resume`` without a batch, or a resume of a batch that was not stopped
    while breakers are open and no batch is blocked (new batches would stay queued forever).
    Resuming a *paused* batch leaves a breaker tripped by a fatal error alone. With several
    pipelines only the breakers of the Coze accounts concerned close: the batch's, or those of
    ``pipelines``.
    """
    lang = settings.language
    explicit = batch_id is not None
    if batch_id is None:
        batch_id = _latest_stopped(db, pipelines=pipelines)
        if batch_id is None:
            return _reset_breakers(db, settings, now=now, by=by,
                                   services=_pipelines_breakers(settings, pipelines)) or \
                (False, tr("a.nothing_to_resume", lang))
    try:
        previous = queue.set_batch_status(db, batch_id, "running", now=now,
                                          allowed_from=("blocked", "paused"))
    except Conflict:
        status = queue.get_batch(db, batch_id)["status"]
        services = _account_breaker(db, settings, batch_id)
        if status in ("queued", "running") and not _latest_stopped(
                db, ("blocked",), pipelines=_account_pipelines(settings, services)):
            reset = _reset_breakers(db, settings, now=now, by=by, services=services)
            if reset is not None:
                return reset
        return False, tr("a.not_blocked", lang, batch_id=escape(batch_id),
                         status=status_word(status, lang))
    reset = previous == "blocked" or (not explicit and _open_breakers(
        db, _account_breaker(db, settings, batch_id)))
    if reset:
        # The human vouches that the cause (token, balance) is fixed: every breaker closes;
        # with several pipelines, only the breaker of the batch's Coze account.
        services = _account_breaker(db, settings, batch_id)
        reset_all(db, now, services)
        resolve_batch_unblocked(db, settings, batch_id, now=now, by=by, services=services)
    if patch_card:
        _patch_batch_card(db, settings, batch_id, now)
    key = "a.resumed" if reset else "a.resumed_paused"
    return True, tr(key, lang, batch_id=escape(batch_id), previous=status_word(previous, lang),
                    status=status_word("running", lang))


def cancel_batch(db, settings, batch_id: str, *, now: float, by: str,
                 shown_key: Any = None, patch_card: bool = True) -> Result:
    """Cancel ``batch_id``; its open alerts become ignored and their cards are patched (except
    ``shown_key``, the card whose button answer already shows it); with ``patch_card`` the
    batch's progress card too. Raises NotFound."""
    lang = settings.language
    try:
        queue.set_batch_status(db, batch_id, "cancelled", now=now,
                               allowed_from=queue.BATCH_OPEN)
    except Conflict:
        status = queue.get_batch(db, batch_id)["status"]
        return False, tr("a.cannot_cancel", lang, batch_id=escape(batch_id),
                         status=status_word(status, lang))
    mark_cancelled(db, settings, batch_id, now)  # their Bitable rows become pending again
    note = {"by": by, "text": tr("n.cancel", lang)}
    for alert in open_alerts(db, batch_id=batch_id):
        _note_alert(db, alert["key"], note, now, status="ignored")
        if alert.get("message_uuid") and alert["key"] != shown_key:
            fresh = load_alert(db, alert["key"])
            enqueue_patch(db, alert["message_uuid"],
                          alert_card_for(db, settings, fresh, now), now=now, ref=alert["key"])
    if patch_card:
        _patch_batch_card(db, settings, batch_id, now)
    return True, tr("a.cancelled", lang, batch_id=escape(batch_id))


def _latest_stopped(db, statuses: tuple[str, ...] = ("blocked", "paused"), *,
                    pipelines: tuple[str, ...] | None = None) -> str | None:
    """The latest batch (of ``pipelines`` when given) in the first of ``statuses`` that has one
    (blocked before paused)."""
    for status in statuses:
        batch_id = queue.latest_batch_id_with_status(db, status, pipelines)
        if batch_id:
            return batch_id
    return None


def _account_breaker(db, settings, batch_id: str) -> tuple[str, ...] | None:
    """With several pipelines: the breaker of the batch's pipeline's Coze account (None: all)."""
    if not getattr(settings, "many_pipelines", False):
        return None
    spec = settings.pipeline_of(queue.batch_field(db, batch_id, "pipeline"))
    if spec is None:
        return None
    return (settings.account(spec.coze_account).breaker_service,)


def _pipelines_breakers(settings, pipelines: tuple[str, ...] | None) -> tuple[str, ...] | None:
    """The breakers of the Coze accounts of ``pipelines`` (None: every breaker)."""
    if pipelines is None or not getattr(settings, "many_pipelines", False):
        return None
    accounts = {s.coze_account for s in settings.pipelines if s.name in pipelines}
    return tuple(a.breaker_service for a in settings.accounts if a.name in accounts)


def _account_pipelines(settings, services: tuple[str, ...] | None) -> tuple[str, ...] | None:
    """The pipelines on the Coze accounts whose breakers are ``services`` (None: every one)."""
    if services is None:
        return None
    accounts = {a.name for a in settings.accounts if a.breaker_service in services}
    return tuple(s.name for s in settings.pipelines if s.coze_account in accounts)


def _open_breakers(db, services: tuple[str, ...] | None = None) -> list[str]:
    return [s for s in breakers.not_closed(db) if services is None or s in services]


def _reset_breakers(db, settings, *, now: float, by: str,
                    services: tuple[str, ...] | None = None) -> Result | None:
    """Close open breakers (of ``services`` when given), resolving their cards; None when
    they are all closed."""
    opened = _open_breakers(db, services)
    if not opened:
        return None
    reset_all(db, now, tuple(opened))
    note = {"by": by, "text": tr("n.reset", settings.language)}
    for alert in open_alerts(db, kinds=("breaker",)):
        if services is None or alert["details"].get("service") in opened:
            resolve_alert(db, settings, alert["key"], now=now, note=note)
    return True, tr("a.breakers_reset", settings.language,
                    services=escape(", ".join(opened)))


def _patch_batch_card(db, settings, batch_id: str, now: float) -> None:
    """Show the new state on the batch's progress card (a command has no answer card)."""
    target = queue.get_batch(db, batch_id).get("progress_message_id")
    if target:
        enqueue_patch(db, target, batch_card(db, settings, batch_id, now), now=now, ref=batch_id)


def _note_alert(db, key: str, note: dict[str, Any], now: float, *,
                status: str | None = None) -> None:
    with transaction(db) as conn:
        alert = _load_in(conn, key)
        if alert is None:
            return
        _add_action(alert, note, now)
        if status and alert["status"] == "open":
            alert["status"] = status
        _save_in(conn, alert)


def _local(ctx: _Ctx, ts: float) -> str:
    return datetime.fromtimestamp(ts, ctx.settings.tz).strftime("%Y-%m-%d %H:%M")


ACTIONS: dict[str, Callable[[_Ctx], Result]] = {
    "retry": _retry, "retry_batch": _retry_batch, "ignore": _ignore, "silence": _silence,
    "resume": _resume, "cancel": _cancel, "status": _status,
}
READ_ONLY = frozenset({"status"})   # anyone in the chat may press these

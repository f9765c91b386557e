"""Executing chat commands and card clicks against the store.

Entry points
- :func:`process_inbox` — claim recorded message events (one by key, or the oldest due ones) and
  handle each once. The web process's dispatcher calls it right after recording a message; the
  worker calls it as a fallback for rows a dying web process left behind (leases expire).
  A group message that does not @ the bot (by the bot's open_id as stored now, see
  :func:`for_the_bot`) is finished without a reply.
- :func:`handle_card_action` — answer a ``card.action.trigger`` synchronously (Feishu waits 3 s).

Every command answers with a card *reply* enqueued in the outbox under ``uuid = "r-" +
message_id``: handling the same message again (a crash before ``inbox.finish``) enqueues nothing
new, and Feishu dedupes the send by that uuid too. ``run`` derives its batch id from the message
id for the same reason: a re-run finds the batch it already created.

Authorisation: commands that change anything (``commands.MUTATING``) and every button except
``status`` need the sender's open_id in the admins of the pipeline concerned (``admin_ids`` of
its ``[[pipelines]]`` entry; ``FEISHU_ADMIN_IDS`` for the default pipeline): the named pipeline,
the target batch's or task's, else the pipelines of the chat the command came from (any of
their admins), else any pipeline's. Others get a refusal that names the admins. Nothing is
written for a refused request except the refusal reply.

Many pipelines (:mod:`bot.settings`): ``run`` without a name runs the pipeline whose alert
chat the command came from (the only pipeline, when there is one), else answers with the names;
``status`` / ``errors`` in a chat show that chat's pipelines' batches.
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Callable

from storage import alerts as store_alerts, breakers, inbox, outbox, queue
from storage.db import Conflict, NotFound
from storage.outbox import reply_uuid

from bot.alerting.actions import (ACTIONS, READ_ONLY, cancel_batch, handle_alert_action,
                                  resume_batch, retry_batch, retry_tasks)
from bot.alerting.report import build_report_card, parse_day
from bot.chat import cards
from bot.chat.addressing import addressed_to_bot
from bot.chat.cards import toast
from bot.chat.commands import BATCH_ID, Command, ParseError, parse
from bot.chat.i18n import not_found, status_word, t
from bot.chat.identity import bot_open_id
from bot.chat.mdtext import escape
from bot.errors import FeishuError
from bot.feishu.bitable_sync import mark_running

log = logging.getLogger("opsbot.handlers")

MAX_HANDLE_ATTEMPTS = 3     # an inbox row failing this often is finished as failed
ERRORS_DEFAULT_LIMIT = 10
RETRYABLE_STATUSES = ("failed", "ignored", "cancelled")


@dataclass(frozen=True)
class Context:
    """Who asked, where, and what to use while handling one command."""

    db: Any
    settings: Any
    feishu: Any
    clock: Any
    sender: str
    chat_id: str
    message_id: str

    @property
    def lang(self) -> str:
        return self.settings.language

    @property
    def now(self) -> float:
        return self.clock.now()


# --- the inbox loop ---------------------------------------------------------------------------

def process_inbox(db, settings, feishu_client, clock, owner: str, *, key: str | None = None,
                  limit: int = 10, lease: float = 60.0) -> int:
    """Claim and handle recorded events; return how many rows were claimed.

    A row whose handling raises stays claimed until its lease expires, then is tried again; after
    :data:`MAX_HANDLE_ATTEMPTS` it is finished as failed (logged, never retried forever).
    """
    rows = inbox.claim(db, owner=owner, now=clock.now(), lease=lease, key=key, limit=limit)
    for row in rows:
        try:
            if row["event_type"] == "im.message.receive_v1":
                if for_the_bot(db, settings, row["payload"]):
                    handle_message(db, settings, feishu_client, clock, row["payload"])
                else:
                    log.info("inbox row %s does not @ the bot: no reply", row["key"])
            inbox.finish(db, row["key"], now=clock.now())
        except Exception as exc:  # noqa: BLE001 - one bad row must not stop the others
            log.exception("inbox row %s failed (attempt %s)", row["key"], row["attempts"])
            if row["attempts"] >= MAX_HANDLE_ATTEMPTS:
                inbox.finish(db, row["key"], now=clock.now(), error=repr(exc)[:500])
    return len(rows)


def for_the_bot(db, settings, payload: dict[str, Any]) -> bool:
    """Whether a recorded message is for the bot, by the bot's open_id as stored *now*.

    The intake already filtered with what it knew when the message came in; a message recorded
    before the worker's first identity lookup (by the older rule, which also takes "@Alice run")
    is checked again here, so the rule that holds when a command runs is the current one.
    """
    event = payload.get("event") if isinstance(payload, dict) else None
    message = event.get("message") if isinstance(event, dict) else None
    if not isinstance(message, dict):
        return True  # malformed rows fail in handle_message, as before
    return addressed_to_bot(message, bot_open_id(db, settings.feishu.app_id))


def message_text(message: dict[str, Any]) -> str:
    """The plain text of a ``text`` or ``post`` message ('' when there is none)."""
    try:
        content = json.loads(message.get("content") or "{}")
    except (TypeError, ValueError):
        return ""
    if not isinstance(content, dict):
        return ""
    if message.get("message_type") == "text":
        return str(content.get("text") or "")
    body = content if "content" in content else next(
        (v for v in content.values() if isinstance(v, dict)), {})
    parts = [str(el.get("text", "")) for para in body.get("content") or [] if isinstance(para, list)
             for el in para if isinstance(el, dict) and el.get("tag") in ("text", "a")]
    return " ".join(parts)


def handle_message(db, settings, feishu_client, clock, payload: dict[str, Any]) -> dict[str, Any]:
    """Parse and execute the command in a message event; enqueue the reply card; return it."""
    event = payload["event"]
    message = event["message"]
    ctx = Context(db, settings, feishu_client, clock,
                  sender=((event.get("sender") or {}).get("sender_id") or {}).get("open_id", ""),
                  chat_id=message.get("chat_id", ""), message_id=message["message_id"])
    card = execute(ctx, parse(message_text(message), pipeline_words(settings)))
    outbox.enqueue(db, "reply", ctx.message_id, {"card": card}, now=clock.now(),
                   uuid=reply_uuid(ctx.message_id), ref=ctx.chat_id or None)
    return card


def pipeline_words(settings) -> dict[str, str]:
    """``{name or alias, lower case: pipeline name}`` of every pipeline (the parser's table)."""
    return {word.lower(): spec.name for spec in settings.pipelines for word in spec.names}


def pipeline_names(settings) -> str:
    """``drama (短剧), news`` for cards."""
    return ", ".join(spec.name + (f" ({', '.join(spec.aliases)})" if spec.aliases else "")
                     for spec in settings.pipelines)


def is_admin(settings, open_id: str, admins: tuple[str, ...] | None = None) -> bool:
    return bool(open_id) and open_id in (settings.feishu.admin_ids if admins is None
                                         else admins)


def batch_pipeline(db, batch_id: str | None) -> str | None:
    """The pipeline of batch ``batch_id`` (None when there is no such batch)."""
    return queue.batch_field(db, batch_id, "pipeline") if batch_id else None


def admins_for(ctx: Context, cmd: Command) -> tuple[str, ...]:
    """Who may run ``cmd`` (see the module docstring)."""
    settings = ctx.settings
    if not settings.many_pipelines:
        return settings.feishu.admin_ids
    name = cmd.pipeline
    if name is None and cmd.batch_id:
        name = batch_pipeline(ctx.db, cmd.batch_id)
    if name is None and cmd.task_ref:
        name = batch_pipeline(ctx.db, cmd.task_ref) if _names_batch(ctx.db, cmd.task_ref) \
            else _task_pipeline(ctx.db, cmd.task_ref, _chat_scope(ctx, cmd))
    if name is None and cmd.name == "silence" and cmd.key:
        name = _key_pipeline(ctx.db, settings, cmd.key)
    if name is None and cmd.name == "run":
        spec = _run_pipeline(ctx)
        name = spec.name if spec is not None else None
    if name is not None and settings.find_pipeline(name) is not None:
        return settings.scoped(name).feishu.admin_ids
    specs = settings.chat_pipelines(ctx.chat_id) or settings.pipelines
    return tuple(dict.fromkeys(a for spec in specs for a in spec.admin_ids))


def _task_pipeline(db, ref: str, pipelines: tuple[str, ...] | None = None) -> str | None:
    try:
        return batch_pipeline(db, find_task(db, ref, pipelines)["batch_id"])
    except NotFound:
        return None


def _key_pipeline(db, settings, key: str) -> str | None:
    """The one pipeline an alert key (``silence KEY``) is about: the stored alert's, else the
    batch's its first part names, else the pipeline its last part names (``failure_rate:news``);
    None for a key that covers several (``failure_rate``, ``*``)."""
    alert = store_alerts.get(db, key)
    if alert is not None:
        pipeline = alert["details"].get("pipeline") or batch_pipeline(db, alert.get("batch_id"))
        if pipeline:
            return pipeline
    first, _, _ = key.partition(":")
    if BATCH_ID.match(first) and queue.batch_exists(db, first):
        return batch_pipeline(db, first)
    last = key.rpartition(":")[2]
    if ":" in key and any(spec.name == last for spec in settings.pipelines):
        return last
    return None


def execute(ctx: Context, cmd: Command | ParseError) -> dict[str, Any]:
    """Run one parsed command for ``ctx.sender``; return the reply card."""
    if isinstance(cmd, ParseError):
        return cards.help_card(ctx.lang, error=cmd.message(ctx.lang),
                               pipelines=_help_pipelines(ctx.settings))
    if cmd.mutating:
        admins = admins_for(ctx, cmd)
        if not is_admin(ctx.settings, ctx.sender, admins):
            return cards.refusal_card(cmd.name, admins, ctx.lang)
    try:
        return COMMAND_HANDLERS[cmd.name](ctx, cmd)
    except NotFound as exc:
        return cards.error_card(not_found(exc, ctx.lang), ctx.lang)
    except Exception:  # noqa: BLE001 - the sender gets an answer; the traceback goes to the log
        log.exception("command %s failed", cmd.name, extra={"message_id": ctx.message_id})
        return cards.error_card(t("generic.internal", ctx.lang), ctx.lang)


# --- commands ---------------------------------------------------------------------------------

def _help_pipelines(settings) -> str:
    return escape(pipeline_names(settings)) if settings.many_pipelines else ""


def cmd_help(ctx: Context, cmd: Command) -> dict[str, Any]:
    return cards.help_card(ctx.lang, pipelines=_help_pipelines(ctx.settings))


def _run_pipeline(ctx: Context, cmd: Command | None = None) -> Any:
    """The pipeline ``run`` runs: the named one, else the chat's only one, else the only
    pipeline; None when it cannot tell."""
    settings = ctx.settings
    if cmd is not None and cmd.pipeline:
        return settings.find_pipeline(cmd.pipeline)
    here = settings.chat_pipelines(ctx.chat_id)
    if len(here) == 1:
        return here[0]
    specs = settings.pipelines
    return specs[0] if len(specs) == 1 else None


def batch_id_for(message_id: str) -> str:
    """The batch a ``run`` message creates: stable, so handling it twice finds the same batch."""
    return "b" + hashlib.sha256(message_id.encode()).hexdigest()[:8]


def cmd_run(ctx: Context, cmd: Command) -> dict[str, Any]:
    spec = _run_pipeline(ctx, cmd)
    if spec is None:
        return cards.info_card(t("run.which_pipeline", ctx.lang,
                                 names=escape(pipeline_names(ctx.settings))), ctx.lang)
    scoped = ctx.settings.scoped(spec.name)
    f = scoped.feishu
    if spec.name != "default" and not (f.bitable_app_token and f.bitable_table_id):
        return cards.error_card(t("run.pipeline_not_configured", ctx.lang,
                                  pipeline=escape(spec.name)), ctx.lang)
    missing = [name for name, value in (
        ("FEISHU_APP_ID", f.app_id), ("FEISHU_APP_SECRET", f.app_secret),
        ("BITABLE_APP_TOKEN", f.bitable_app_token), ("BITABLE_TABLE_ID", f.bitable_table_id))
        if not value]
    if missing or ctx.feishu is None:
        return cards.error_card(t("run.not_configured", ctx.lang,
                                  vars=", ".join(missing or ["FEISHU_APP_ID"])), ctx.lang)
    batch_id = batch_id_for(ctx.message_id)
    try:  # handled before (a crash between create and finish): answer the same
        queue.get_batch(ctx.db, batch_id)
        return cards.run_queued_card(batch_id, queue.batch_counts(ctx.db, batch_id)["total"],
                                     ctx.lang)
    except NotFound:
        pass
    try:
        records = ctx.feishu.search_records(f.bitable_app_token, f.bitable_table_id,
                                            field_name=f.bitable_status_field,
                                            value=f.bitable_pending_value)
    except FeishuError as exc:
        log.warning("run: Bitable search failed: %s", exc)
        return cards.error_card(t("run.feishu_failed", ctx.lang,
                                  error=escape(f"{exc.code} {exc.msg}".strip())), ctx.lang)
    # rows already queued by an earlier `run` still read as pending until the write-back lands
    active = queue.active_record_ids(ctx.db)
    records = [r for r in records if r.get("record_id") not in active]
    tasks = select_tasks([record_to_task(r, f) for r in records], cmd)
    if not records:
        return cards.info_card(t("run.nothing", ctx.lang, value=f.bitable_pending_value), ctx.lang)
    if not tasks:
        return cards.info_card(t("run.nothing_after_filter", ctx.lang, found=len(records)),
                               ctx.lang)
    options = {k: v for k, v in (("include", list(cmd.include)), ("exclude", list(cmd.exclude)),
                                 ("limit", cmd.limit)) if v}
    try:
        queue.create_batch(ctx.db, tasks, now=ctx.now, source="chat", batch_id=batch_id,
                           chat_id=ctx.chat_id, command_message_id=ctx.message_id,
                           created_by=ctx.sender, workflow_id=spec.workflow_id or None,
                           options=options, pipeline=spec.name)
    except ValueError as exc:
        return cards.error_card(t("run.duplicate", ctx.lang, error=escape(str(exc))), ctx.lang)
    mark_running(ctx.db, scoped, batch_id, ctx.now)
    filters = " ".join(f"--{k} {','.join(map(str, v)) if isinstance(v, list) else v}"
                       for k, v in options.items())
    return cards.run_queued_card(batch_id, len(tasks), ctx.lang, filters=escape(filters),
                                 pipeline=escape(spec.name) if ctx.settings.many_pipelines
                                 else "")


def record_to_task(record: dict[str, Any], f) -> dict[str, Any]:
    """A Bitable record -> a task: key from the task id field (else record_id), rest as params."""
    fields = dict(record.get("fields") or {})
    key = fields.pop(f.bitable_task_id_field, None)
    fields.pop(f.bitable_status_field, None)
    key = str(key).strip() if key not in (None, "", []) else ""
    return {"task_key": key or str(record["record_id"]), "record_id": record.get("record_id"),
            "params": fields}


def select_tasks(tasks: list[dict[str, Any]], cmd: Command) -> list[dict[str, Any]]:
    """Apply --include (keep only these), --exclude (drop these), then --limit (first N)."""
    if cmd.include:
        wanted = set(cmd.include)
        tasks = [x for x in tasks if x["task_key"] in wanted or x["record_id"] in wanted]
    if cmd.exclude:
        unwanted = set(cmd.exclude)
        tasks = [x for x in tasks if x["task_key"] not in unwanted
                 and x["record_id"] not in unwanted]
    return tasks[: cmd.limit] if cmd.limit else tasks


def _chat_scope(ctx: Context, cmd: Command) -> tuple[str, ...] | None:
    """The pipelines a command without a batch looks at: the named one, else the chat's (with
    several pipelines), else all (None)."""
    if cmd.pipeline:
        return (cmd.pipeline,)
    if not ctx.settings.many_pipelines:
        return None
    here = ctx.settings.chat_pipelines(ctx.chat_id)
    return tuple(s.name for s in here) or None


def _target_batch(ctx: Context, batch_id: str | None,
                  pipelines: tuple[str, ...] | None = None) -> dict[str, Any] | None:
    """The named batch (NotFound when unknown), else the latest open one (of ``pipelines``),
    else None."""
    if batch_id:
        return queue.get_batch(ctx.db, batch_id)
    open_ = queue.list_batches(ctx.db, open_only=True, limit=1, pipelines=pipelines)
    return open_[0] if open_ else None


def breaker_rows(db) -> list[dict[str, Any]]:
    return breakers.summaries(db)


def cmd_status(ctx: Context, cmd: Command) -> dict[str, Any]:
    scope = None if cmd.batch_id else _chat_scope(ctx, cmd)
    batch = _target_batch(ctx, cmd.batch_id, scope) or queue.latest_batch(ctx.db, scope)
    if batch is None and cmd.pipeline:
        return cards.info_card(t("status.pipeline_none", ctx.lang,
                                 pipeline=escape(cmd.pipeline)), ctx.lang)
    counts = queue.batch_counts(ctx.db, batch["id"]) if batch else None
    if batch and batch.get("blocked_reason"):  # Coze's error text, shown as markdown
        batch = {**batch, "blocked_reason": escape(batch["blocked_reason"])}
    return cards.status_card(batch, counts, ctx.lang, breakers=breaker_rows(ctx.db),
                             outbox_dead=outbox.dead_count(ctx.db))


BATCH_MOVES: dict[str, tuple[str, tuple[str, ...]]] = {
    "cancel": ("cancelled", ("queued", "running", "paused", "blocked")),
    "pause": ("paused", ("queued", "running")),
    "resume": ("running", ("paused", "blocked")),
}


def move_batch(db, settings, clock, action: str, batch_id: str | None, *,
               by: str = "", pipelines: tuple[str, ...] | None = None) -> tuple[bool, str]:
    """Apply cancel/pause/resume to a batch; returns (changed, user-facing text).

    Cancel and resume are the buttons' own functions (:mod:`bot.alerting.actions`): the same
    alerts resolve, the same breakers reset and the same Bitable rows go back. ``batch_id``
    None is only meaningful for resume (the latest stopped batch, or the breakers alone; of
    ``pipelines`` when given: the chat's).
    """
    lang = settings.language
    now = clock.now()
    try:
        if action == "resume":
            return resume_batch(db, settings, batch_id, now=now, by=by, pipelines=pipelines)
        if action == "cancel":
            return cancel_batch(db, settings, str(batch_id), now=now, by=by)
        status, allowed = BATCH_MOVES[action]
        previous = queue.set_batch_status(db, str(batch_id), status, now=now,
                                          allowed_from=allowed)
    except NotFound:
        return False, t("batch.not_found", lang, batch_id=escape(str(batch_id)))
    except Conflict:
        current = queue.get_batch(db, str(batch_id))["status"]
        return False, t("batch.conflict", lang, batch_id=escape(str(batch_id)),
                        status=status_word(current, lang), action=t("action." + action, lang))
    return True, t("batch.changed", lang, batch_id=batch_id, previous=status_word(previous, lang),
                   status=status_word(status, lang))


def _cmd_move(action: str) -> Callable[[Context, Command], dict[str, Any]]:
    def run(ctx: Context, cmd: Command) -> dict[str, Any]:
        if action == "resume" and not cmd.batch_id:  # the latest stopped batch, or breakers
            changed, text = move_batch(ctx.db, ctx.settings, ctx.clock, action, None,
                                       by=ctx.sender, pipelines=_chat_scope(ctx, cmd))
            return (cards.success_card if changed else cards.info_card)(text, ctx.lang)
        batch = _target_batch(ctx, cmd.batch_id, _chat_scope(ctx, cmd))
        if batch is None:
            return cards.info_card(t("batch.none_open", ctx.lang), ctx.lang)
        changed, text = move_batch(ctx.db, ctx.settings, ctx.clock, action, batch["id"],
                                   by=ctx.sender)
        return (cards.success_card if changed else cards.info_card)(text, ctx.lang)
    return run


def find_task(db, ref: str, pipelines: tuple[str, ...] | None = None) -> dict[str, Any]:
    """The task ``ref`` names: ``#17`` is internal id 17; anything else is a task key (the
    latest task with it, of the batches of ``pipelines`` when given: each pipeline's table
    numbers its rows, so a key alone is ambiguous across pipelines). Bitable task ids are often
    numbers, so a bare number is a key too. Raises NotFound."""
    if ref.startswith("#") and ref[1:].isascii() and ref[1:].isdigit():
        return queue.get_task(db, int(ref[1:]))
    task = queue.latest_task_by_key(db, ref, pipelines)
    if task is None:
        raise NotFound(f"task {ref} not found")
    return task


def retry_task(db, settings, clock, ref: str, *, by: str = "",
               pipelines: tuple[str, ...] | None = None) -> tuple[bool, str]:
    """``retry TASK``: the Retry button's code path (:func:`bot.alerting.actions.retry_tasks`),
    for a task named by the user; a task a human ignored or cancelled may be retried too.
    ``pipelines``: a task key names the newest task of those pipelines (the chat's)."""
    try:
        task = find_task(db, str(ref), pipelines)
    except NotFound:
        return False, t("retry.task_not_found", settings.language, task=escape(ref))
    return retry_tasks(db, settings, [task["id"]], now=clock.now(), by=by,
                       statuses=RETRYABLE_STATUSES)


def _names_batch(db, ref: str | None) -> bool:
    """``retry bXXXX`` means the batch only when a batch by that id exists."""
    if not ref or not BATCH_ID.match(ref):
        return False
    return queue.batch_exists(db, ref)


def cmd_retry(ctx: Context, cmd: Command) -> dict[str, Any]:
    """Retry a task or a batch's failed tasks, as the Retry buttons do (alerts resolve too)."""
    if cmd.batch_id or _names_batch(ctx.db, cmd.task_ref):
        batch_id = cmd.batch_id or cmd.task_ref or ""
        changed, text = retry_batch(ctx.db, ctx.settings, batch_id, now=ctx.now, by=ctx.sender)
    else:
        changed, text = retry_task(ctx.db, ctx.settings, ctx.clock, cmd.task_ref or "",
                                   by=ctx.sender, pipelines=_chat_scope(ctx, cmd))
    return (cards.success_card if changed else cards.info_card)(text, ctx.lang)


def cmd_errors(ctx: Context, cmd: Command) -> dict[str, Any]:
    limit = cmd.limit or ERRORS_DEFAULT_LIMIT
    if cmd.batch_id:
        queue.get_batch(ctx.db, cmd.batch_id)
        rows = queue.failed_tasks(ctx.db, batch_id=cmd.batch_id, limit=limit)
    else:
        rows = queue.failed_tasks(ctx.db, limit=limit, pipelines=_chat_scope(ctx, cmd))
    return cards.errors_card(list(rows), ctx.lang)  # it escapes the Bitable and Coze text


def cmd_report(ctx: Context, cmd: Command) -> dict[str, Any]:
    """The daily report of ``--date``, by default yesterday (as the CLI and the 09:00 send)."""
    day = parse_day(cmd.date, ctx.settings, ctx.now)
    return build_report_card(ctx.db, ctx.settings, day, ctx.lang, _chat_scope(ctx, cmd))


def silence(db, settings, clock, key: str, seconds: float | None, by: str) -> str:
    """Silence alerts with ``key`` for ``seconds`` (default from settings); returns the text."""
    now = clock.now()
    until = now + (seconds or settings.alerts.default_silence)
    store_alerts.put_silence(db, key, until, by=by, now=now)
    shown = datetime.fromtimestamp(until, settings.tz).strftime("%Y-%m-%d %H:%M")
    return t("silence.done", settings.language, key=escape(key), until=shown)


def cmd_silence(ctx: Context, cmd: Command) -> dict[str, Any]:
    text = silence(ctx.db, ctx.settings, ctx.clock, cmd.key or "", cmd.seconds, ctx.sender)
    return cards.success_card(text, ctx.lang)


def cmd_replay(ctx: Context, cmd: Command) -> dict[str, Any]:
    """Queue undelivered (dead) outbox rows again, each send under a new uuid."""
    rows = outbox.replay(ctx.db, list(cmd.rows) if cmd.rows else None, now=ctx.now)
    if not rows:
        return cards.info_card(t("replay.nothing", ctx.lang), ctx.lang)
    log.warning("outbox rows replayed", extra={"by": ctx.sender, "count": len(rows),
                                                "outbox_ids": [r["id"] for r in rows]})
    ids = ", ".join(str(r["id"]) for r in rows[:20]) + (" …" if len(rows) > 20 else "")
    return cards.success_card(t("replay.done", ctx.lang, count=len(rows), ids=ids), ctx.lang)


COMMAND_HANDLERS: dict[str, Callable[[Context, Command], dict[str, Any]]] = {
    "help": cmd_help, "run": cmd_run, "status": cmd_status, "retry": cmd_retry,
    "cancel": _cmd_move("cancel"), "pause": _cmd_move("pause"), "resume": _cmd_move("resume"),
    "errors": cmd_errors, "report": cmd_report, "silence": cmd_silence, "replay": cmd_replay,
}


# --- card actions -----------------------------------------------------------------------------

@dataclass(frozen=True)
class CardAction:
    operator: str
    value: dict[str, Any]
    event_id: str | None
    message_id: str | None


def card_action_from(payload: dict[str, Any]) -> CardAction:
    """Normalise a ``card.action.trigger`` (schema 2.0) or a legacy callback."""
    if payload.get("schema") == "2.0":
        event = payload.get("event") or {}
        operator = (event.get("operator") or {}).get("open_id", "")
        action = event.get("action") or {}
        event_id = (payload.get("header") or {}).get("event_id")
        message_id = (event.get("context") or {}).get("open_message_id")
    else:
        operator, action = payload.get("open_id", ""), payload.get("action") or {}
        event_id, message_id = None, payload.get("open_message_id")
    value = action.get("value") if isinstance(action, dict) else None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            value = {"action": value}
    return CardAction(str(operator or ""), value if isinstance(value, dict) else {},
                      event_id if isinstance(event_id, str) else None,
                      message_id if isinstance(message_id, str) else None)




def _button_admins(db, settings, value: dict[str, Any]) -> tuple[str, ...]:
    """The admins of the pipeline a button is about: its batch's, else its alert's."""
    if not settings.many_pipelines:
        return settings.feishu.admin_ids
    batch_id = value.get("batch_id") if isinstance(value.get("batch_id"), str) else None
    pipeline = batch_pipeline(db, batch_id)
    key = value.get("key")
    if pipeline is None and isinstance(key, str):
        alert = store_alerts.get(db, key)
        if alert is not None:
            pipeline = (alert["details"].get("pipeline")
                        or batch_pipeline(db, alert.get("batch_id")))
    return settings.scoped(pipeline).feishu.admin_ids


def handle_card_action(db, settings, payload: dict[str, Any], clock) -> dict[str, Any]:
    """Answer one button click (:mod:`bot.alerting.actions`). Non-admins change nothing; a click
    is acted on once.

    Dedup: the click's event_id is recorded in the inbox (``card:<event_id>``); a second delivery
    answers "already handled". Two separate clicks (double click: two event ids) are made safe
    by checking the current state before acting (e.g. a task that is no longer failed).
    """
    lang = settings.language
    act = card_action_from(payload)
    name = str(act.value.get("action", ""))
    if name not in ACTIONS:
        return toast("warning", t("toast.unknown", lang))
    if name not in READ_ONLY and not is_admin(settings, act.operator,
                                              _button_admins(db, settings, act.value)):
        return toast("error", t("refused.toast", lang))
    if act.event_id:
        key = "card:" + act.event_id
        if not inbox.record(db, key, event_type="card.action.trigger", payload=payload,
                            now=clock.now(), event_id=act.event_id):
            return toast("info", t("toast.already", lang))
    answer = handle_alert_action(db, settings, act.value, act.operator, clock)
    if act.event_id:
        inbox.finish(db, "card:" + act.event_id, now=clock.now())
    return answer

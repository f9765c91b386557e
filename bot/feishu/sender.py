"""The outbox sender: performs due outbox rows through :class:`~bot.feishu.client.FeishuClient`.

Rows (see ``storage.outbox``) and what is done with them:

- ``send``: target chat_id, payload ``{"card": {...}}`` or ``{"text": "..."}``; result message_id.
- ``reply``: target message_id, same payload; result the reply's message_id.
- ``patch``: target a message_id (``om_...``) or the uuid of an earlier send/reply row, whose
  message_id is looked up; while that row is unsent the patch waits ``patch_wait`` seconds, and
  if it is dead (or unknown) the patch is dead too. Payload ``{"card": {...}}``.
- ``bitable_update``: target ``"app_token/table_id"``, payload ``{"record_id", "fields"}``. All
  due rows of one table are coalesced: fields for one record merged in row order (later wins),
  written in ``batch_update`` calls of at most 500 records, one call at a time per table (a
  process-wide lock per table; Feishu answers 1254291 to concurrent writes).
- ``bitable_attach`` and ``bitable_create`` (see :meth:`OutboxSender._deliver_bitable_extra`):
  upload a file into a Bitable and write its token into a record's attachment column; add
  records to a table (the attempt log), at most 500 per row. Same table lock, same decisions.

Decisions:

- success -> ``mark_sent`` (result = message_id for messages).
- retryable FeishuError -> ``mark_retry`` after ``base * 2**attempts`` seconds, jittered to
  50-100 %, capped at ``max_backoff``, and never sooner than Feishu's ``retry_after``.
- a card refused for a mention of no user (230099, "ErrCode: 100290"; one bad on-call id):
  sent, replied or patched again at once with the mentions as plain text and a line saying so
  (same uuid: the refused call made no message), and a WARNING log line.
- a PATCH refused because someone is pressing a button on that card right now (230099 with
  "card action is lock", ErrCode 11310): retried after ``LOCK_RETRY`` seconds (growing to
  ``LOCK_RETRY_MAX``), however often; the lock lasts a moment. Other 230099 answers (the card
  itself is refused) stay permanent.
- permanent FeishuError (or a malformed payload) -> ``mark_dead`` and an ERROR log line.
- the uuid window: a send or reply is retried only while Feishu still dedupes its uuid, that
  is until ``uuid_window`` (one hour) minus ``window_margin`` after its first attempt (recorded
  just before it, ``outbox.mark_attempt``). A retry that could not happen before then is not
  scheduled: the row is dead (counted in ``status`` and ``/metrics``, replayed by an admin with
  ``replay``). Patches and Bitable writes carry no uuid and are idempotent: they keep retrying.
- order per target: once a row is postponed, the later rows for the same target claimed in the
  same pass are postponed to the same time (``claim_due`` keeps them back in later passes).
- 5 messages per second per chat (Feishu's limit, shared by all bots): a sliding window per
  target on the injected clock; a row over the limit is postponed to when the window frees up.
  Postponing uses ``release``, which counts no attempt.

An upload first extends its row's lease (:data:`UPLOAD_LEASE`), and only while this sender
still holds the row; ``mark_sent`` / ``mark_retry`` / ``mark_dead`` / ``release`` too change a
row only while this sender holds it, so a sender whose lease was taken over neither uploads a file twice nor overwrites the new
holder's outcome.

Retries reuse the row's uuid (``outbox.send_uuid``: a replayed row's new one), so a message sent
by a sender that died before ``mark_sent`` is deduped by Feishu when the next sender (after the
lease expires) sends it again, inside the window.

Give the sender its own database connection when it runs in its own thread.
"""
from __future__ import annotations

import collections
import logging
import random
import threading
import uuid as uuidlib
from typing import Any, Callable

import sqlite_utils

from bot.chat import i18n
from bot.feishu.bitable_sync import FILES_SUFFIX
from bot.chat.cards import without_mentions
from bot.errors import FeishuError
from bot.feishu.client import FeishuClient
from storage import outbox

log = logging.getLogger("opsbot.sender")

BITABLE_BATCH = 500  # records per batch_update call
UPLOAD_LEASE = 900.0  # seconds a row is held for its upload (parts of a large file at 120 s each)
UPLOADS_PER_PASS = 1  # file uploads per delivery pass (an upload may take a minute)
CHAT_RATE = 5        # messages per CHAT_WINDOW seconds per chat (Feishu: 5 QPS per chat)
CHAT_WINDOW = 1.0
LOCK_RETRY = 0.5     # seconds before the first retry of a PATCH of a locked card
LOCK_RETRY_MAX = 4.0


def mention_refused(err: FeishuError) -> bool:
    """Feishu refused a card because a mention names no user of the tenant (230099 with
    ErrCode 100290): one bad on-call id; the card goes again without mentions."""
    return err.code == 230099 and "ErrCode: 100290" in (err.msg or "")


def card_locked(err: FeishuError) -> bool:
    """Feishu refused a PATCH because the card is being interacted with (retry shortly)."""
    return err.code == 230099 and "card action is lock" in (err.msg or "").lower()

_table_locks: dict[str, threading.Lock] = {}
_table_locks_guard = threading.Lock()


def _table_lock(table: str) -> threading.Lock:
    with _table_locks_guard:
        return _table_locks.setdefault(table, threading.Lock())


class _Postponed(Exception):
    """A row cannot go now; try again at ``at`` (not an error, no ERROR log)."""

    def __init__(self, at: float, reason: str) -> None:
        super().__init__(reason)
        self.at = at


class _Lost(Exception):
    """Another sender holds the row now (our lease ran out); leave it alone."""


class _Dead(Exception):
    """A row that can never be performed (its reason is the message)."""


class _RateLimiter:
    """At most ``rate`` events per ``window`` seconds per key, on the injected clock."""

    def __init__(self, clock: Any, rate: int, window: float) -> None:
        self.clock, self.rate, self.window = clock, rate, window
        self._events: dict[str, collections.deque[float]] = {}

    def acquire(self, key: str) -> float | None:
        """Record an event for ``key`` now and return None, or return when it would fit."""
        now = self.clock.now()
        events = self._events.setdefault(key, collections.deque())
        while events and events[0] <= now - self.window:
            events.popleft()
        if len(events) >= self.rate:
            return events[0] + self.window
        events.append(now)
        return None


class OutboxSender:
    """Delivers due outbox rows; call :meth:`deliver_due` periodically or :meth:`run_forever`."""

    def __init__(self, db: sqlite_utils.Database, client: FeishuClient, *, clock: Any,
                 owner: str, max_backoff: float = 300.0, base_backoff: float = 1.0,
                 lease: float = 60.0, claim_limit: int = 200, max_rows: int = 5000,
                 patch_wait: float = 2.0, chat_rate: int = CHAT_RATE,
                 chat_window: float = CHAT_WINDOW,
                 rng: Callable[[], float] = random.random,
                 kinds: tuple[str, ...] | None = None,
                 uuids: tuple[str, ...] | None = None,
                 uuid_window: float = outbox.UUID_WINDOW, window_margin: float = 60.0,
                 lang: str = i18n.DEFAULT) -> None:
        self.db, self.client, self.clock, self.owner = db, client, clock, owner
        self.uuid_window, self.window_margin = uuid_window, window_margin
        self.lang = lang  # for the line a card gets when its mentions were refused
        self.kinds = kinds  # None: every kind; the web process leaves Bitable to the worker
        self.uuids = uuids  # None: every row; `opsbot report --send` delivers only its own
        self.max_backoff, self.base_backoff = max_backoff, base_backoff
        self.lease, self.claim_limit, self.max_rows = lease, claim_limit, max_rows
        self.patch_wait = patch_wait
        self.rng = rng
        self._limiter = _RateLimiter(clock, chat_rate, chat_window)

    # -- loop -----------------------------------------------------------------------------------

    def run_forever(self, stop_event: threading.Event, interval: float = 1.0) -> None:
        """Deliver until ``stop_event`` is set; sleep ``interval`` seconds when nothing was sent."""
        while not stop_event.is_set():
            try:
                delivered = self.deliver_due()
            except Exception:  # keep the thread alive; claimed rows come back when leases expire
                log.exception("outbox sender pass failed", extra={"owner": self.owner})
                delivered = 0
            if not delivered:
                stop_event.wait(interval)

    def deliver_due(self) -> int:
        """Claim and perform every due row; return how many rows were marked sent."""
        held: dict[str, float] = {}  # target -> time its earlier row was postponed to
        tables: dict[str, list[dict[str, Any]]] = {}
        extra: list[dict[str, Any]] = []
        delivered = claimed = 0
        while claimed < self.max_rows:
            rows = outbox.claim_due(self.db, owner=self.owner, now=self.clock.now(),
                                    lease=self.lease, limit=self.claim_limit, kinds=self.kinds,
                                    uuids=self.uuids)
            if not rows:
                break
            claimed += len(rows)
            for row in rows:
                if row["kind"] == "bitable_update":
                    tables.setdefault(row["target"], []).append(row)
                elif row["kind"] in ("bitable_attach", "bitable_create"):
                    extra.append(row)
                else:
                    delivered += self._deliver_message(row, held)
        for table, rows in tables.items():
            delivered += self._deliver_table(table, rows)
        delivered += self._deliver_bitable_extra(extra)
        return delivered

    # -- messages -------------------------------------------------------------------------------

    def _deliver_message(self, row: dict[str, Any], held: dict[str, float]) -> int:
        target = row["target"]
        try:
            if target in held:
                raise _Postponed(held[target], "waiting for an earlier row to the same target")
            try:
                result = self._perform(row)
            except FeishuError as err:
                if not (mention_refused(err) and "card" in row["payload"]):
                    raise
                result = self._without_mentions(row, err)
        except _Postponed as wait:
            held[target] = wait.at
            outbox.release(self.db, row["id"], next_at=wait.at, reason=f"postponed: {wait}",
                           owner=self.owner)
            return 0
        except FeishuError as err:
            self._failed([row], err, held)
            return 0
        except _Dead as exc:
            self._dead([row], str(exc))
            return 0
        except (KeyError, TypeError, ValueError) as exc:
            self._dead([row], f"malformed {row['kind']} payload: {type(exc).__name__}: {exc}")
            return 0
        outbox.mark_sent(self.db, row["id"], now=self.clock.now(), result=result,
                         owner=self.owner)
        return 1

    def _perform(self, row: dict[str, Any], *, take_slot: bool = True) -> str | None:
        kind, target, payload = row["kind"], row["target"], row["payload"]
        if kind == "patch":
            message_id = self._patch_target(target)
            if take_slot:
                self._take_slot(message_id)
            self.client.patch_card(message_id, payload["card"])
            return message_id
        if kind not in outbox.UUID_KINDS:
            raise ValueError(f"unknown kind {kind!r}")
        if self._window_left(row, self.clock.now()) <= 0:
            raise _Dead(f"not sent within {self.uuid_window / 60:g} minutes of its first attempt"
                        f" (Feishu's uuid window): a retry now could show it twice")
        if take_slot:
            self._take_slot(target)
        if row.get("first_attempt_at") is None:
            row["first_attempt_at"] = outbox.mark_attempt(self.db, row["id"],
                                                          now=self.clock.now())
        uid = outbox.send_uuid(row)
        if kind == "send":
            if "card" in payload:
                return self.client.send_card(target, payload["card"], uid)
            return self.client.send_text(target, payload["text"], uid)
        if "card" in payload:
            return self.client.reply_card(target, payload["card"], uid)
        return self.client.reply_text(target, payload["text"], uid)

    def _window_left(self, row: dict[str, Any], now: float) -> float:
        """Seconds a send or reply may still be retried under its uuid (inf: no limit yet)."""
        first = row.get("first_attempt_at")
        if row["kind"] not in outbox.UUID_KINDS or first is None:
            return float("inf")
        return first + self.uuid_window - self.window_margin - now

    def _without_mentions(self, row: dict[str, Any], err: FeishuError) -> str | None:
        """Perform ``row`` again with its card's mentions as plain text (a refused send made no
        message, so the same uuid is used); the stored payload keeps the rebuilt card."""
        log.warning("feishu refused a mention on a card (an id that is no user of the tenant; "
                    "check FEISHU_ONCALL_IDS / FEISHU_ADMIN_IDS); sending it without mentions",
                    extra={**err.as_log(), "outbox_uuid": row["uuid"],
                           "outbox_kind": row["kind"], "outbox_target": row["target"]})
        payload = dict(row["payload"])
        payload["card"] = without_mentions(payload["card"],
                                           i18n.t("card.mention_refused", self.lang))
        outbox.set_payload(self.db, row["id"], payload)
        return self._perform({**row, "payload": payload}, take_slot=False)

    def _take_slot(self, key: str) -> None:
        free_at = self._limiter.acquire(key)
        if free_at is not None:
            raise _Postponed(free_at, f"over {self._limiter.rate} messages per "
                                      f"{self._limiter.window:g}s to {key}")

    def _patch_target(self, target: str) -> str:
        """The message_id a patch applies to: the target itself, or the result of a send row."""
        if target.startswith("om_"):
            return target
        message_id = outbox.result_of(self.db, target)
        if message_id:
            return message_id
        status = outbox.status_of(self.db, target)
        if status != "pending":
            raise _Dead(f"patch target {target} is {status or 'unknown'} and has no message_id")
        raise _Postponed(self.clock.now() + self.patch_wait, f"{target} not sent yet")

    # -- Bitable --------------------------------------------------------------------------------

    def _deliver_table(self, table: str, rows: list[dict[str, Any]]) -> int:
        app_token, _, table_id = table.partition("/")
        if not app_token or not table_id:
            self._dead(rows, f"bitable_update target {table!r} is not app_token/table_id")
            return 0
        bad = [r for r in rows if not _valid_update(r["payload"])]
        if bad:
            self._dead(bad, "malformed bitable_update payload: needs record_id and fields")
            rows = [r for r in rows if r not in bad]
        merged, rows_of = _coalesce(rows)
        record_ids = list(merged)
        chunks = [record_ids[i:i + BITABLE_BATCH]
                  for i in range(0, len(record_ids), BITABLE_BATCH)]
        delivered = 0
        with _table_lock(table):  # one write to a table at a time (1254291 write conflict)
            for n, chunk in enumerate(chunks):
                chunk_rows = [r for rid in chunk for r in rows_of[rid]]
                try:
                    self.client.batch_update_records(
                        app_token, table_id,
                        [{"record_id": rid, "fields": merged[rid]} for rid in chunk])
                except FeishuError as err:
                    self._failed(chunk_rows, err, {})
                    if err.retryable:  # keep later writes behind this one
                        rest = [r for c in chunks[n + 1:] for rid in c for r in rows_of[rid]]
                        self._postpone(rest, outbox_next_at(self.db, chunk_rows[0]["id"]),
                                       "waiting for an earlier write to the table")
                        break
                    continue
                now = self.clock.now()
                for r in chunk_rows:
                    outbox.mark_sent(self.db, r["id"], now=now, owner=self.owner)
                delivered += len(chunk_rows)
        return delivered

    # -- Bitable attachments and created records ---------------------------------------------------

    def _deliver_bitable_extra(self, rows: list[dict[str, Any]]) -> int:
        """``bitable_attach``: upload ``payload.path`` into the Bitable (``parent_node`` = the
        target's app token; the file token is kept in the row, so a failed field write does not
        upload again), then write ``[{"file_token"}]`` into ``payload.field`` of
        ``payload.record_id``. A missing or unreadable file is dead. ``bitable_create``: add
        ``payload.records`` (at most 500) to the target table in one call."""
        delivered = uploads = 0
        for row in rows:
            table = row["target"]
            if row["kind"] == "bitable_attach":  # "app/table#files": a target of its own
                table = table.removesuffix(FILES_SUFFIX)
            app_token, _, table_id = table.partition("/")
            if row["kind"] == "bitable_attach" and not row["payload"].get("file_token"):
                uploads += 1
                if uploads > UPLOADS_PER_PASS:  # let messages through between large uploads
                    outbox.release(self.db, row["id"], next_at=self.clock.now(),
                                   reason=f"postponed: {UPLOADS_PER_PASS} upload(s) per pass",
                                   owner=self.owner)
                    continue
            try:
                if not app_token or not table_id:
                    raise _Dead(f"{row['kind']} target {row['target']!r} is not "
                                "app_token/table_id")
                if row["kind"] == "bitable_attach":
                    self._attach(row, app_token, table_id, table)
                else:
                    records = row["payload"]["records"]
                    if not isinstance(records, list) or not 0 < len(records) <= BITABLE_BATCH:
                        raise ValueError(f"{len(records)} records, want 1..{BITABLE_BATCH}")
                    with _table_lock(row["target"]):
                        self.client.batch_create_records(
                            app_token, table_id, records, client_token=create_token(row["uuid"]))
            except FeishuError as err:
                self._failed([row], err, {})
                continue
            except _Lost as exc:
                log.warning("outbox row skipped: %s", exc, extra={"outbox_uuid": row["uuid"]})
                continue
            except _Dead as exc:
                self._dead([row], str(exc))
                continue
            except (KeyError, TypeError, ValueError) as exc:
                self._dead([row], f"malformed {row['kind']} payload: {type(exc).__name__}: {exc}")
                continue
            outbox.mark_sent(self.db, row["id"], now=self.clock.now(),
                             result=row["payload"].get("file_token"), owner=self.owner)
            delivered += 1
        return delivered

    def _attach(self, row: dict[str, Any], app_token: str, table_id: str, table: str) -> None:
        payload = row["payload"]
        path, field, record_id = payload["path"], payload["field"], payload["record_id"]
        if not (isinstance(field, str) and field and isinstance(record_id, str) and record_id):
            raise ValueError("needs record_id and field")
        token = payload.get("file_token")
        if not token:
            # an upload may outlast the claim's lease: hold the row for longer first, or leave
            # it to the sender that took it over (it would upload the file a second time)
            if not outbox.extend_lease(self.db, row["id"], owner=self.owner,
                                       until=self.clock.now() + max(self.lease, UPLOAD_LEASE)):
                raise _Lost(f"{row['uuid']} was taken over by another sender")
            try:
                token = self.client.upload_media(path, parent_node=app_token,
                                                 file_name=payload.get("file_name"))
            except OSError as exc:
                raise _Dead(f"cannot read {path}: {type(exc).__name__}: {exc.strerror or exc}") \
                    from None
            payload["file_token"] = token
            outbox.set_payload(self.db, row["id"], payload)
        with _table_lock(table):  # the upload itself needs no table lock
            self.client.batch_update_records(app_token, table_id, [
                {"record_id": record_id, "fields": {field: [{"file_token": token}]}}])

    # -- outcomes -------------------------------------------------------------------------------

    def _failed(self, rows: list[dict[str, Any]], err: FeishuError,
                held: dict[str, float]) -> None:
        if card_locked(err) and all(r["kind"] == "patch" for r in rows):
            self._retry_locked(rows, err, held)
            return
        if not err.retryable:
            self._dead(rows, str(err), err)
            return
        delay = self.backoff(max(r["attempts"] for r in rows), err.retry_after)
        now = self.clock.now()
        wait_at_least = err.retry_after or 0.0
        late = [r for r in rows if self._window_left(r, now) <= wait_at_least]
        if late:   # no retry fits in the uuid window any more
            self._dead(late, f"{err}; no retry within {self.uuid_window / 60:g} minutes of the"
                             f" first attempt (Feishu's uuid window)", err)
            rows = [r for r in rows if r not in late]
            if not rows:
                return
        for r in rows:   # the last retry is moved inside the window rather than lost
            wait = min(delay, max(wait_at_least, self._window_left(r, now) - 1.0))
            held[r["target"]] = now + wait
            outbox.mark_retry(self.db, r["id"], now=now, next_at=now + wait, error=str(err),
                              owner=self.owner)
        log.warning("outbox retry in %.1fs: %s", held[rows[0]["target"]] - now, err,
                    extra={**err.as_log(), "outbox_uuids": [r["uuid"] for r in rows],
                           "outbox_kind": rows[0]["kind"], "outbox_target": rows[0]["target"]})

    def _retry_locked(self, rows: list[dict[str, Any]], err: FeishuError,
                      held: dict[str, float]) -> None:
        attempts = max(r["attempts"] for r in rows)
        delay = min(LOCK_RETRY_MAX, LOCK_RETRY * 2 ** min(attempts, 3)) * (0.5 + 0.5 * self.rng())
        now = self.clock.now()
        for r in rows:
            held[r["target"]] = now + delay
            outbox.mark_retry(self.db, r["id"], now=now, next_at=now + delay, error=str(err),
                              owner=self.owner)
        log.info("card locked by an interaction; patch retried in %.1fs", delay,
                 extra={**err.as_log(), "outbox_uuids": [r["uuid"] for r in rows]})

    def _dead(self, rows: list[dict[str, Any]], error: str,
              err: FeishuError | None = None) -> None:
        now = self.clock.now()
        for r in rows:
            outbox.mark_dead(self.db, r["id"], now=now, error=error, owner=self.owner)
        log.error("outbox gave up: %s", error,
                  extra={**(err.as_log() if err else {}),
                         "outbox_uuids": [r["uuid"] for r in rows],
                         "outbox_kind": rows[0]["kind"], "outbox_target": rows[0]["target"]})

    def _postpone(self, rows: list[dict[str, Any]], at: float, reason: str) -> None:
        for r in rows:
            outbox.release(self.db, r["id"], next_at=at, reason=f"postponed: {reason}",
                           owner=self.owner)

    def backoff(self, attempts: int, retry_after: float | None = None) -> float:
        """Seconds to wait after the ``attempts``-th failure: exponential, jittered, capped."""
        exp = min(self.max_backoff, self.base_backoff * (2 ** min(attempts, 32)))
        delay = exp * (0.5 + 0.5 * self.rng())
        return max(delay, retry_after or 0.0)


def create_token(row_uuid: str) -> str:
    """The ``client_token`` of a ``bitable_create`` row: a UUID derived from the row's uuid, so
    every retry of the row (after a lost answer, or by another sender) is the same call to
    Feishu, which adds the records once."""
    return str(uuidlib.uuid5(uuidlib.NAMESPACE_URL, f"opsbot:outbox:{row_uuid}"))


def _coalesce(rows: list[dict[str, Any]]) -> tuple[dict[str, dict[str, Any]],
                                                  dict[str, list[dict[str, Any]]]]:
    """Merge bitable_update rows per record_id in row order; later fields win."""
    merged: dict[str, dict[str, Any]] = {}
    rows_of: dict[str, list[dict[str, Any]]] = {}
    for row in sorted(rows, key=lambda r: r["id"]):
        rid = row["payload"]["record_id"]
        merged.setdefault(rid, {}).update(row["payload"]["fields"])
        rows_of.setdefault(rid, []).append(row)
    return merged, rows_of


def _valid_update(payload: Any) -> bool:
    return (isinstance(payload, dict) and isinstance(payload.get("record_id"), str)
            and bool(payload["record_id"]) and isinstance(payload.get("fields"), dict))


def outbox_next_at(db: sqlite_utils.Database, row_id: int) -> float:
    return outbox.next_at_of(db, row_id)

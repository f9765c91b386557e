"""``opsbot doctor``: check settings, the database, Feishu and Coze; say what is wrong and the fix.

Every finding is one line::

    OK    database: var/opsbot.db opens; schema v7 (current); WAL; writable
    WARN  settings.admins: FEISHU_ADMIN_IDS is empty: nobody can run commands — fix: set ...
    FAIL  feishu.token: Feishu refused the app credentials (code 10014 ...) — fix: copy ...

The exit code is 0 when nothing FAILs, 1 otherwise. Checks:

- ``settings.*``: which settings are set and which feature lacks which variable. Secrets are shown
  as ``set (hidden)``; every output line is also scrubbed of the secrets' values.
- ``database``: ``OPSBOT_DB`` opens and migrates, is writable (a write lock taken and rolled
  back), is in WAL mode and at the schema version this opsbot knows; ``database.disk``: free space.
- ``feishu.*`` (when the app is configured), via :class:`bot.feishu.client.FeishuClient` (lark-oapi): a
  fresh tenant token; the bot's own open_id (``bot/v3/info``, stored like the worker does, so
  group messages count only when they @ the bot; when it cannot be looked up the line says that
  the older rule holds and why); the bot is a member of the alert chat (``is_in_chat``, a
  read); the Bitable columns opsbot uses exist and the table is readable (one search page of
  size 1); with ``feishu.bitable_video_field`` set, that column exists and has the type its mode
  needs (``feishu.bitable_video``); with ``feishu.bitable_log_table_id`` set, the log table has
  every column the attempt log writes (``feishu.log_table``).
- ``webhook.card_callbacks``: whether old-style card callbacks (``/webhook/card``) arrived
  (the web process counts them): they get the toast only and a PATCH, and the fix is to
  subscribe the new ``card.action.trigger``.
- ``feishu.connection`` (with ``FEISHU_CONNECTION=ws``): the long connection's discovery request
  answers code 0 (no connection is opened: it would take events from a running worker).
- ``coze.api`` (when a token is set): one history read for a dummy execute id, which exercises
  auth without starting a run: 4100/401 means the token is invalid, 4200/4314 that it was accepted.

Network checks run side by side in daemon threads, each call bounded by ``timeout`` seconds and
the whole lot by ``budget`` seconds, so the doctor never hangs: an unfinished step is reported as
a FAIL naming what did not answer.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import re
import shutil
import sqlite3
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, TextIO

from storage import pg

from bot.settings import Settings

DEFAULT_TIMEOUT = 4.0   # seconds per network call
DEFAULT_BUDGET = 12.0   # seconds for every check together
DISK_FAIL_BYTES = 50 * 1024 ** 2
DISK_WARN_BYTES = 500 * 1024 ** 2

OK, WARN, FAIL = "OK", "WARN", "FAIL"

_CONSOLE = "the Feishu developer console (open.feishu.cn/app, your app)"
_PUBLISH = "then publish a new app version"


def _cred_fix(names: str = "FEISHU_APP_ID and FEISHU_APP_SECRET") -> str:
    return (f"copy App ID and App Secret from {_CONSOLE} > Credentials & Basic Info into "
            f"{names}")


_CRED_FIX = _cred_fix()
_COZE_TOKEN_FIX = ("create a personal access token on coze.cn (API > Personal access tokens) "
                   "with permission to run workflows in the workflow's workspace, and set "
                   "COZE_API_TOKEN to it")
_ENV_FOR_REAL_USE = ("FEISHU_APP_ID, FEISHU_APP_SECRET, FEISHU_VERIFICATION_TOKEN, "
                     "FEISHU_ENCRYPT_KEY, FEISHU_ALERT_CHAT_ID, FEISHU_ADMIN_IDS, "
                     "BITABLE_APP_TOKEN, BITABLE_TABLE_ID, COZE_API_TOKEN, COZE_WORKFLOW_ID")


@dataclass(frozen=True)
class Finding:
    """One check's verdict: ``level`` is OK, WARN or FAIL; ``fix`` says how to mend it."""

    level: str
    check: str
    what: str
    fix: str = ""

    def line(self) -> str:
        text = f"{self.level:<4}  {self.check}: {self.what}"
        return f"{text} — fix: {self.fix}" if self.fix else text


def run_doctor(settings: Settings, *, out: TextIO | None = None,
               timeout: float = DEFAULT_TIMEOUT, budget: float = DEFAULT_BUDGET) -> int:
    """Run every check, print one line each and a summary; 0 when nothing FAILed, else 1."""
    out = out if out is not None else sys.stdout
    secrets = [s.get() for s in (settings.feishu.app_secret, settings.feishu.verification_token,
                                 settings.feishu.encrypt_key, settings.coze.api_token,
                                 *(a.api_token for a in settings.coze_accounts))
               if len(s.get()) >= 4]
    findings: list[Finding] = []

    def emit(items: list[Finding]) -> None:
        for f in items:
            findings.append(f)
            print(_scrub(f.line(), secrets), file=out, flush=True)

    emit(check_settings(settings))
    with _quiet_loggers():
        if settings.feishu.configured:
            from bot.feishu import client as feishu  # noqa: F401  (lark-oapi takes a second or two to import)
        deadline = time.monotonic() + budget
        sections = [_Section("database", lambda r: (check_database(settings, r, timeout),
                                                    check_legacy_callbacks(settings, r)))]
        if settings.feishu.configured:
            sections.append(_Section("feishu", lambda r: check_feishu(settings, r, timeout)))
        if settings.feishu.configured and settings.feishu.connection == "ws":
            sections.append(_Section("connection",
                                     lambda r: check_long_connection(settings, r, timeout)))
        if settings.pipelines_listed:
            # one probe per account in use, with one of its pipelines' workflows
            for account, scoped in _accounts_in_use(settings):
                sections.append(_Section(f"coze[{account.name}]",
                                         lambda r, s=scoped, a=account: check_coze(
                                             s, r, timeout, check=f"coze.api[{a.name}]")))
        elif settings.coze.api_token:
            sections.append(_Section("coze", lambda r: check_coze(settings, r, timeout)))
        for section in sections:
            section.start()
        for section in sections:
            emit(section.wait(deadline, budget))
    for line in _summary(settings, findings):
        print(_scrub(line, secrets), file=out, flush=True)
    return 1 if any(f.level == FAIL for f in findings) else 0


# -- settings --------------------------------------------------------------------------------------

def _accounts_in_use(settings: Settings) -> list[tuple[Any, Settings]]:
    """Each Coze account some pipeline uses and has a token for, with the settings of its first
    pipeline (for the probe's base URL, token and workflow)."""
    seen: dict[str, tuple[Any, Settings]] = {}
    for spec in settings.pipelines:
        account = settings.account(spec.coze_account)
        if account.name not in seen and account.api_token:
            seen[account.name] = (account, settings.scoped(spec.name))
    return list(seen.values())


def check_pipelines(settings: Settings) -> list[Finding]:
    """One line per pipeline (``[[pipelines]]``): its workflow, account and token, table, chat
    and admins; says which pipeline is wrong and what to set."""
    out: list[Finding] = []
    for spec in settings.pipelines:
        check = f"settings.pipeline[{spec.name}]"
        account = settings.account(spec.coze_account)
        where = ("COZE_WORKFLOW_ID" if spec.name == "default"
                 else f"[[pipelines]] {spec.name} workflow_id")
        if not spec.workflow_id:
            out.append(Finding(FAIL, check, f"no workflow: {where} is empty",
                               f"set {where} (the number in the workflow editor's URL)"))
            continue
        if not account.api_token:
            out.append(Finding(FAIL, check, f"account {account.name!r} has no token: "
                               f"{account.token_source} is not set",
                               f"set {account.token_source} to the account's Coze personal "
                               "access token"))
            continue
        problems = []
        if not spec.alert_chat_id:
            problems.append("no alert_chat_id (nor FEISHU_ALERT_CHAT_ID): its alerts and "
                            "report have nowhere to go")
        if not (spec.bitable_app_token and spec.bitable_table_id):
            problems.append("no bitable_table_id / bitable_app_token: `run` from the chat "
                            "cannot read its rows")
        if not spec.admin_ids:
            problems.append("no admin_ids (nor FEISHU_ADMIN_IDS): nobody can run it")
        said = (f"workflow {spec.workflow_id} on account {account.name} (token from "
                f"{account.token_source}, {account.max_runs} runs, {account.qps:g} QPS), "
                f"chat {spec.alert_chat_id or '-'}, table {spec.bitable_table_id or '-'}")
        if problems:
            out.append(Finding(WARN, check, said + "; " + "; ".join(problems),
                               f"set them in the [[pipelines]] entry {spec.name!r}"))
        else:
            out.append(Finding(OK, check, said + f", {len(spec.admin_ids)} admin(s)"))
    return out


def check_settings(settings: Settings) -> list[Finding]:
    """What is set, and which feature misses which variable (no network, no secrets shown).
    With ``[[pipelines]]``: the shared app settings, then one line per pipeline."""
    if settings.pipelines_listed:
        return (_check_shared_settings(settings) + [_mentions_finding(settings)]
                + check_pipelines(settings))
    return _check_shared_settings(settings) + _check_single_pipeline(settings)


def _check_shared_settings(settings: Settings) -> list[Finding]:
    """The app's credentials and request security: shared by every pipeline."""
    f = settings.feishu
    out: list[Finding] = []
    app = [_show("FEISHU_APP_ID", f.app_id), _hidden("FEISHU_APP_SECRET", bool(f.app_secret))]
    if f.app_id and f.app_secret:
        out.append(Finding(OK, "settings.feishu", ", ".join(app) + f"; FEISHU_DOMAIN={f.domain}"))
    elif f.app_id or f.app_secret:
        missing = "FEISHU_APP_SECRET" if f.app_id else "FEISHU_APP_ID"
        out.append(Finding(FAIL, "settings.feishu",
                           f"{', '.join(app)}: chat commands, alerts and Bitable need both",
                           _cred_fix(missing)))
    else:
        out.append(Finding(WARN, "settings.feishu",
                           "FEISHU_APP_ID and FEISHU_APP_SECRET missing: no chat commands, "
                           "alerts or Bitable (only `opsbot run FILE` works)",
                           "create a custom app at open.feishu.cn/app, enable Bot, and set "
                           "FEISHU_APP_ID and FEISHU_APP_SECRET (or try `opsbot demo`)"))
    security = [_hidden("FEISHU_VERIFICATION_TOKEN", bool(f.verification_token)),
                _hidden("FEISHU_ENCRYPT_KEY", bool(f.encrypt_key))]
    if f.connection == "ws":
        out.append(_ws_setting(settings))
        out.append(Finding(OK, "settings.security", "not needed with FEISHU_CONNECTION=ws: the "
                           "long connection is authenticated by the app credentials"))
    elif f.verification_token and f.encrypt_key:
        out.append(Finding(OK, "settings.security", ", ".join(security)))
    else:
        out.append(Finding(WARN, "settings.security",
                           f"{', '.join(security)}: dev mode, the webhook accepts unverified "
                           "requests",
                           f"copy Verification Token and Encrypt Key from {_CONSOLE} > Events & "
                           "Callbacks > Encryption Strategy into FEISHU_VERIFICATION_TOKEN and "
                           "FEISHU_ENCRYPT_KEY"))
    return out


def _check_single_pipeline(settings: Settings) -> list[Finding]:
    """The single pipeline's chat, table, admins, mentions and Coze account."""
    f, c = settings.feishu, settings.coze
    out: list[Finding] = []
    if f.alert_chat_id:
        out.append(Finding(OK, "settings.alerts", _show("FEISHU_ALERT_CHAT_ID", f.alert_chat_id)))
    else:
        out.append(Finding(WARN, "settings.alerts",
                           "FEISHU_ALERT_CHAT_ID missing: alerts and the daily report have "
                           "nowhere to go",
                           "add the bot to the ops group and set FEISHU_ALERT_CHAT_ID to the "
                           "group's chat_id (oc_...)"))
    table = [_show("BITABLE_APP_TOKEN", f.bitable_app_token),
             _show("BITABLE_TABLE_ID", f.bitable_table_id)]
    if f.bitable_app_token and f.bitable_table_id:
        out.append(Finding(OK, "settings.bitable", ", ".join(table)
                           + f"; status column {f.bitable_status_field!r}, pending value "
                             f"{f.bitable_pending_value!r}"))
    else:
        level = FAIL if (f.bitable_app_token or f.bitable_table_id) else WARN
        out.append(Finding(level, "settings.bitable",
                           f"{', '.join(table)}: `run` from chat needs both",
                           "open the task table in Feishu: its URL is .../base/<BITABLE_APP_TOKEN>"
                           "?table=<BITABLE_TABLE_ID>; set both"))
    if f.admin_ids:
        out.append(Finding(OK, "settings.admins",
                           f"FEISHU_ADMIN_IDS: {len(f.admin_ids)} admin(s): "
                           f"{', '.join(f.admin_ids)}"))
    else:
        out.append(Finding(WARN, "settings.admins",
                           "FEISHU_ADMIN_IDS is empty: nobody can run commands or press buttons",
                           "set FEISHU_ADMIN_IDS to a comma-separated list of open_ids "
                           "(ou_..., each person's open_id for this app)"))
    out.append(_mentions_finding(settings))
    coze = [_hidden("COZE_API_TOKEN", bool(c.api_token)), _show("COZE_WORKFLOW_ID", c.workflow_id)]
    if c.api_token and c.workflow_id:
        out.append(Finding(OK, "settings.coze", ", ".join(coze) + f"; COZE_BASE_URL={c.base_url}"))
    else:
        missing = [n for n, v in (("COZE_API_TOKEN", c.api_token),
                                  ("COZE_WORKFLOW_ID", c.workflow_id)) if not v]
        out.append(Finding(FAIL, "settings.coze",
                           f"{', '.join(coze)}: no batch can run against Coze (only with "
                           "--simulate)",
                           f"set {' and '.join(missing)} (the workflow id is the number in the "
                           "workflow editor's URL, .../workflow/<id>); try `opsbot demo` to see "
                           "opsbot work without an account"))
    return out


def _mentions_finding(settings: Settings) -> Finding:
    """Whom HIGH and CRITICAL cards @-mention (bot.alerting.router.oncall / everyone)."""
    f = settings.feishu
    people = list(dict.fromkeys((*f.oncall_ids, *f.admin_ids)))
    if settings.alerts.mention_all:
        return Finding(WARN, "settings.mentions",
                       "OPSBOT_MENTION_ALL is on: CRITICAL cards mention everyone "
                       "(<at id=all>); Feishu refuses the whole card unless the group owner "
                       "allows bots to mention everyone",
                       "in the group's settings let members (bots) @all, or turn "
                       "OPSBOT_MENTION_ALL off and set FEISHU_ONCALL_IDS")
    if people:
        return Finding(OK, "settings.mentions",
                       f"HIGH and CRITICAL cards mention {len(people)} person(s): "
                       f"{', '.join(people)}")
    return Finding(WARN, "settings.mentions",
                   "no on-call or admin open_ids: HIGH and CRITICAL cards mention nobody "
                   "(they say so on the card)",
                   "set FEISHU_ONCALL_IDS (or FEISHU_ADMIN_IDS) to the open_ids to call; "
                   "OPSBOT_MENTION_ALL=1 mentions everyone instead, where the group owner "
                   "allows it")


def _ws_setting(settings: Settings) -> Finding:
    f = settings.feishu
    if f.app_id and f.app_secret:
        return Finding(OK, "settings.connection", "FEISHU_CONNECTION=ws: `opsbot worker` opens "
                       "Feishu's long connection (no public URL; the web process is optional)")
    return Finding(FAIL, "settings.connection", "FEISHU_CONNECTION=ws without FEISHU_APP_ID and "
                   "FEISHU_APP_SECRET: the worker cannot open the long connection",
                   _CRED_FIX)


def _show(name: str, value: str) -> str:
    return f"{name}={value}" if value else f"{name} missing"


def _hidden(name: str, present: bool) -> str:
    return f"{name} set (hidden)" if present else f"{name} missing"


def nothing_configured(settings: Settings) -> bool:
    f, c = settings.feishu, settings.coze
    return not any((f.app_id, f.app_secret, f.alert_chat_id, f.bitable_app_token,
                    f.bitable_table_id, c.api_token, c.workflow_id))


def _summary(settings: Settings, findings: list[Finding]) -> list[str]:
    n = {level: sum(1 for f in findings if f.level == level) for level in (OK, WARN, FAIL)}
    lines = ["", f"doctor: {n[OK]} OK, {n[WARN]} WARN, {n[FAIL]} FAIL"]
    if nothing_configured(settings):
        lines += [
            "Nothing is configured yet. To see opsbot work on this machine without any Feishu or "
            "Coze account, run `opsbot demo` first.",
            f"For real use set {_ENV_FOR_REAL_USE} (environment variables, or the same keys in "
            "the TOML file named by OPSBOT_CONFIG), then run `opsbot doctor` again.",
        ]
    elif n[FAIL]:
        lines.append("Fix the FAIL lines above, then run `opsbot doctor` again.")
    elif n[WARN]:
        lines.append("Ready, with warnings: the WARN lines above name what is off.")
    else:
        lines.append("All good: start `opsbot worker`" + (
            " (it holds the long connection; see Procfile.ws)"
            if settings.feishu.connection == "ws" else " and the web process (see Procfile)."))
    return lines


# -- database --------------------------------------------------------------------------------------

def check_database(settings: Settings, report: "_Reporter", lock_wait: float = 2.0) -> None:
    from storage.db import journal_mode, open_db, schema_version, set_lock_wait, write_probe
    from storage.migrations import MIGRATIONS

    if pg.is_url(settings.db_path):
        return _check_postgres(str(settings.db_path), report)
    path = Path(settings.db_path)
    where = str(path)
    fix = ("set OPSBOT_DB to a file in a folder this user can write (default ./var/opsbot.db), "
           "or fix the folder's owner and permissions")
    report.step("database", "OPSBOT_DB may sit on a slow or network disk, or another process "
                            "holds its write lock: put it on a local disk; stop stuck processes")
    try:
        db = open_db(path)
    except (OSError, sqlite3.Error) as exc:
        report(Finding(FAIL, "database", f"{where} cannot be opened or migrated "
                       f"({type(exc).__name__}: {exc})", fix))
        return _disk(path, report)
    try:
        latest = len(MIGRATIONS)
        version = schema_version(db)
        mode = journal_mode(db)
        # A running worker may hold the write lock for a moment; wait a little, not 30 s.
        set_lock_wait(db, lock_wait)
        writable = write_probe(db)
    except sqlite3.Error as exc:
        report(Finding(FAIL, "database", f"{where} opened but cannot be read "
                       f"({type(exc).__name__}: {exc})",
                       "the file may be damaged or not an SQLite database: move it aside and "
                       "let opsbot create a new one"))
        db.conn.close()
        return _disk(path, report)
    db.conn.close()
    if version > latest:
        report(Finding(FAIL, "database", f"{where} is at schema v{version}, newer than this "
                       f"opsbot knows (v{latest})",
                       "upgrade opsbot to the version that wrote this database"))
    elif "locked" in writable:
        report(Finding(WARN, "database", f"{where} opens; schema v{version}; write lock busy "
                       f"for over {lock_wait:g} s, writability not verified",
                       "if no opsbot process is running, a stuck one holds the lock: stop it"))
    elif writable:
        report(Finding(FAIL, "database", f"{where} is not writable ({writable})", fix))
    elif mode != "wal":
        report(Finding(WARN, "database", f"{where} opens; schema v{version} (current); "
                       f"journal mode {mode}, not WAL: web and worker will block each other",
                       "put OPSBOT_DB on a local disk (network file systems do not support WAL)"))
    else:
        report(Finding(OK, "database", f"{where} opens; schema v{version} (current); WAL; "
                       "writable"))
    _disk(path, report)


def _check_postgres(url: str, report: "_Reporter") -> None:
    """``OPSBOT_DB`` names a PostgreSQL server: it answers, migrates, and takes a write."""
    from storage.db import open_db, schema_version, write_probe
    from storage.migrations import MIGRATIONS

    where = pg.redacted(url)
    report.step("database", "the PostgreSQL server may be slow to answer or unreachable: check "
                            "its host, port and that it accepts connections from this machine")
    try:
        db = open_db(url)
    except Exception as exc:  # noqa: BLE001 - any driver or pool error is the finding
        report(Finding(FAIL, "database", f"{where} cannot be opened or migrated "
                       f"({type(exc).__name__}: {pg.redacted(str(exc))})",
                       "check the URL (host, port, database, user) and that the user may create "
                       "tables in that database"))
        return
    try:
        version = schema_version(db)
        writable = write_probe(db)
    finally:
        db.conn.close()
    if version > len(MIGRATIONS):
        report(Finding(FAIL, "database", f"{where} is at schema v{version}, newer than this "
                       f"opsbot knows (v{len(MIGRATIONS)})",
                       "upgrade opsbot to the version that wrote this database"))
    elif writable:
        report(Finding(FAIL, "database", f"{where} is not writable ({pg.redacted(writable)})",
                       "grant the user write access to the database"))
    else:
        report(Finding(OK, "database", f"{where} (PostgreSQL) answers; schema v{version} "
                       "(current); writable"))


def _disk(path: Path, report: "_Reporter") -> None:
    folder = path.parent
    while not folder.is_dir() and folder != folder.parent:
        folder = folder.parent
    try:
        free = shutil.disk_usage(folder).free
    except OSError as exc:
        report(Finding(WARN, "database.disk", f"free space at {folder} unknown ({exc})"))
        return
    what = f"{_size(free)} free at {folder}"
    if free < DISK_FAIL_BYTES:
        report(Finding(FAIL, "database.disk", what + ": SQLite will fail to write",
                       "free disk space or move OPSBOT_DB to a larger disk"))
    elif free < DISK_WARN_BYTES:
        report(Finding(WARN, "database.disk", what + ": little room for the queue and results",
                       "free disk space or move OPSBOT_DB to a larger disk"))
    else:
        report(Finding(OK, "database.disk", what))


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit in ("B", "KB") else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"  # pragma: no cover


# -- Feishu ----------------------------------------------------------------------------------------

def check_feishu(settings: Settings, report: "_Reporter", timeout: float) -> None:
    f = settings.feishu
    report.step("feishu.token", f"check that this machine reaches {f.domain} (proxy, firewall, "
                                "FEISHU_DOMAIN)")
    from bot.errors import FeishuError
    from bot.feishu.client import FeishuClient

    client = FeishuClient(f, timeout=timeout)
    try:
        client.check_token()
    except FeishuError as exc:
        report(_feishu_finding("feishu.token", exc, settings, scopes="", context="token"))
        return
    report(Finding(OK, "feishu.token", f"tenant token obtained from {f.domain} for app "
                                       f"{f.app_id}"))
    report.step("feishu.bot", f"check that this machine reaches {f.domain}")
    report(check_bot_identity(settings, client, timeout))

    for check, scoped in _per_pipeline(settings, "feishu.alert_chat", "alert_chat_id"):
        _check_alert_chat(client, scoped, report, check)
    _check_results_columns(client, settings, report)
    for check, scoped in _per_pipeline(settings, "feishu.bitable", "bitable_table_id"):
        _check_table(client, scoped, report, check)


def _per_pipeline(settings: Settings, check: str, key: str) -> list[tuple[str, Settings]]:
    """``(check name, settings)`` for each distinct chat or table (``key`` of the pipelines):
    the single pipeline's as before; with ``[[pipelines]]`` one per value, named after the
    pipelines that use it (``feishu.alert_chat[drama,news]``)."""
    if not settings.pipelines_listed:
        return [(check, settings)]
    groups: dict[str, list[str]] = {}
    for spec in settings.pipelines:
        value = getattr(spec, key)
        if value:
            groups.setdefault(value, []).append(spec.name)
    return [(f"{check}[{','.join(names)}]", settings.scoped(names[0]))
            for names in groups.values()]


def _check_alert_chat(client, settings: Settings, report: "_Reporter", check: str) -> None:
    from bot.errors import FeishuError

    f = settings.feishu
    if f.alert_chat_id:
        report.step(check, f"check that this machine reaches {f.domain}")
        try:
            member = client.is_bot_in_chat(f.alert_chat_id)
        except FeishuError as exc:
            report(_feishu_finding(check, exc, settings, context="chat",
                                   scopes="im:chat:readonly"))
        else:
            if member:
                report(Finding(OK, check,
                               f"the bot is a member of {f.alert_chat_id} (sending also needs "
                               "scope im:message:send_as_bot, not checked without posting)"))
            else:
                report(Finding(FAIL, check,
                               f"the bot is not a member of {f.alert_chat_id}: alerts cannot be "
                               "posted there", _ADD_BOT_FIX))


def _check_table(client, settings: Settings, report: "_Reporter", check: str) -> None:
    from bot.errors import FeishuError

    f = settings.feishu
    if f.bitable_app_token and f.bitable_table_id:
        report.step(check, f"check that this machine reaches {f.domain}")
        try:
            names = set(client.list_field_names(f.bitable_app_token, f.bitable_table_id))
        except FeishuError as exc:
            report(_feishu_finding(check, exc, settings, context="bitable",
                                   scopes="bitable:app"))
            return
        fields = _fields_finding(settings, names)   # its check name + the pipelines suffix
        report(dataclasses.replace(fields, check=fields.check + check[len("feishu.bitable"):]))
        if f.bitable_status_field not in names:
            return
        try:
            rows = client.search_records(f.bitable_app_token, f.bitable_table_id,
                                         field_name=f.bitable_status_field,
                                         value=f.bitable_pending_value, page_size=1, max_pages=1)
        except FeishuError as exc:
            report(_feishu_finding(check, exc, settings, context="bitable",
                                   scopes="bitable:app"))
            return
        pending = ("at least one row is" if rows else "no row is") + \
            f" {f.bitable_pending_value!r} now"
        report(Finding(OK, check, f"table {f.bitable_table_id} is readable; "
                                             f"{pending}"))


_OLD_RULE = ("in groups any message that starts with an @mention is taken as a command, "
             "\"@Alice run\" too")


def check_bot_identity(settings: Settings, client, lock_wait: float = 2.0) -> Finding:
    """Look the bot's open_id up (``bot/v3/info``) and store it, as the worker does at start.

    With it, group messages are commands only when they @ the bot; without it the older rule
    holds (see :mod:`bot.chat.addressing`). Storing it here makes a fix take effect at once.
    """
    from storage.db import open_db, set_lock_wait

    from bot.chat import identity
    from bot.errors import FeishuError, FeishuNetworkError

    f = settings.feishu
    try:
        db = open_db(settings.db_path)
    except (OSError, sqlite3.Error):
        db = None  # the database line says why; the lookup is still worth checking
    try:
        stored = identity.load(db, f.app_id) if db is not None else None
        try:
            ident = identity.look_up(client, f.app_id, time.time())
        except FeishuError as exc:
            fix = _feishu_finding("feishu.bot", exc, settings, context="bot",
                                  scopes="im:message").fix
            cause = exc.msg if isinstance(exc, FeishuNetworkError) else \
                f"code {exc.code}: {exc.msg}" + (f"; log_id {exc.log_id}" if exc.log_id else "")
            kept = (f"; the open_id stored earlier ({stored.open_id}) stays in use" if stored
                    else f": {_OLD_RULE}")
            return Finding(WARN, "feishu.bot", "cannot look up the bot's own open_id "
                           f"(GET /open-apis/bot/v3/info: {cause}){kept}", fix)
        where = "stored for the web process and the worker"
        if db is not None:
            try:  # a running worker may hold the write lock: wait a little, not 30 s
                set_lock_wait(db, lock_wait)
                identity.store(db, ident, now=ident.checked_at)
            except sqlite3.Error as exc:
                where = f"not stored ({type(exc).__name__}: {exc})"
    finally:
        if db is not None:
            db.conn.close()
    if not ident.active:
        return Finding(WARN, "feishu.bot", f"the bot {ident.app_name or '?'} ({ident.open_id}) "
                       f"is not enabled in this tenant (activate_status {ident.activate_status}):"
                       " it receives no messages", "publish an app version and have the tenant "
                       "admin approve and enable it in the admin console")
    return Finding(OK, "feishu.bot", f"the bot is {ident.app_name or '?'} ({ident.open_id}); in "
                   f"groups only messages that @ it are commands ({where})")


def check_legacy_callbacks(settings: Settings, report: "_Reporter") -> None:
    """Whether old-style card callbacks arrive (the web process counts them in the kv table)."""
    from storage import kv
    from storage.db import open_db

    from bot.web.legacy_callbacks import LEGACY_KV_KEY

    try:
        db = open_db(settings.db_path, migrate=False)
        try:
            seen = kv.get_json(db, LEGACY_KV_KEY)
        finally:
            db.conn.close()
    except (OSError, sqlite3.Error):
        return  # the database line already says what is wrong
    if not isinstance(seen, dict) or not seen.get("count"):
        if not settings.feishu.configured:
            return  # no app, no buttons: nothing to say
        report(Finding(OK, "webhook.card_callbacks", "no old-style card callback (POST "
                       "/webhook/card) received; buttons use card.action.trigger"))
        return

    def day(ts: float) -> str:
        return time.strftime("%Y-%m-%d %H:%M", time.localtime(float(ts)))
    report(Finding(WARN, "webhook.card_callbacks",
                   f"{seen['count']} old-style card callback(s) (card.action.trigger_v1 at POST "
                   f"/webhook/card) since {day(seen.get('first_at', 0))}, last "
                   f"{day(seen.get('last_at', 0))}: they get the toast only and the card changes "
                   "a moment later by API PATCH, because the old answer format cannot carry "
                   "opsbot's JSON 2.0 cards",
                   f"in {_CONSOLE} > Events & Callbacks > Callback Configuration subscribe "
                   "card.action.trigger (the new card callback) with request URL "
                   "https://YOUR_HOST/webhook/event, then remove the old card request URL"))
ATTACHMENT, TEXT, URL = 17, 1, 15   # Feishu's field types
LOG_TYPES = {"text": TEXT, "number": 2, "date": 5}  # LOG_FIELDS' kinds as Feishu field types


def _check_results_columns(client, settings: Settings, report: "_Reporter") -> None:
    """The video column of the task table and the columns of the attempt log table."""
    from bot.feishu.bitable_sync import LOG_FIELDS
    from bot.errors import FeishuError

    f = settings.feishu
    if f.bitable_app_token and f.bitable_table_id and f.bitable_video_field:
        report.step("feishu.bitable_video", f"check that this machine reaches {f.domain}")
        try:
            types = {c["field_name"]: c["type"]
                     for c in client.list_fields(f.bitable_app_token, f.bitable_table_id)}
        except FeishuError as exc:
            report(_feishu_finding("feishu.bitable_video", exc, settings, context="bitable",
                                   scopes="bitable:app"))
        else:
            report(_video_finding(settings, types))
    if f.bitable_app_token and f.bitable_log_table_id:
        report.step("feishu.log_table", f"check that this machine reaches {f.domain}")
        try:
            types = {c["field_name"]: c["type"]
                     for c in client.list_fields(f.bitable_app_token, f.bitable_log_table_id)}
        except FeishuError as exc:
            finding = _feishu_finding("feishu.log_table", exc, settings, context="bitable",
                                      scopes="bitable:app")
            if exc.code in (1254004, 1254041):
                finding = Finding(FAIL, "feishu.log_table",
                                  f"feishu.bitable_log_table_id={f.bitable_log_table_id} not "
                                  f"found (code {exc.code}: {exc.msg})",
                                  "create the log table in the same Bitable and set "
                                  "bitable_log_table_id to its tbl... id (or set it to \"\")")
            report(finding)
            return
        missing = [n for n in LOG_FIELDS if n not in types]
        wrong = [n for n in LOG_FIELDS if n in types and types[n] != LOG_TYPES[LOG_FIELDS[n]]]
        if missing:
            kinds = ", ".join(f"{n} ({LOG_FIELDS[n]})" for n in missing)
            report(Finding(FAIL, "feishu.log_table",
                           f"the log table {f.bitable_log_table_id} lacks column(s) "
                           f"{', '.join(missing)}: its rows would be refused",
                           f"add the column(s) {kinds} to the log table"))
        elif wrong:
            found = ", ".join(f"{n} is type {types[n]}" for n in wrong)
            kinds = ", ".join(f"{n} {LOG_FIELDS[n]} (type {LOG_TYPES[LOG_FIELDS[n]]})"
                              for n in wrong)
            report(Finding(FAIL, "feishu.log_table",
                           f"the log table {f.bitable_log_table_id} has column(s) of the wrong "
                           f"type ({found}): its rows would be refused",
                           f"make {kinds} in the log table"))
        else:
            report(Finding(OK, "feishu.log_table", f"the log table {f.bitable_log_table_id} has "
                                                   f"the {len(LOG_FIELDS)} columns the attempt "
                                                   "log writes"))


def _video_finding(settings: Settings, types: dict[str, Any]) -> Finding:
    f = settings.feishu
    name, mode = f.bitable_video_field, f.bitable_video_mode
    if name not in types:
        kind = "an attachment" if mode == "upload" else "a text"
        return Finding(WARN, "feishu.bitable_video",
                       f"the table has no column {name!r}: finished videos are not written back",
                       f"add {kind} column named {name!r} (or change "
                       "feishu.bitable_video_field)")
    wanted = (ATTACHMENT,) if mode == "upload" else (TEXT,)
    if types[name] not in wanted:
        kind = "attachment" if mode == "upload" else "text"
        return Finding(FAIL, "feishu.bitable_video",
                       f"column {name!r} has field type {types[name]}, not {kind}: the "
                       f"{mode} of each video would be refused",
                       f"make {name!r} a{'n' if kind == 'attachment' else ''} {kind} column, or "
                       f"set feishu.bitable_video_mode = "
                       f"{'link' if mode == 'upload' else 'upload'}")
    return Finding(OK, "feishu.bitable_video", f"column {name!r} takes the videos ({mode})")


def check_long_connection(settings: Settings, report: "_Reporter", timeout: float) -> None:
    """FEISHU_CONNECTION=ws: the discovery request the SDK makes first must answer code 0.

    Only discovery: a connection opened here would take events from the worker's."""
    import requests

    from bot.feishu.longconn import DISCOVERY_PATH, probe_endpoint

    f = settings.feishu
    url = f.domain.rstrip("/") + DISCOVERY_PATH
    reach = f"check that this machine reaches {f.domain} (proxy, firewall, FEISHU_DOMAIN)"
    report.step("feishu.connection", reach)
    try:
        code, msg, config = probe_endpoint(f, timeout)
    except requests.RequestException as exc:
        report(Finding(FAIL, "feishu.connection", f"{url} did not answer "
                       f"({type(exc).__name__})", reach))
        return
    except ValueError as exc:
        report(Finding(FAIL, "feishu.connection", f"{url} answered {exc}",
                       "FEISHU_DOMAIN must be the open platform's base URL "
                       "(https://open.feishu.cn; Lark: https://open.larksuite.com)"))
        return
    if code == 0:
        ping = f"; ping every {config['PingInterval']} s" if "PingInterval" in config else ""
        report(Finding(OK, "feishu.connection", f"long-connection discovery at {url} answered "
                       f"code 0{ping} (no connection opened here, so no event is taken from a "
                       "running worker)"))
        return
    report(Finding(FAIL, "feishu.connection", f"long-connection discovery refused: code {code} "
                   f"{msg!r}", _cred_fix() + "; and in " + _CONSOLE + " > Events & Callbacks, "
                   "choose 'Receive events through persistent connection' for events and for "
                   "callbacks (the console accepts it while `opsbot worker` is connected)"))


_ADD_BOT_FIX = ("add the bot to the group: open the group > Settings > Group bots > Add bot, "
                "pick this app (or check FEISHU_ALERT_CHAT_ID is the right oc_... id)")


def _fields_finding(settings: Settings, names: set[str]) -> Finding:
    f = settings.feishu
    if f.bitable_status_field not in names:
        return Finding(FAIL, "feishu.bitable_fields",
                       f"the table has no column {f.bitable_status_field!r}: `run` from chat "
                       "cannot find pending rows",
                       f"add a text or single-select column named {f.bitable_status_field!r} "
                       "(or set BITABLE_STATUS_FIELD to the column's name)")
    wanted = [(f.bitable_task_id_field, "task ids fall back to record ids"),
              (f.bitable_execute_id_field, "results are not written back there"),
              (f.bitable_output_field, "results are not written back there"),
              (f.bitable_error_field, "results are not written back there"),
              (f.bitable_duration_field, "results are not written back there")]
    missing = [name for name, _ in wanted if name and name not in names]
    used = [f.bitable_status_field] + [name for name, _ in wanted if name]
    if not missing:
        return Finding(OK, "feishu.bitable_fields",
                       f"the table has the columns opsbot uses: {', '.join(used)}")
    effects = sorted({effect for name, effect in wanted if name in missing})
    return Finding(WARN, "feishu.bitable_fields",
                   f"the table lacks column(s) {', '.join(missing)} ({'; '.join(effects)})",
                   f"add text column(s) named {', '.join(missing)} to the table (or rename "
                   "them in the [feishu] bitable_*_field keys of the OPSBOT_CONFIG file)")


def _feishu_finding(check: str, exc, settings: Settings, *, context: str,
                    scopes: str) -> Finding:
    """Translate a FeishuError into a finding whose fix a newcomer can follow."""
    from bot.errors import FeishuNetworkError

    f = settings.feishu
    said = f"code {exc.code}: {exc.msg}" + (f"; log_id {exc.log_id}" if exc.log_id else "")
    if isinstance(exc, FeishuNetworkError):
        return Finding(FAIL, check, f"no answer from {f.domain} ({exc.msg})",
                       f"check that this machine reaches {f.domain} (proxy, firewall) and that "
                       "FEISHU_DOMAIN is right (https://open.feishu.cn; Lark: "
                       "https://open.larksuite.com)")
    code = exc.code
    if code in (10003, 10014) or (context == "token" and code in (10012, 10013, 10015)):
        return Finding(FAIL, check, f"Feishu refused the app credentials ({said})", _CRED_FIX)
    if code in (99991672, 230027, 232014, 1254302, 91403):
        if code in (1254302, 91403):
            return Finding(FAIL, check, f"the app has no access to this Bitable ({said})",
                           "open the Bitable > ... (top right) > More > Add document app, add "
                           "this app with edit permission")
        asked = _scopes_in(exc.msg) or scopes
        if context == "chat":
            return Finding(WARN, check, f"cannot check the bot's membership of "
                           f"{f.alert_chat_id}: scope missing ({said})",
                           f"in {_CONSOLE} > Permissions & Scopes add {asked}, {_PUBLISH}; "
                           "sending alerts needs im:message and im:message:send_as_bot")
        return Finding(FAIL, check, f"the app lacks a permission scope ({said})",
                       f"in {_CONSOLE} > Permissions & Scopes add {asked} (opsbot needs "
                       f"im:message, im:message:send_as_bot, bitable:app), {_PUBLISH}")
    if code in (230002, 232011):
        return Finding(FAIL, check, f"the bot is not in the group {f.alert_chat_id} ({said})",
                       _ADD_BOT_FIX)
    if code in (230006, 232025):
        return Finding(FAIL, check, f"the app's bot ability is off ({said})",
                       f"in {_CONSOLE} > Features > Bot: enable it, {_PUBLISH}")
    if code == 232034:
        return Finding(FAIL, check, f"the app is not installed or enabled in this tenant "
                       f"({said})", "publish an app version and have the tenant admin approve "
                                    "it in the admin console")
    if code in (230001, 232001, 232006, 232010) and context == "chat":
        return Finding(FAIL, check, f"FEISHU_ALERT_CHAT_ID={f.alert_chat_id} is not a chat this "
                       f"app can see ({said})",
                       "set FEISHU_ALERT_CHAT_ID to the group's chat_id (oc_..., e.g. from the "
                       "chat_id of a message event in that group)")
    if code in (91402, 1254003, 1254040) and context == "bitable":
        return Finding(FAIL, check, f"BITABLE_APP_TOKEN={f.bitable_app_token} not found "
                       f"({said})", "BITABLE_APP_TOKEN is the part of the table's URL after "
                                    "/base/ (a wiki-embedded table has a different token)")
    if code in (1254004, 1254041) and context == "bitable":
        return Finding(FAIL, check, f"BITABLE_TABLE_ID={f.bitable_table_id} not found "
                       f"({said})", "BITABLE_TABLE_ID is the tbl... value after ?table= in "
                                    "the table's URL")
    if code == 1254045 and context == "bitable":
        return Finding(FAIL, check, f"a column opsbot filters on does not exist ({said})",
                       f"add a column named {f.bitable_status_field!r} or set "
                       "BITABLE_STATUS_FIELD")
    if exc.retryable:
        return Finding(WARN, check, f"Feishu is busy or failing right now ({said})",
                       "run `opsbot doctor` again in a minute; if it persists check "
                       "status.feishu.cn")
    return Finding(FAIL, check, f"Feishu answered {said}",
                   "look the code up at https://open.feishu.cn/document/server-docs/"
                   "api-call-guide/generic-error-code")


def _scopes_in(msg: str) -> str:
    match = re.search(r"\[([^\]]+)\]", msg or "")
    return match.group(1).strip() if match else ""


# -- Coze ------------------------------------------------------------------------------------------

_PROBE_EXECUTE_ID = "0"   # no run has this id: a history read answers "not found"


def check_coze(settings: Settings, report: "_Reporter", timeout: float,
               check: str = "coze.api") -> None:
    c = settings.coze
    url = c.base_url
    report.step(check, f"check COZE_BASE_URL={url} and that this machine reaches it "
                       "(DNS, proxy, firewall)")
    from pipeline.coze import CozeClient
    from pipeline.errors import CozeError

    async def probe() -> None:
        async with CozeClient(url, c.api_token.get(), timeout=timeout) as coze:
            await coze.poll(c.workflow_id or "0", _PROBE_EXECUTE_ID)

    try:
        asyncio.run(probe())
    except CozeError as exc:
        report(dataclasses.replace(_coze_finding(url, exc), check=check))
        return
    report(Finding(OK, check, f"{url} reachable; token accepted"))


def _coze_finding(url: str, exc) -> Finding:
    code, status = exc.code, exc.http_status
    said = (f"code {code}" + (f", HTTP {status}" if status else "")
            + (f": {exc.message}" if exc.message else "")
            + (f"; logid {exc.log_id}" if exc.log_id else ""))
    if code == "network":
        return Finding(FAIL, "coze.api", f"cannot reach {url} ({exc.message})",
                       "check COZE_BASE_URL (https://api.coze.cn for coze.cn, https://api.coze.com "
                       "for coze.com), DNS, proxy and firewall from this machine")
    if code == "4100" or status == 401:
        return Finding(FAIL, "coze.api", f"{url} rejected the token: invalid or expired ({said})",
                       _COZE_TOKEN_FIX)
    if code == "4101" or status == 403:
        return Finding(FAIL, "coze.api", f"{url} accepted the token but it lacks permission "
                       f"({said})", "give the token access to the workspace that holds the "
                                    "workflow (or create one there), and set COZE_API_TOKEN")
    if code in ("4200", "4314") or (status == 404 and code.isdigit()):
        return Finding(OK, "coze.api", f"{url} reachable; token accepted (the probe's dummy run "
                       f"is not found, as expected: {code})")
    if code == "http_404":
        return Finding(WARN, "coze.api", f"{url} answered HTTP 404 without a Coze code: it may "
                       "not be the Coze API", "set COZE_BASE_URL to https://api.coze.cn "
                                             "(coze.com: https://api.coze.com)")
    if code in ("4009", "4013", "4020") or status == 429:
        return Finding(WARN, "coze.api", f"{url} reachable, token not verified: rate limited "
                       f"({said})", "run `opsbot doctor` again in a minute; if batches are "
                                    "running, this is their load")
    if code == "bad_response":
        return Finding(FAIL, "coze.api", f"{url} does not answer like the Coze API ({said})",
                       "set COZE_BASE_URL to https://api.coze.cn (coze.com: "
                       "https://api.coze.com)")
    if status is not None and status >= 500:
        return Finding(WARN, "coze.api", f"{url} is failing right now ({said})",
                       "run `opsbot doctor` again later; batches retry server errors")
    return Finding(WARN, "coze.api", f"{url} answered an unexpected {said}",
                   "look the code up in the Coze API docs (Error codes)")


# -- plumbing --------------------------------------------------------------------------------------

class _Reporter:
    """Collects a section's findings; ``step`` names what is running, for a timeout report."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.findings: list[Finding] = []
        self.current = ""
        self.fix = ""

    def __call__(self, finding: Finding) -> None:
        with self.lock:
            self.findings.append(finding)

    def step(self, check: str, fix: str) -> None:
        with self.lock:
            self.current, self.fix = check, fix


class _Section:
    """One group of checks in a daemon thread (a hung call never keeps the process alive)."""

    def __init__(self, name: str, fn: Callable[[_Reporter], None]) -> None:
        self.name = name
        self.fn = fn
        self.reporter = _Reporter()
        self.thread = threading.Thread(target=self._run, name=f"doctor-{name}", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def _run(self) -> None:
        try:
            self.fn(self.reporter)
        except Exception as exc:  # a bug or an unforeseen failure: report it, do not crash
            self.reporter(Finding(FAIL, self.reporter.current or self.name,
                                  f"check crashed: {type(exc).__name__}: {exc}",
                                  "report this as an opsbot bug, with this line"))

    def wait(self, deadline: float, budget: float) -> list[Finding]:
        self.thread.join(max(0.0, deadline - time.monotonic()))
        with self.reporter.lock:
            findings = list(self.reporter.findings)
            if self.thread.is_alive():
                findings.append(Finding(FAIL, self.reporter.current or self.name,
                                        f"no answer within the doctor's {budget:g} s",
                                        self.reporter.fix))
        return findings


class _quiet_loggers:
    """Keep library log lines (token refresh notices, lark-oapi errors) out of the report."""

    NAMES = ("opsbot.feishu", "Lark", "pipeline.coze", "urllib3")

    def __enter__(self) -> None:
        self.saved = {n: logging.getLogger(n).level for n in self.NAMES}
        for n in self.NAMES:
            logging.getLogger(n).setLevel(logging.CRITICAL)

    def __exit__(self, *exc: object) -> None:
        for n, level in self.saved.items():
            logging.getLogger(n).setLevel(level)


def _scrub(text: str, secrets: list[str]) -> str:
    for secret in secrets:
        text = text.replace(secret, "***")
    return text

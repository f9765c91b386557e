"""``opsbot doctor`` against the fake Feishu server and the Coze simulator, both on loopback.

Each test scripts one problem and asserts the exact line (level, check, what, fix) and the exit
code; every run also asserts that no secret appears anywhere in the output.
"""
from __future__ import annotations

import io
import os
import socket
import time

import pytest

from bot.ops import doctor
from bot.ops.cli import main
from bot.settings import load_settings
from pipeline.standins.simulator import CozeSimulator
from storage import pg
from storage.migrations import MIGRATIONS
from tests.fake_feishu import FakeFeishu
from tests.helpers import held_write_lock

APP_SECRET = "app-secret-Q7f3kz9"
VERIFICATION_TOKEN = "verif-token-M2p8"
ENCRYPT_KEY = "encrypt-key-W5x1"
COZE_TOKEN = "pat_coze-token-R4n6"
SECRETS = (APP_SECRET, VERIFICATION_TOKEN, ENCRYPT_KEY, COZE_TOKEN)

CHAT = "oc_ops"
APP_TOKEN = "bascnOpsTable"
TABLE = "tblTasks"
ALL_FIELDS = ["状态", "task_id", "execute_id", "输出", "错误", "耗时(秒)", "主题"]
CHAT_PATH = f"/open-apis/im/v1/chats/{CHAT}/members/is_in_chat"
FIELDS_PATH = f"/open-apis/bitable/v1/apps/{APP_TOKEN}/tables/{TABLE}/fields"
CONSOLE = "the Feishu developer console (open.feishu.cn/app, your app)"
CRED_FIX = (f"copy App ID and App Secret from {CONSOLE} > Credentials & Basic Info into "
            "FEISHU_APP_ID and FEISHU_APP_SECRET")
ADD_BOT_FIX = ("add the bot to the group: open the group > Settings > Group bots > Add bot, "
               "pick this app (or check FEISHU_ALERT_CHAT_ID is the right oc_... id)")
COZE_TOKEN_FIX = ("create a personal access token on coze.cn (API > Personal access tokens) "
                  "with permission to run workflows in the workflow's workspace, and set "
                  "COZE_API_TOKEN to it")


class FeishuState:
    """What the fake's two extra routes (membership, field list) answer."""

    def __init__(self) -> None:
        self.in_chat = True
        self.chat_error: tuple[int, str] | None = None
        self.fields = list(ALL_FIELDS)
        self.fields_error: tuple[int, str] | None = None

    def chat(self, rec):
        if self.chat_error:
            return 400, {"code": self.chat_error[0], "msg": self.chat_error[1]}
        return 200, {"code": 0, "msg": "success", "data": {"is_in_chat": self.in_chat}}

    def field_list(self, rec):
        if self.fields_error:
            return 400, {"code": self.fields_error[0], "msg": self.fields_error[1]}
        items = [{"field_id": f"fld{i}", "field_name": n, "type": 1}
                 for i, n in enumerate(self.fields)]
        return 200, {"code": 0, "msg": "success",
                     "data": {"items": items, "has_more": False, "total": len(items)}}


@pytest.fixture
def fake():
    with FakeFeishu(app_secret=APP_SECRET) as server:
        state = FeishuState()
        server.on("GET", CHAT_PATH, state.chat)
        server.on("GET", FIELDS_PATH, state.field_list)
        server.seed_records(APP_TOKEN, TABLE, [{"状态": "待处理", "task_id": "t1"},
                                               {"状态": "待处理", "task_id": "t2"}])
        server.state = state
        yield server


@pytest.fixture
def sim():
    simulator = CozeSimulator(token=COZE_TOKEN)
    simulator.start_in_thread()
    yield simulator
    simulator.stop_thread()


@pytest.fixture
def env(fake, sim, db_path):
    return {
        "FEISHU_APP_ID": fake.app_id, "FEISHU_APP_SECRET": APP_SECRET,
        "FEISHU_DOMAIN": fake.base_url, "FEISHU_VERIFICATION_TOKEN": VERIFICATION_TOKEN,
        "FEISHU_ENCRYPT_KEY": ENCRYPT_KEY, "FEISHU_ALERT_CHAT_ID": CHAT,
        "FEISHU_ADMIN_IDS": "ou_admin1,ou_admin2", "BITABLE_APP_TOKEN": APP_TOKEN,
        "BITABLE_TABLE_ID": TABLE, "COZE_API_TOKEN": COZE_TOKEN, "COZE_WORKFLOW_ID": "7412",
        "COZE_BASE_URL": sim.base_url, "OPSBOT_DB": str(db_path),
    }


def _database_checks(env) -> list[str]:
    """The doctor's store checks: ``database``, and ``database.disk`` for a SQLite file."""
    return ["database"] if pg.is_url(env["OPSBOT_DB"]) else ["database", "database.disk"]


def run(env: dict, **kwargs) -> tuple[int, list[str]]:
    out = io.StringIO()
    code = doctor.run_doctor(load_settings(env), out=out, **kwargs)
    text = out.getvalue()
    for secret in SECRETS:
        assert secret not in text, f"secret {secret!r} printed"
    return code, text.splitlines()


def line_of(lines: list[str], check: str) -> str:
    found = [ln for ln in lines if ln[6:].startswith(check + ": ")]
    assert len(found) == 1, f"expected one {check!r} line in:\n" + "\n".join(lines)
    return found[0]


def levels(lines: list[str]) -> dict[str, str]:
    return {ln[6:].split(":", 1)[0]: ln[:4].strip() for ln in lines
            if ln[:4].strip() in ("OK", "WARN", "FAIL")}


def test_everything_configured_and_working_is_all_ok(env, fake, sim):
    code, lines = run(env)
    assert code == 0
    checks = ["settings.feishu", "settings.security", "settings.alerts", "settings.bitable",
              "settings.admins", "settings.mentions", "settings.coze", *_database_checks(env),
              "feishu.token", "feishu.alert_chat", "feishu.bitable_fields", "feishu.bitable",
              "coze.api", "feishu.bot", "webhook.card_callbacks"]
    assert levels(lines) == {name: "OK" for name in checks}
    assert line_of(lines, "settings.security") == (
        "OK    settings.security: FEISHU_VERIFICATION_TOKEN set (hidden), "
        "FEISHU_ENCRYPT_KEY set (hidden)")
    assert line_of(lines, "feishu.bitable") == (
        f"OK    feishu.bitable: table {TABLE} is readable; at least one row is '待处理' now")
    assert line_of(lines, "coze.api") == (
        f"OK    coze.api: {sim.base_url} reachable; token accepted (the probe's dummy run is not "
        "found, as expected: 4314)")
    assert lines[-2:] == [f"doctor: {len(checks)} OK, 0 WARN, 0 FAIL",
                          "All good: start `opsbot worker` and the web process (see Procfile)."]
    # The table was read one row at a time, once; nothing was posted; no Coze run was started.
    [search] = fake.requests_to("/records/search")
    assert search["query"]["page_size"] == "1"
    assert fake.messages == [] and sim.runs == {}


def test_nothing_configured_points_to_the_demo(db_path):
    env = {"OPSBOT_DB": str(db_path)}
    code, lines = run(env)
    assert code == 1
    assert line_of(lines, "settings.coze") == (
        "FAIL  settings.coze: COZE_API_TOKEN missing, COZE_WORKFLOW_ID missing: no batch can run "
        "against Coze (only with --simulate) — fix: set COZE_API_TOKEN and COZE_WORKFLOW_ID "
        "(the workflow id is the number in the workflow editor's URL, .../workflow/<id>); try "
        "`opsbot demo` to see opsbot work without an account")
    assert line_of(lines, "settings.admins") == (
        "WARN  settings.admins: FEISHU_ADMIN_IDS is empty: nobody can run commands or press "
        "buttons — fix: set FEISHU_ADMIN_IDS to a comma-separated list of open_ids (ou_..., "
        "each person's open_id for this app)")
    assert line_of(lines, "settings.mentions") == (
        "WARN  settings.mentions: no on-call or admin open_ids: HIGH and CRITICAL cards mention "
        "nobody (they say so on the card) — fix: set FEISHU_ONCALL_IDS (or FEISHU_ADMIN_IDS) to "
        "the open_ids to call; OPSBOT_MENTION_ALL=1 mentions everyone instead, where the group "
        "owner allows it")
    assert line_of(lines, "settings.security").startswith(
        "WARN  settings.security: FEISHU_VERIFICATION_TOKEN missing, FEISHU_ENCRYPT_KEY missing: "
        "dev mode, the webhook accepts unverified requests — fix: copy Verification Token")
    assert not any(name.startswith(("feishu.", "coze.")) for name in levels(lines))
    assert lines[-3:] == [
        f"doctor: {len(_database_checks(env))} OK, 6 WARN, 1 FAIL",
        "Nothing is configured yet. To see opsbot work on this machine without any Feishu or "
        "Coze account, run `opsbot demo` first.",
        "For real use set FEISHU_APP_ID, FEISHU_APP_SECRET, FEISHU_VERIFICATION_TOKEN, "
        "FEISHU_ENCRYPT_KEY, FEISHU_ALERT_CHAT_ID, FEISHU_ADMIN_IDS, BITABLE_APP_TOKEN, "
        "BITABLE_TABLE_ID, COZE_API_TOKEN, COZE_WORKFLOW_ID (environment variables, or the same "
        "keys in the TOML file named by OPSBOT_CONFIG), then run `opsbot doctor` again."]


def test_half_configured_feishu_app_fails_naming_the_missing_variable(env):
    del env["FEISHU_APP_SECRET"]
    code, lines = run(env)
    assert code == 1
    assert line_of(lines, "settings.feishu") == (
        f"FAIL  settings.feishu: FEISHU_APP_ID={env['FEISHU_APP_ID']}, FEISHU_APP_SECRET missing: "
        "chat commands, alerts and Bitable need both — fix: copy App ID and App Secret from "
        f"{CONSOLE} > Credentials & Basic Info into FEISHU_APP_SECRET")


@pytest.mark.parametrize("how", ["wrong secret", "code 10003"])
def test_bad_feishu_credentials(env, fake, how):
    if how == "wrong secret":
        env["FEISHU_APP_SECRET"] = "not-the-secret-1234"
        said = "code 10014: tenant token refused: app secret invalid"
    else:
        fake.fail("token", code=10003, msg="invalid param")
        said = "code 10003: tenant token refused: invalid param"
    code, lines = run(env)
    assert code == 1
    assert line_of(lines, "feishu.token") == (
        f"FAIL  feishu.token: Feishu refused the app credentials ({said}) — fix: {CRED_FIX}")
    # The token is what every other Feishu call needs: they are not attempted.
    assert [n for n in levels(lines) if n.startswith("feishu.")] == ["feishu.token"]
    assert env["FEISHU_APP_SECRET"] not in "\n".join(lines)


def test_secret_echoed_by_feishu_is_scrubbed(env, fake):
    fake.fail("token", code=10014, msg=f"app secret {APP_SECRET} invalid")
    code, lines = run(env)  # run() asserts the secret is absent
    assert code == 1
    assert "app secret *** invalid" in line_of(lines, "feishu.token")


def test_bitable_without_permission_names_the_scope(env, fake):
    fake.state.fields_error = (99991672, "Access denied. One of the following scopes is "
                                         "required: [bitable:app].")
    code, lines = run(env)
    assert code == 1
    assert line_of(lines, "feishu.bitable") == (
        "FAIL  feishu.bitable: the app lacks a permission scope (code 99991672: Access denied. "
        "One of the following scopes is required: [bitable:app].; log_id "
        f"{_log_id(lines, 'feishu.bitable')}) — fix: in {CONSOLE} > Permissions & Scopes add "
        "bitable:app (opsbot needs im:message, im:message:send_as_bot, bitable:app), then "
        "publish a new app version")
    assert "feishu.bitable_fields" not in levels(lines)


def test_bitable_not_shared_with_the_app(env, fake):
    fake.state.fields_error = (91403, "Forbidden")
    code, lines = run(env)
    assert code == 1
    assert line_of(lines, "feishu.bitable").startswith(
        "FAIL  feishu.bitable: the app has no access to this Bitable (code 91403: Forbidden")
    assert line_of(lines, "feishu.bitable").endswith(
        "— fix: open the Bitable > ... (top right) > More > Add document app, add this app with "
        "edit permission")


def test_bot_not_in_the_alert_chat(env, fake):
    fake.state.in_chat = False
    code, lines = run(env)
    assert code == 1
    assert line_of(lines, "feishu.alert_chat") == (
        f"FAIL  feishu.alert_chat: the bot is not a member of {CHAT}: alerts cannot be posted "
        f"there — fix: {ADD_BOT_FIX}")


def test_bot_outside_the_chat_error_code(env, fake):
    fake.state.chat_error = (232011, "Operator can NOT be out of the chat.")
    code, lines = run(env)
    assert code == 1
    line = line_of(lines, "feishu.alert_chat")
    assert line.startswith(f"FAIL  feishu.alert_chat: the bot is not in the group {CHAT} "
                           "(code 232011: Operator can NOT be out of the chat.; log_id fake-log-")
    assert line.endswith(f"— fix: {ADD_BOT_FIX}")


def test_membership_unverifiable_without_chat_scope_is_a_warning(env, fake):
    fake.state.chat_error = (99991672, "Access denied. One of the following scopes is required: "
                                       "[im:chat:readonly, im:chat].")
    code, lines = run(env)
    assert code == 0
    line = line_of(lines, "feishu.alert_chat")
    assert line.startswith(f"WARN  feishu.alert_chat: cannot check the bot's membership of {CHAT}:"
                           " scope missing (code 99991672")
    assert line.endswith(f"— fix: in {CONSOLE} > Permissions & Scopes add im:chat:readonly, "
                         "im:chat, then publish a new app version; sending alerts needs "
                         "im:message and im:message:send_as_bot")


def test_missing_write_back_columns_are_named(env, fake):
    fake.state.fields = ["状态", "task_id", "execute_id", "耗时(秒)"]
    code, lines = run(env)
    assert code == 0
    assert line_of(lines, "feishu.bitable_fields") == (
        "WARN  feishu.bitable_fields: the table lacks column(s) 输出, 错误 (results are not "
        "written back there) — fix: add text column(s) named 输出, 错误 to the table (or rename "
        "them in the [feishu] bitable_*_field keys of the OPSBOT_CONFIG file)")
    assert levels(lines)["feishu.bitable"] == "OK"


def test_missing_status_column_fails_and_skips_the_search(env, fake):
    fake.state.fields = ["task_id", "输出"]
    code, lines = run(env)
    assert code == 1
    assert line_of(lines, "feishu.bitable_fields") == (
        "FAIL  feishu.bitable_fields: the table has no column '状态': `run` from chat cannot find "
        "pending rows — fix: add a text or single-select column named '状态' (or set "
        "BITABLE_STATUS_FIELD to the column's name)")
    assert "feishu.bitable" not in levels(lines)
    assert fake.requests_to("/records/search") == []


def test_coze_bad_token(env, sim):
    sim.set_token_valid(False)
    code, lines = run(env)
    assert code == 1
    line = line_of(lines, "coze.api")
    assert line.startswith(f"FAIL  coze.api: {sim.base_url} rejected the token: invalid or expired "
                           "(code 4100, HTTP 401: authentication is invalid; logid ")
    assert line.endswith(f"— fix: {COZE_TOKEN_FIX}")
    assert sim.runs == {}


def test_coze_down(env, sim):
    sim.set_down(True)
    code, lines = run(env)
    assert code == 1
    line = line_of(lines, "coze.api")
    assert line.startswith(f"FAIL  coze.api: cannot reach {sim.base_url} (")
    assert line.endswith(
        "— fix: check COZE_BASE_URL (https://api.coze.cn for coze.cn, https://api.coze.com for "
        "coze.com), DNS, proxy and firewall from this machine")


def test_coze_connection_refused_names_the_url(env):
    port = _free_port()
    env["COZE_BASE_URL"] = f"http://127.0.0.1:{port}"
    code, lines = run(env)
    assert code == 1
    assert line_of(lines, "coze.api").startswith(
        f"FAIL  coze.api: cannot reach http://127.0.0.1:{port} (ClientConnectorError")


@pytest.mark.backend("sqlite", reason="a SQLite file where a folder should be")
def test_unwritable_database_path(env, tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where a folder should be")
    env["OPSBOT_DB"] = str(blocker / "opsbot.db")
    code, lines = run(env)
    assert code == 1
    line = line_of(lines, "database")
    assert line.startswith(
        f"FAIL  database: {blocker / 'opsbot.db'} cannot be opened or migrated (")
    assert line.endswith(
        "— fix: set OPSBOT_DB to a file in a folder this user can write (default ./var/opsbot.db),"
        " or fix the folder's owner and permissions")


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0,
                    reason="root writes through folder permissions")
@pytest.mark.backend("sqlite", reason="a SQLite file's folder permissions")
def test_read_only_database_folder(env, tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        env["OPSBOT_DB"] = str(folder / "opsbot.db")
        code, lines = run(env)
    finally:
        folder.chmod(0o700)
    assert code == 1
    assert line_of(lines, "database").startswith(f"FAIL  database: {folder / 'opsbot.db'} ")


@pytest.mark.backend("sqlite", reason="a SQLite file opened read-only")
def test_read_only_database_file_is_not_writable(env, db_path, monkeypatch):
    """A database that opens but refuses writes (here: a read-only connection)."""
    import sqlite3

    from storage import db as storage_db

    path = db_path
    storage_db.open_db(path).conn.close()
    real_connect = sqlite3.connect

    def read_only(target, *args, **kwargs):
        return real_connect(f"file:{target}?mode=ro", *args, uri=True, **kwargs)

    monkeypatch.setattr(storage_db.sqlite3, "connect", read_only)
    code, lines = run(env)
    assert code == 1
    assert line_of(lines, "database") == (
        f"FAIL  database: {path} is not writable (OperationalError: attempt to write a readonly "
        "database) — fix: set OPSBOT_DB to a file in a folder this user can write (default "
        "./var/opsbot.db), or fix the folder's owner and permissions")


def test_database_locked_by_another_process_is_a_warning(env, db_path):
    from storage.db import open_db

    open_db(db_path).conn.close()
    with held_write_lock(db_path):          # another process in the middle of a write
        code, lines = run(env, timeout=0.5)
    assert code == 0
    opens = f"{db_path} (PostgreSQL) answers" if pg.is_url(db_path) else f"{db_path} opens"
    assert line_of(lines, "database") == (
        f"WARN  database: {opens}; schema v{len(MIGRATIONS)}; write lock busy for over "
        "0.5 s, writability not verified — fix: if no opsbot process is running, a stuck one "
        "holds the lock: stop it")


def test_silent_services_are_bounded_by_the_call_timeout(env):
    with _silent_server() as url:
        env["FEISHU_DOMAIN"] = url
        env["COZE_BASE_URL"] = url
        started = time.monotonic()
        code, lines = run(env, timeout=1.0)
        elapsed = time.monotonic() - started
    assert code == 1 and elapsed < 5
    assert line_of(lines, "feishu.token").startswith(f"FAIL  feishu.token: no answer from {url} (")
    assert line_of(lines, "coze.api") == (
        f"FAIL  coze.api: cannot reach {url} (no answer in 1.0s: GET "
        f"/v1/workflows/7412/run_histories/0) — fix: check COZE_BASE_URL (https://api.coze.cn for "
        "coze.cn, https://api.coze.com for coze.com), DNS, proxy and firewall from this machine")


def test_the_whole_doctor_is_bounded_by_its_budget(env):
    with _silent_server() as url:
        env["FEISHU_DOMAIN"] = url
        env["COZE_BASE_URL"] = url
        started = time.monotonic()
        code, lines = run(env, timeout=30.0, budget=1.5)
        elapsed = time.monotonic() - started
    assert code == 1 and elapsed < 4
    assert line_of(lines, "feishu.token") == (
        f"FAIL  feishu.token: no answer within the doctor's 1.5 s — fix: check that this machine "
        f"reaches {url} (proxy, firewall, FEISHU_DOMAIN)")
    assert line_of(lines, "coze.api").startswith(
        "FAIL  coze.api: no answer within the doctor's 1.5 s — fix: check COZE_BASE_URL=")


def test_cli_doctor_exit_codes_and_no_secrets(env, fake, capsys):
    assert main(["doctor"], env=env) == 0
    fake.state.in_chat = False
    assert main(["doctor"], env=env) == 1
    captured = capsys.readouterr()
    assert "FAIL  feishu.alert_chat: the bot is not a member of oc_ops" in captured.out
    for secret in SECRETS:
        assert secret not in captured.out + captured.err


# -- helpers ---------------------------------------------------------------------------------------

def _log_id(lines: list[str], check: str) -> str:
    line = line_of(lines, check)
    return line.split("log_id ", 1)[1].split(")", 1)[0]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _silent_server:
    """A listening socket that accepts connections (via the backlog) and never answers."""

    def __enter__(self) -> str:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        return f"http://127.0.0.1:{self.sock.getsockname()[1]}"

    def __exit__(self, *exc) -> None:
        self.sock.close()


def test_mention_all_is_flagged_as_needing_the_group_owners_permission(env):
    env["OPSBOT_MENTION_ALL"] = "1"
    code, lines = run(env)
    assert line_of(lines, "settings.mentions").startswith(
        "WARN  settings.mentions: OPSBOT_MENTION_ALL is on: CRITICAL cards mention everyone")


# -- the bot's identity and old-style card callbacks ----------------------------------------------

def test_bot_identity_is_looked_up_and_stored(env, fake):
    from bot.chat import identity
    from storage.db import open_db

    code, lines = run(env)
    assert code == 0
    assert line_of(lines, "feishu.bot") == (
        "OK    feishu.bot: the bot is opsbot (ou_bot); in groups only messages that @ it are "
        "commands (stored for the web process and the worker)")
    db = open_db(env["OPSBOT_DB"])
    assert identity.bot_open_id(db, fake.app_id) == "ou_bot"
    db.conn.close()


def test_bot_identity_lookup_failure_names_the_older_rule(env, fake):
    fake.fail("bot_info", code=230006, msg="Bot ability is not activated.")
    code, lines = run(env)
    assert code == 0   # the bot still answers, by the older rule
    assert line_of(lines, "feishu.bot").startswith(
        "WARN  feishu.bot: cannot look up the bot's own open_id (GET /open-apis/bot/v3/info: "
        "code 230006: Bot ability is not activated.; log_id fake-log-")
    assert line_of(lines, "feishu.bot").endswith(
        "): in groups any message that starts with an @mention is taken as a command, "
        "\"@Alice run\" too — fix: in the Feishu developer console (open.feishu.cn/app, your "
        "app) > Features > Bot: enable it, then publish a new app version")


def test_bot_identity_failure_keeps_the_stored_id(env, fake):
    assert run(env)[0] == 0               # stores ou_bot
    fake.fail("bot_info", status=502)
    code, lines = run(env)
    assert "; the open_id stored earlier (ou_bot) stays in use — fix:" in \
        line_of(lines, "feishu.bot")


def test_bot_not_enabled_in_the_tenant(env, fake):
    fake.bot_activate_status = 1
    code, lines = run(env)
    assert line_of(lines, "feishu.bot") == (
        "WARN  feishu.bot: the bot opsbot (ou_bot) is not enabled in this tenant "
        "(activate_status 1): it receives no messages — fix: publish an app version and have "
        "the tenant admin approve and enable it in the admin console")


def test_old_style_card_callbacks_are_reported(env):
    from bot.web.legacy_callbacks import note_legacy_callback
    from storage.db import open_db

    db = open_db(env["OPSBOT_DB"])
    note_legacy_callback(db, time.mktime((2026, 5, 1, 10, 0, 0, 0, 0, -1)))
    note_legacy_callback(db, time.mktime((2026, 5, 2, 11, 30, 0, 0, 0, -1)))
    db.conn.close()
    code, lines = run(env)
    assert code == 0
    assert line_of(lines, "webhook.card_callbacks") == (
        "WARN  webhook.card_callbacks: 2 old-style card callback(s) (card.action.trigger_v1 at "
        "POST /webhook/card) since 2026-05-01 10:00, last 2026-05-02 11:30: they get the toast "
        "only and the card changes a moment later by API PATCH, because the old answer format "
        "cannot carry opsbot's JSON 2.0 cards — fix: in the Feishu developer console "
        "(open.feishu.cn/app, your app) > Events & Callbacks > Callback Configuration subscribe "
        "card.action.trigger (the new card callback) with request URL "
        "https://YOUR_HOST/webhook/event, then remove the old card request URL")
# --- the video column and the attempt log table (issue 10) -----------------------------------

LOG_TABLE = "tblLog"


def with_toml(env, tmp_path, text):
    path = tmp_path / "opsbot.toml"
    path.write_text(text, encoding="utf-8")
    return {**env, "OPSBOT_CONFIG": str(path)}


def test_log_table_with_every_column_is_ok(env, fake, tmp_path):
    from bot.feishu.bitable_sync import LOG_FIELDS
    fake.set_fields(APP_TOKEN, LOG_TABLE, list(LOG_FIELDS), types=log_types())
    code, lines = run(with_toml(env, tmp_path, f'[feishu]\nbitable_log_table_id = "{LOG_TABLE}"\n'))
    assert code == 0
    assert line_of(lines, "feishu.log_table") == (
        f"OK    feishu.log_table: the log table {LOG_TABLE} has the 12 columns the attempt log "
        "writes")
    assert lines[-2] == f"doctor: {15 + len(_database_checks(env))} OK, 0 WARN, 0 FAIL"
    # read through the fields API (lark-oapi), nothing written
    assert fake.requests_to(f"/tables/{LOG_TABLE}/fields", "GET")
    assert fake.batch_creates == []


def log_types(**override):
    from bot.feishu.bitable_sync import LOG_FIELDS
    kinds = {"text": 1, "number": 2, "date": 5}
    return {n: override.get(n, kinds[k]) for n, k in LOG_FIELDS.items()}


def test_log_table_columns_of_the_wrong_type_fail_naming_them(env, fake, tmp_path):
    from bot.feishu.bitable_sync import LOG_FIELDS
    # a date kept as text, a number as text, a text column made a number
    fake.set_fields(APP_TOKEN, LOG_TABLE, list(LOG_FIELDS),
                    types=log_types(started_at=1, seconds=1, stage=2))
    code, lines = run(with_toml(env, tmp_path, f'[feishu]\nbitable_log_table_id = "{LOG_TABLE}"\n'))
    assert code == 1
    assert line_of(lines, "feishu.log_table") == (
        f"FAIL  feishu.log_table: the log table {LOG_TABLE} has column(s) of the wrong type "
        "(stage is type 2, started_at is type 1, seconds is type 1): its rows would be refused "
        "— fix: make stage text (type 1), started_at date (type 5), seconds number (type 2) in "
        "the log table")


def test_log_table_missing_columns_fails_naming_them(env, fake, tmp_path):
    fake.set_fields(APP_TOKEN, LOG_TABLE, ["task_id", "batch_id", "stage", "outcome",
                                           "error_class", "error_code", "node", "started_at",
                                           "execute_id"])
    code, lines = run(with_toml(env, tmp_path, f'[feishu]\nbitable_log_table_id = "{LOG_TABLE}"\n'))
    assert code == 1
    assert line_of(lines, "feishu.log_table") == (
        f"FAIL  feishu.log_table: the log table {LOG_TABLE} lacks column(s) seconds, input_bytes, "
        "output_bytes: its rows would be refused — fix: add the column(s) seconds (number), "
        "input_bytes (number), output_bytes (number) to the log table")


def test_log_table_that_does_not_exist(env, fake, tmp_path):
    code, lines = run(with_toml(env, tmp_path, '[feishu]\nbitable_log_table_id = "tblNope"\n'))
    assert code == 1
    assert line_of(lines, "feishu.log_table").startswith(
        "FAIL  feishu.log_table: feishu.bitable_log_table_id=tblNope not found (code 1254041: "
        "TableIdNotFound) — fix: create the log table in the same Bitable")


@pytest.mark.parametrize("mode, field_type, level, text", [
    ("upload", 17, "OK", "column '视频' takes the videos (upload)"),
    ("link", 1, "OK", "column '视频' takes the videos (link)"),
    ("upload", 1, "FAIL", "column '视频' has field type 1, not attachment: the upload of each "
                          "video would be refused — fix: make '视频' an attachment column, or "
                          "set feishu.bitable_video_mode = link"),
    ("link", 17, "FAIL", "column '视频' has field type 17, not text: the link of each video "
                         "would be refused — fix: make '视频' a text column, or set "
                         "feishu.bitable_video_mode = upload"),
    ("upload", None, "WARN", "the table has no column '视频': finished videos are not written "
                             "back — fix: add an attachment column named '视频' (or change "
                             "feishu.bitable_video_field)"),
])
def test_the_video_column_must_suit_its_mode(env, fake, tmp_path, mode, field_type, level, text):
    def fields(rec):
        items = [{"field_id": f"fld{i}", "field_name": n, "type": 1}
                 for i, n in enumerate(ALL_FIELDS)]
        if field_type is not None:
            items.append({"field_id": "fldV", "field_name": "视频", "type": field_type})
        return 200, {"code": 0, "msg": "success", "data": {"items": items, "has_more": False}}

    fake.on("GET", FIELDS_PATH, fields)
    code, lines = run(with_toml(env, tmp_path, '[feishu]\nbitable_video_field = "视频"\n'
                                               f'bitable_video_mode = "{mode}"\n'))
    assert line_of(lines, "feishu.bitable_video") == f"{level:<4}  feishu.bitable_video: {text}"
    assert code == (1 if level == "FAIL" else 0)


@pytest.mark.backend("postgresql")
@pytest.mark.empty_database
def test_postgres_database_answers_migrates_and_is_writable(env, db_path):
    url = str(db_path)
    code, lines = run(env)
    assert line_of(lines, "database") == (
        f"OK    database: {url} (PostgreSQL) answers; schema v{len(MIGRATIONS)} (current); "
        "writable")
    assert not [ln for ln in lines if ln[6:].startswith("database.disk")]


def test_unreachable_postgres_fails_without_printing_its_password(env):
    port = _free_port()
    env["OPSBOT_DB"] = f"postgresql://ops:pg-s3cret@127.0.0.1:{port}/opsbot"
    code, lines = run(env)
    assert code == 1
    line = line_of(lines, "database")
    assert line.startswith(f"FAIL  database: postgresql://ops:***@127.0.0.1:{port}/opsbot cannot "
                           "be opened or migrated (OperationalError: postgresql: connection failed")
    assert "pg-s3cret" not in "\n".join(lines)


def test_many_pipelines_each_pipeline_and_account_is_checked_and_named(env, fake, sim,
                                                                          tmp_path):
    news_chat = "oc_news"
    fake.on("GET", f"/open-apis/im/v1/chats/{news_chat}/members/is_in_chat",
            lambda rec: (200, {"code": 0, "msg": "success", "data": {"is_in_chat": False}}))
    cfg = tmp_path / "pipelines.toml"
    cfg.write_text(f'[coze.accounts.beta]\napi_token_env = "COZE_TOKEN_BETA"\n'
                   f'base_url = "{sim.base_url}"\nmax_runs = 3\nqps = 4\n'
                   f'[[pipelines]]\nname = "news"\nworkflow_id = "7500"\n'
                   f'coze_account = "beta"\nalert_chat_id = "{news_chat}"\n', encoding="utf-8")
    beta_token = "pat_not-the-sims-token"
    out = io.StringIO()
    code = doctor.run_doctor(load_settings({**env, "OPSBOT_CONFIG": str(cfg),
                                            "COZE_TOKEN_BETA": beta_token}), out=out)
    text = out.getvalue()
    assert beta_token not in text and COZE_TOKEN not in text
    lines = text.splitlines()
    assert code == 1
    assert line_of(lines, "settings.pipeline[default]").startswith(
        "OK    settings.pipeline[default]: workflow 7412 on account default (token from "
        "COZE_API_TOKEN, 16 runs, 20 QPS)")
    assert line_of(lines, "settings.pipeline[news]") == (
        "WARN  settings.pipeline[news]: workflow 7500 on account beta (token from "
        f"COZE_TOKEN_BETA, 3 runs, 4 QPS), chat {news_chat}, table -; no bitable_table_id / "
        "bitable_app_token: `run` from the chat cannot read its rows — fix: set them in the "
        "[[pipelines]] entry 'news'")
    assert line_of(lines, "feishu.alert_chat[default]").startswith("OK ")
    assert line_of(lines, "feishu.alert_chat[news]").startswith(
        f"FAIL  feishu.alert_chat[news]: the bot is not a member of {news_chat}")
    assert line_of(lines, "feishu.bitable[default]").startswith("OK ")
    assert line_of(lines, "coze.api[default]").startswith("OK ")
    assert line_of(lines, "coze.api[beta]").startswith(
        f"FAIL  coze.api[beta]: {sim.base_url} rejected the token")
    assert not any(ln[6:].startswith(("settings.coze:", "settings.alerts:", "coze.api:"))
                   for ln in lines)


def test_a_pipeline_on_an_account_without_a_token_is_named(env, tmp_path):
    cfg = tmp_path / "p.toml"
    cfg.write_text('[[pipelines]]\nname = "news"\nworkflow_id = "7500"\n', encoding="utf-8")
    env = {k: v for k, v in env.items() if k not in ("COZE_API_TOKEN", "COZE_WORKFLOW_ID")}
    code, lines = run({**env, "OPSBOT_CONFIG": str(cfg)})
    assert code == 1
    assert line_of(lines, "settings.pipeline[news]") == (
        "FAIL  settings.pipeline[news]: account 'default' has no token: COZE_API_TOKEN is not "
        "set — fix: set COZE_API_TOKEN to the account's Coze personal access token")

"""Settings: built once at an entry point from the environment and an optional TOML file.

Environment variables win over the TOML file named by ``OPSBOT_CONFIG``. Nothing below the entry
points reads ``os.environ``; they receive a frozen :class:`Settings`. Secrets are held in
:class:`Secret`, whose ``repr``/``str`` never show the value.
"""
from __future__ import annotations

import dataclasses
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from bot.chat.commands import ALIASES
from pipeline.config import (BreakerPolicy, PipelineConfig, PollPolicy, RetryPolicy,
                             SynthesisConfig, check_synthesis, gate_from_data,
                             rules_from_data)

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


class SettingsError(ValueError):
    """A setting is missing or malformed; the message names it and the expected form."""


class Secret:
    """A string that never shows itself in logs, reprs or tracebacks."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value or ""

    def get(self) -> str:
        return self._value

    def __bool__(self) -> bool:
        return bool(self._value)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)

    def __repr__(self) -> str:
        return "Secret('***')" if self._value else "Secret('')"

    __str__ = __repr__


@dataclass(frozen=True)
class FeishuSettings:
    app_id: str = ""
    app_secret: Secret = field(default_factory=lambda: Secret(""))
    verification_token: Secret = field(default_factory=lambda: Secret(""))
    encrypt_key: Secret = field(default_factory=lambda: Secret(""))
    domain: str = "https://open.feishu.cn"
    alert_chat_id: str = ""
    admin_ids: tuple[str, ...] = ()
    oncall_ids: tuple[str, ...] = ()
    bitable_app_token: str = ""
    bitable_table_id: str = ""
    bitable_status_field: str = "状态"
    bitable_pending_value: str = "待处理"
    bitable_task_id_field: str = "task_id"
    # Columns the worker writes back to (empty name: not written) and the status values it uses.
    bitable_execute_id_field: str = "execute_id"
    bitable_output_field: str = "输出"
    bitable_error_field: str = "错误"
    bitable_duration_field: str = "耗时(秒)"
    bitable_running_value: str = "处理中"
    bitable_done_value: str = "已完成"
    bitable_failed_value: str = "失败"
    # The finished video back in the task's row (bot.feishu.bitable_sync): "" = not written.
    bitable_video_field: str = ""
    bitable_video_mode: str = "upload"   # upload: attachment; link: text with video_link_base
    video_link_base: str = ""            # URL under which pipeline.output_dir is served
    bitable_log_table_id: str = ""       # every attempt mirrored to this table ("" = off)
    # How Feishu reaches the bot: "webhook" (it calls POST /webhook/event) or "ws" (the worker
    # opens Feishu's long connection; no public URL, no encrypt key, no verification token).
    connection: str = "webhook"

    @property
    def configured(self) -> bool:
        return bool(self.app_id and self.app_secret)


@dataclass(frozen=True)
class CozeSettings:
    api_token: Secret = field(default_factory=lambda: Secret(""))
    workflow_id: str = ""
    base_url: str = "https://api.coze.cn"

    @property
    def configured(self) -> bool:
        return bool(self.api_token and self.workflow_id)


@dataclass(frozen=True)
class AlertSettings:
    report_time: str = "09:00"             # HH:MM in the settings' timezone
    failure_rate_threshold: float = 0.5    # CRITICAL when the failure rate in the window passes it
    failure_rate_window: float = 600.0     # seconds
    failure_rate_min_tasks: int = 10
    group_window: float = 3600.0           # same-key alerts within this become one card
    latency_threshold: float = 1800.0      # a task running longer than this raises an alert
    default_silence: float = 3600.0
    canary_interval: float = 0.0           # seconds between canary runs; 0 = no canary
    canary_timeout: float = 1800.0         # a canary not finished after this is an alert
    canary_params: dict = field(default_factory=dict)  # workflow parameters of the canary
    mention_all: bool = False              # CRITICAL cards @all (the group owner must allow it)


def _db_location(value: str) -> Path | str:
    """A SQLite file path, or a PostgreSQL URL kept as written (a Path would fold its ``//``)."""
    return value if value.startswith(("postgresql://", "postgres://")) else Path(value)


@dataclass(frozen=True)
class Settings:
    feishu: FeishuSettings = field(default_factory=FeishuSettings)
    coze: CozeSettings = field(default_factory=CozeSettings)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    alerts: AlertSettings = field(default_factory=AlertSettings)
    db_path: Path | str = Path("./var/opsbot.db")   # a str only for a postgresql:// URL
    timezone: str = "Asia/Shanghai"
    language: str = "zh"
    max_body_bytes: int = 1_000_000
    web_dispatch: bool = False  # True: the web process also answers commands (else the worker)
    config_file: Path | None = None
    # Many pipelines (see the end of this module): the named Coze accounts ([coze.accounts.NAME]; "default"
    # is derived from [coze]) and the [[pipelines]] entries; with listed_pipelines False the one
    # pipeline is "default", derived from the single-pipeline settings.
    coze_accounts: tuple = ()
    listed_pipelines: tuple = ()
    pipelines_listed: bool = False
    scope: str = ""            # the pipeline this copy is scoped to (see scoped); "" = none

    @property
    def tz(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)

    # -- many pipelines ------------------------------------------------------------------------

    @property
    def pipelines(self) -> tuple:
        """Every pipeline (:class:`PipelineSpec`), the ``default`` one first when
        it is defined."""
        default = default_pipeline(self.feishu, self.coze, self.pipeline)
        if not self.pipelines_listed:
            return (default,)
        return ((default,) if self.coze.workflow_id else ()) + tuple(self.listed_pipelines)

    @property
    def accounts(self) -> tuple:
        """Every Coze account (:class:`CozeAccount`), ``default`` first."""
        return (default_account(self.coze, self.pipeline), *self.coze_accounts)

    @property
    def many_pipelines(self) -> bool:
        return len(self.pipelines) > 1

    def account(self, name: str) -> Any:
        """The Coze account ``name``; KeyError when there is none."""
        for account in self.accounts:
            if account.name == name:
                return account
        raise KeyError(name)

    def find_pipeline(self, word: str | None) -> Any:
        """The pipeline named ``word`` or with it as an alias (aliases ignore case), or None."""
        if not word:
            return None
        low = word.lower()
        for spec in self.pipelines:
            if spec.name == word or any(a.lower() == low for a in spec.names):
                return spec
        return None

    @property
    def default_pipeline(self) -> Any:
        """The pipeline ``default``, else the only one, else None (several, none default)."""
        specs = self.pipelines
        named = [s for s in specs if s.name == "default"]
        return named[0] if named else (specs[0] if len(specs) == 1 else None)

    def chat_pipelines(self, chat_id: str | None) -> tuple:
        """The pipelines whose alert chat is ``chat_id``."""
        return tuple(s for s in self.pipelines if chat_id and s.alert_chat_id == chat_id)

    def pipeline_of(self, name: str | None) -> Any:
        """The pipeline a batch names (None or unknown: the default pipeline, or None)."""
        spec = next((s for s in self.pipelines if s.name == name), None) if name else None
        return spec or self.default_pipeline

    def scoped(self, name: str | None) -> "Settings":
        """These settings as the pipeline ``name`` sees them: its chat, admins, on-call, table,
        workflow and account in ``feishu``, ``coze`` and ``pipeline``. Unknown or None: the
        default pipeline; when there is none, the settings unchanged."""
        spec = self.pipeline_of(name)
        if spec is None:
            return self
        account = self.account(spec.coze_account)
        return dataclasses.replace(
            self, scope=spec.name,
            feishu=dataclasses.replace(
                self.feishu, alert_chat_id=spec.alert_chat_id, admin_ids=spec.admin_ids,
                oncall_ids=spec.oncall_ids, bitable_app_token=spec.bitable_app_token,
                bitable_table_id=spec.bitable_table_id),
            coze=dataclasses.replace(self.coze, api_token=account.api_token,
                                     base_url=account.base_url, workflow_id=spec.workflow_id),
            pipeline=dataclasses.replace(self.pipeline,
                                         fallback_workflow_id=spec.fallback_workflow_id,
                                         max_coze=account.max_runs, coze_qps=account.qps))

    def replace(self, **changes: Any) -> "Settings":
        return dataclasses.replace(self, **changes)


# env var -> (section, key) in the TOML file
ENV_KEYS: dict[str, tuple[str, str]] = {
    "FEISHU_APP_ID": ("feishu", "app_id"),
    "FEISHU_APP_SECRET": ("feishu", "app_secret"),
    "FEISHU_VERIFICATION_TOKEN": ("feishu", "verification_token"),
    "FEISHU_ENCRYPT_KEY": ("feishu", "encrypt_key"),
    "FEISHU_DOMAIN": ("feishu", "domain"),
    "FEISHU_ALERT_CHAT_ID": ("feishu", "alert_chat_id"),
    "FEISHU_ADMIN_IDS": ("feishu", "admin_ids"),
    "FEISHU_ONCALL_IDS": ("feishu", "oncall_ids"),
    "FEISHU_CONNECTION": ("feishu", "connection"),
    "BITABLE_APP_TOKEN": ("feishu", "bitable_app_token"),
    "BITABLE_TABLE_ID": ("feishu", "bitable_table_id"),
    "BITABLE_STATUS_FIELD": ("feishu", "bitable_status_field"),
    "BITABLE_PENDING_VALUE": ("feishu", "bitable_pending_value"),
    "COZE_API_TOKEN": ("coze", "api_token"),
    "COZE_WORKFLOW_ID": ("coze", "workflow_id"),
    "COZE_BASE_URL": ("coze", "base_url"),
    "OPSBOT_DB": ("opsbot", "db"),
    "OPSBOT_TIMEZONE": ("opsbot", "timezone"),
    "OPSBOT_LANGUAGE": ("opsbot", "language"),
    "OPSBOT_WEB_DISPATCH": ("opsbot", "web_dispatch"),
    "OPSBOT_MENTION_ALL": ("alerts", "mention_all"),
}

CONNECTIONS = ("webhook", "ws")
SECRET_KEYS = {"app_secret", "verification_token", "encrypt_key", "api_token"}
_ID_LIST = re.compile(r"^[A-Za-z0-9_\-]+$")
_HHMM = re.compile(r"^([01]\d|2[0-3]):[0-5]\d$")


def load_settings(env: Mapping[str, str], overrides: Mapping[str, Any] | None = None) -> Settings:
    """Build and validate Settings from ``env`` (usually ``os.environ``).

    Raises :class:`SettingsError` naming the first bad variable and what it should look like.
    """
    data: dict[str, dict[str, Any]] = {"feishu": {}, "coze": {}, "opsbot": {}, "pipeline": {},
                                       "alerts": {}}
    config_file = env.get("OPSBOT_CONFIG") or None
    pipelines = None
    if config_file:
        raw = dict(_read_toml(Path(config_file)))
        pipelines = raw.pop("pipelines", None)
        _merge(data, raw)
    for var, (section, key) in ENV_KEYS.items():
        value = env.get(var)
        if value is not None and value != "":
            data[section][key] = value
    for dotted, value in (overrides or {}).items():
        section, key = dotted.split(".", 1)
        data.setdefault(section, {})[key] = value
    return _build(data, Path(config_file) if config_file else None, env=env, pipelines=pipelines)


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise SettingsError(f"OPSBOT_CONFIG: file {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise SettingsError(f"OPSBOT_CONFIG: {path} is not valid TOML: {exc}") from None


def _merge(into: dict[str, dict[str, Any]], raw: Mapping[str, Any]) -> None:
    for section, values in raw.items():
        if not isinstance(values, Mapping):
            raise SettingsError(f"OPSBOT_CONFIG: [{section}] must be a table")
        into.setdefault(section, {}).update(values)


def _build(data: dict[str, dict[str, Any]], config_file: Path | None, *,
           env: Mapping[str, str] | None = None, pipelines: Any = None) -> Settings:
    f, c, o, p, a = (data.get(k, {}) for k in ("feishu", "coze", "opsbot", "pipeline", "alerts"))
    unknown = set(f) - {fl.name for fl in dataclasses.fields(FeishuSettings)}
    if unknown:
        raise SettingsError(f"[feishu] has unknown keys: {', '.join(sorted(unknown))}")
    feishu = FeishuSettings(**{
        k: (Secret(str(v)) if k in SECRET_KEYS else _ids(k, v) if k.endswith("_ids") else str(v))
        for k, v in f.items()
    })
    _check_url("FEISHU_DOMAIN", feishu.domain)
    if feishu.bitable_video_mode not in ("upload", "link"):
        raise SettingsError(f"[feishu] bitable_video_mode must be 'upload' or 'link', got "
                            f"{feishu.bitable_video_mode!r}")
    if feishu.connection not in CONNECTIONS:
        raise SettingsError(f"FEISHU_CONNECTION: must be 'webhook' (Feishu calls POST "
                            f"/webhook/event) or 'ws' (the worker opens the long connection), "
                            f"got {feishu.connection!r}")
    if feishu.encrypt_key and not feishu.verification_token:
        # Feishu issues both; an encrypt key alone would leave legacy card callbacks unsigned.
        raise SettingsError("FEISHU_VERIFICATION_TOKEN: must be set when FEISHU_ENCRYPT_KEY is set "
                            "(copy both from the app's Events & Callbacks page)")
    coze = CozeSettings(
        api_token=Secret(str(c.get("api_token", ""))),
        workflow_id=str(c.get("workflow_id", "")),
        base_url=str(c.get("base_url", CozeSettings.base_url)).rstrip("/"),
    )
    _check_url("COZE_BASE_URL", coze.base_url)
    timezone = str(o.get("timezone", "Asia/Shanghai"))
    try:
        ZoneInfo(timezone)
    except (ZoneInfoNotFoundError, ValueError):
        raise SettingsError(
            f"OPSBOT_TIMEZONE: {timezone!r} is not an IANA time zone (e.g. Asia/Shanghai)") from None
    language = str(o.get("language", "zh"))
    if language not in ("zh", "en"):
        raise SettingsError(f"OPSBOT_LANGUAGE: must be 'zh' or 'en', got {language!r}")
    alerts = _section(AlertSettings, a, "alerts")
    if not _HHMM.match(alerts.report_time):
        raise SettingsError(f"[alerts] report_time must be HH:MM (e.g. 09:00), got "
                            f"{alerts.report_time!r}")
    unknown = set(c) - {"api_token", "workflow_id", "base_url", "accounts"}
    if unknown:
        raise SettingsError(f"[coze] has unknown keys: {', '.join(sorted(unknown))}")
    pipeline = _pipeline(p)
    accounts, specs = build_pipelines(
        c.get("accounts"), pipelines, env=env or {}, feishu=feishu, coze=coze,
        pipeline=pipeline, command_words=frozenset(ALIASES) | {"batch", "批次"}, ids=_ids,
        check_url=_check_url)
    return Settings(
        feishu=feishu, coze=coze, pipeline=pipeline, alerts=alerts,
        coze_accounts=accounts, pipelines_listed=pipelines is not None,
        listed_pipelines=tuple(s for s in specs if pipelines is not None and
                               not (s.name == "default" and coze.workflow_id)),
        db_path=_db_location(str(o.get("db", "./var/opsbot.db"))),
        timezone=timezone, language=language,
        max_body_bytes=_int("[opsbot] max_body_bytes", o.get("max_body_bytes", 1_000_000)),
        web_dispatch=_coerce("OPSBOT_WEB_DISPATCH", o.get("web_dispatch", False), False),
        config_file=config_file,
    )


def _pipeline(p: dict[str, Any]) -> PipelineConfig:
    p = dict(p)
    nested = {
        "retry": _section(RetryPolicy, p.pop("retry", {}), "pipeline.retry"),
        "poll": _section(PollPolicy, p.pop("poll", {}), "pipeline.poll"),
        "breaker": _section(BreakerPolicy, p.pop("breaker", {}), "pipeline.breaker"),
        "synthesis": _section(SynthesisConfig, p.pop("synthesis", {}), "pipeline.synthesis"),
    }
    try:
        check_synthesis(nested["synthesis"])
    except ValueError as exc:
        raise SettingsError(str(exc)) from None
    rules = p.pop("rules", None)
    if rules is not None:
        try:
            nested["rules"] = rules_from_data(rules)
        except (ValueError, TypeError, AttributeError) as exc:
            raise SettingsError(f"[[pipeline.rules]]: {exc}") from None
    gate = p.pop("gate", None)  # the quality gate (pipeline.quality)
    if gate is not None:
        try:
            nested["gate"] = gate_from_data(gate)
        except ValueError as exc:
            raise SettingsError(str(exc)) from None
    cfg = _section(PipelineConfig, p, "pipeline")
    cfg = dataclasses.replace(cfg, **nested)
    for name in ("max_coze", "max_synthesis"):
        if getattr(cfg, name) < 1:
            raise SettingsError(f"[pipeline] {name} must be at least 1")
    if cfg.coze_qps <= 0:
        raise SettingsError("[pipeline] coze_qps must be positive")
    return cfg


def _section(cls: type, values: Mapping[str, Any], where: str) -> Any:
    """Build a dataclass from a TOML table, coercing to the default's type."""
    defaults = cls()
    known = {fl.name: fl for fl in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        if key not in known:
            raise SettingsError(f"[{where}] unknown key {key!r}; known: {', '.join(sorted(known))}")
        default = getattr(defaults, key)
        kwargs[key] = _coerce(f"[{where}] {key}", value, default)
    return cls(**kwargs)


def _coerce(name: str, value: Any, default: Any) -> Any:
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        if str(value).lower() in ("1", "true", "yes", "on"):
            return True
        if str(value).lower() in ("0", "false", "no", "off"):
            return False
        raise SettingsError(f"{name} must be true or false, got {value!r}")
    if isinstance(default, int):
        return _int(name, value)
    if isinstance(default, float):
        try:
            return float(value)
        except (TypeError, ValueError):
            raise SettingsError(f"{name} must be a number, got {value!r}") from None
    if isinstance(default, str):
        return str(value)
    return value


def _int(name: str, value: Any) -> int:
    try:
        if isinstance(value, bool):
            raise ValueError
        return int(value)
    except (TypeError, ValueError):
        raise SettingsError(f"{name} must be a whole number, got {value!r}") from None


def _ids(key: str, value: Any) -> tuple[str, ...]:
    items = value if isinstance(value, list) else str(value).replace(";", ",").split(",")
    ids = tuple(str(i).strip() for i in items if str(i).strip())
    for i in ids:
        if not _ID_LIST.match(i):
            var = "FEISHU_" + key.upper()
            raise SettingsError(
                f"{var}: {i!r} is not an open_id; give a comma-separated list like ou_abc,ou_def")
    return ids


def _check_url(var: str, url: str) -> None:
    if not re.match(r"^https?://[^\s/]+", url):
        raise SettingsError(f"{var}: must be an http(s) URL like https://open.feishu.cn, got {url!r}")


# -- many pipelines ------------------------------------------------------------------------------
#
# Many pipelines: named Coze accounts (``[coze.accounts.NAME]``) and ``[[pipelines]]``.
#
# A *pipeline* is one content line: a workflow (and its fallback) run on one Coze account, fed by
# one Bitable table, reporting to one alert chat with its own admins and on-call people. A *Coze
# account* is a named token with its own concurrent-run limit and QPS budget, shared by every
# pipeline that uses it (and by every process on the store).
#
# The account ``default`` is ``COZE_API_TOKEN`` / ``[coze]`` with ``[pipeline] max_coze`` and
# ``coze_qps``. The single-pipeline settings (``COZE_WORKFLOW_ID``, ``BITABLE_TABLE_ID``,
# ``FEISHU_ALERT_CHAT_ID`` ...) define the pipeline ``default``: on their own when no
# ``[[pipelines]]`` is given, and beside the listed ones when ``COZE_WORKFLOW_ID`` (or ``[coze]
# workflow_id``) is set too, so an existing deployment keeps its pipeline while new ones are added.
#
# :func:`build_pipelines` validates everything and raises :class:`SettingsError` naming the
# pipeline or account and the key. Tokens are :class:`Secret`; only the name of the
# variable that holds one is ever shown.

DEFAULT_PIPELINE = "default"
PIPELINE_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,39}$")
_ENV_NAME = re.compile(r"^[A-Z_][A-Z0-9_]*$")
_PIPELINE_BATCH_ID = re.compile(r"^b[0-9a-f]{4,32}$")    # bot.chat.commands.BATCH_ID: names must not look so
PIPELINE_KEYS = ("name", "aliases", "workflow_id", "fallback_workflow_id", "coze_account",
                 "bitable_app_token", "bitable_table_id", "alert_chat_id", "admin_ids",
                 "oncall_ids")
ACCOUNT_KEYS = ("api_token_env", "api_token", "base_url", "max_runs", "qps")


@dataclass(frozen=True)
class CozeAccount:
    """One Coze account: a token, where it is served, and its limits (shared by its pipelines)."""

    name: str
    api_token: Secret
    base_url: str
    max_runs: int             # runs in flight at once, across every process on the store
    qps: float                # requests per second, submits and polls together
    token_env: str = ""       # the variable the token came from ("" when written in the file)

    @property
    def breaker_service(self) -> str:
        """The breaker row of this account: ``coze`` for the default one (as before)."""
        return "coze" if self.name == DEFAULT_PIPELINE else f"coze:{self.name}"

    @property
    def token_source(self) -> str:
        """Where the token is set, for messages (never the token itself)."""
        if self.name == DEFAULT_PIPELINE:
            return "COZE_API_TOKEN"
        return self.token_env or f"[coze.accounts.{self.name}] api_token"


@dataclass(frozen=True)
class PipelineSpec:
    """One pipeline, with every default already applied."""

    name: str
    workflow_id: str
    coze_account: str = DEFAULT_PIPELINE
    aliases: tuple[str, ...] = ()
    fallback_workflow_id: str = ""
    bitable_app_token: str = ""
    bitable_table_id: str = ""
    alert_chat_id: str = ""
    admin_ids: tuple[str, ...] = ()
    oncall_ids: tuple[str, ...] = ()

    @property
    def names(self) -> tuple[str, ...]:
        """The name and the aliases: what ``run NAME`` accepts."""
        return (self.name, *self.aliases)


def default_account(coze: Any, pipeline: Any) -> CozeAccount:
    """The ``default`` account from ``[coze]`` and the ``[pipeline]`` limits."""
    return CozeAccount(DEFAULT_PIPELINE, coze.api_token, coze.base_url, pipeline.max_coze,
                       pipeline.coze_qps)


def default_pipeline(feishu: Any, coze: Any, pipeline: Any) -> PipelineSpec:
    """The ``default`` pipeline from the single-pipeline settings."""
    return PipelineSpec(
        name=DEFAULT_PIPELINE, workflow_id=coze.workflow_id, coze_account=DEFAULT_PIPELINE,
        fallback_workflow_id=pipeline.fallback_workflow_id,
        bitable_app_token=feishu.bitable_app_token, bitable_table_id=feishu.bitable_table_id,
        alert_chat_id=feishu.alert_chat_id, admin_ids=feishu.admin_ids,
        oncall_ids=feishu.oncall_ids)


def build_pipelines(accounts_data: Any, pipelines_data: Any, *, env: Mapping[str, str], feishu: Any,
          coze: Any, pipeline: Any, command_words: frozenset[str],
          ids: Any, check_url: Any) -> tuple[tuple[CozeAccount, ...], tuple[PipelineSpec, ...]]:
    """Validate ``[coze.accounts.*]`` and ``[[pipelines]]``; return the named accounts (without
    ``default``) and every pipeline (the ``default`` one included when it is defined).

    ``ids`` parses an open_id list (``bot.settings._ids``), ``check_url`` a base URL;
    ``command_words`` are the chat command names an alias may not shadow."""
    if accounts_data is None:
        accounts_data = {}
    if not isinstance(accounts_data, Mapping):
        raise SettingsError("[coze.accounts] must be a table of accounts, like "
                            "[coze.accounts.studio]")
    accounts: list[CozeAccount] = []
    for name, data in accounts_data.items():
        where = f"[coze.accounts.{name}]"
        if name == DEFAULT_PIPELINE:
            raise SettingsError(f"{where}: the account 'default' is COZE_API_TOKEN and [coze]; "
                                f"give this account another name")
        if not PIPELINE_NAME.match(str(name)):
            raise SettingsError(f"{where}: an account name is lowercase letters, digits, _ and "
                                f"-, starting with a letter")
        if not isinstance(data, Mapping):
            raise SettingsError(f"{where} must be a table")
        unknown = sorted(set(data) - set(ACCOUNT_KEYS))
        if unknown:
            raise SettingsError(f"{where} has unknown key(s) {', '.join(unknown)}; known: "
                                f"{', '.join(ACCOUNT_KEYS)}")
        token_env = str(data.get("api_token_env", "") or "")
        if token_env and "api_token" in data:
            raise SettingsError(f"{where}: set api_token_env or api_token, not both")
        if token_env:
            if not _ENV_NAME.match(token_env):
                raise SettingsError(f"{where} api_token_env must name an environment variable "
                                    f"(like COZE_TOKEN_STUDIO), got {token_env!r}")
            token = env.get(token_env, "") or ""
            if not token:
                raise SettingsError(f"{where}: the environment variable {token_env} "
                                    f"(api_token_env) is not set; export the account's token "
                                    f"there")
        else:
            token = str(data.get("api_token", "") or "")
            if not token:
                raise SettingsError(f"{where}: no token; set api_token_env = \"COZE_TOKEN_...\" "
                                    f"(an environment variable holding it) or api_token")
        base_url = str(data.get("base_url", coze.base_url)).rstrip("/")
        check_url(f"{where} base_url", base_url)
        max_runs = _pipeline_whole(f"{where} max_runs", data.get("max_runs", pipeline.max_coze))
        if max_runs < 1:
            raise SettingsError(f"{where} max_runs must be at least 1")
        qps = _pipeline_number(f"{where} qps", data.get("qps", pipeline.coze_qps))
        if qps <= 0:
            raise SettingsError(f"{where} qps must be positive")
        accounts.append(CozeAccount(str(name), Secret(token), base_url, max_runs, qps,
                                    token_env=token_env))
    known_accounts = {DEFAULT_PIPELINE, *(a.name for a in accounts)}

    if pipelines_data is None:
        return tuple(accounts), (default_pipeline(feishu, coze, pipeline),)
    if not isinstance(pipelines_data, list) or not all(isinstance(p, Mapping)
                                                       for p in pipelines_data):
        raise SettingsError("[[pipelines]] must be an array of tables (each starting with "
                            "[[pipelines]])")
    specs: list[PipelineSpec] = []
    if coze.workflow_id:   # the single-pipeline settings stay a pipeline of their own
        specs.append(default_pipeline(feishu, coze, pipeline))
    for i, data in enumerate(pipelines_data):
        name = data.get("name")
        where = f"[[pipelines]] #{i + 1}" + (f" ({name})" if isinstance(name, str) else "")
        unknown = sorted(set(data) - set(PIPELINE_KEYS))
        if unknown:
            raise SettingsError(f"{where} has unknown key(s) {', '.join(unknown)}; known: "
                                f"{', '.join(PIPELINE_KEYS)}")
        if not isinstance(name, str) or not PIPELINE_NAME.match(name) or _PIPELINE_BATCH_ID.match(name):
            raise SettingsError(f"{where}: name must be lowercase letters, digits, _ and -, "
                                f"starting with a letter (at most 40), and not look like a batch "
                                f"id (b + hex digits); got {name!r}")
        if name == DEFAULT_PIPELINE and coze.workflow_id:
            raise SettingsError(f"{where}: the pipeline 'default' is already defined by "
                                f"COZE_WORKFLOW_ID / [coze] workflow_id; rename this one or "
                                f"unset COZE_WORKFLOW_ID")
        workflow = str(data.get("workflow_id", "") or "").strip()
        if not workflow:
            raise SettingsError(f"{where}: workflow_id is required (the Coze workflow to run)")
        aliases = data.get("aliases", [])
        if not isinstance(aliases, list) or not all(isinstance(a, str) for a in aliases):
            raise SettingsError(f"{where} aliases must be a list of strings, like [\"短剧\"]")
        cleaned = []
        for alias in aliases:
            alias = alias.strip()
            if not alias or any(c.isspace() for c in alias) or len(alias) > 40 \
                    or alias.startswith(("/", "-", "—")) or _PIPELINE_BATCH_ID.match(alias.lower()):
                raise SettingsError(f"{where}: alias {alias!r} must be one word of at most 40 "
                                    f"characters, not starting with / or -, and not look like "
                                    f"a batch id")
            if alias.lower() in command_words:
                raise SettingsError(f"{where}: alias {alias!r} is a command word; pick "
                                    f"another")
            cleaned.append(alias)
        account = str(data.get("coze_account", DEFAULT_PIPELINE) or DEFAULT_PIPELINE)
        if account not in known_accounts:
            raise SettingsError(f"{where}: coze_account {account!r} is not defined; known: "
                                f"{', '.join(sorted(known_accounts))} (add "
                                f"[coze.accounts.{account}])")
        specs.append(PipelineSpec(
            name=name, workflow_id=workflow, coze_account=account, aliases=tuple(cleaned),
            fallback_workflow_id=str(data.get("fallback_workflow_id", "") or "").strip(),
            bitable_app_token=str(data.get("bitable_app_token", feishu.bitable_app_token)
                                  or ""),
            bitable_table_id=str(data.get("bitable_table_id", "") or ""),
            alert_chat_id=str(data.get("alert_chat_id", feishu.alert_chat_id) or ""),
            admin_ids=_people(ids, where, "admin_ids", data, feishu.admin_ids),
            oncall_ids=_people(ids, where, "oncall_ids", data, feishu.oncall_ids)))
    if not specs:
        raise SettingsError("[[pipelines]] is empty: list at least one pipeline, or remove it")
    _check_unique(specs)
    return tuple(accounts), tuple(specs)


def _check_unique(specs: list[PipelineSpec]) -> None:
    seen: dict[str, str] = {}
    for spec in specs:
        for word in spec.names:
            other = seen.get(word.lower())
            if other is not None:
                what = "name" if word == spec.name else "alias"
                raise SettingsError(f"[[pipelines]] {spec.name}: {what} {word!r} is already "
                                    f"used by the pipeline {other!r}; names and aliases must "
                                    f"be unique")
            seen[word.lower()] = spec.name
    tables: dict[tuple[str, str], str] = {}
    for spec in specs:
        if not spec.bitable_table_id:
            continue
        table = (spec.bitable_app_token, spec.bitable_table_id)
        if table in tables:
            raise SettingsError(f"[[pipelines]] {spec.name}: bitable_table_id "
                                f"{spec.bitable_table_id} is already the table of the pipeline "
                                f"{tables[table]!r}; two pipelines would run the same rows")
        tables[table] = spec.name


def _people(ids: Any, where: str, key: str, data: Mapping[str, Any],
            default: tuple[str, ...]) -> tuple[str, ...]:
    """A pipeline's ``admin_ids`` / ``oncall_ids`` (default: the FEISHU_* ones)."""
    if key not in data:
        return default
    try:
        return ids(key, data[key])
    except ValueError as exc:
        raise SettingsError(f"{where} {key}: {str(exc).split(': ', 1)[-1]}") from None


def _pipeline_whole(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise SettingsError(f"{name} must be a whole number, got {value!r}")
    try:
        return int(value)
    except ValueError:
        raise SettingsError(f"{name} must be a whole number, got {value!r}") from None


def _pipeline_number(name: str, value: Any) -> float:
    if isinstance(value, bool):
        raise SettingsError(f"{name} must be a number, got {value!r}")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise SettingsError(f"{name} must be a number, got {value!r}") from None

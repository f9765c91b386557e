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

    @property
    def tz(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)

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
    if config_file:
        _merge(data, _read_toml(Path(config_file)))
    for var, (section, key) in ENV_KEYS.items():
        value = env.get(var)
        if value is not None and value != "":
            data[section][key] = value
    for dotted, value in (overrides or {}).items():
        section, key = dotted.split(".", 1)
        data.setdefault(section, {})[key] = value
    return _build(data, Path(config_file) if config_file else None)


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


def _build(data: dict[str, dict[str, Any]], config_file: Path | None) -> Settings:
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
    return Settings(
        feishu=feishu, coze=coze, pipeline=_pipeline(p), alerts=alerts,
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

"""Many pipelines: named Coze accounts (``[coze.accounts.NAME]``) and ``[[pipelines]]``.

A *pipeline* is one content line: a workflow (and its fallback) run on one Coze account, fed by
one Bitable table, reporting to one alert chat with its own admins and on-call people. A *Coze
account* is a named token with its own concurrent-run limit and QPS budget, shared by every
pipeline that uses it (and by every process on the store).

The account ``default`` is ``COZE_API_TOKEN`` / ``[coze]`` with ``[pipeline] max_coze`` and
``coze_qps``. The single-pipeline settings (``COZE_WORKFLOW_ID``, ``BITABLE_TABLE_ID``,
``FEISHU_ALERT_CHAT_ID`` ...) define the pipeline ``default``: on their own when no
``[[pipelines]]`` is given, and beside the listed ones when ``COZE_WORKFLOW_ID`` (or ``[coze]
workflow_id``) is set too, so an existing deployment keeps its pipeline while new ones are added.

:func:`build` validates everything and raises :class:`~bot.settings.SettingsError` naming the
pipeline or account and the key. Tokens are :class:`~bot.settings.Secret`; only the name of the
variable that holds one is ever shown.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Mapping

DEFAULT = "default"
NAME = re.compile(r"^[a-z][a-z0-9_-]{0,39}$")
_ENV_NAME = re.compile(r"^[A-Z_][A-Z0-9_]*$")
_BATCH_ID = re.compile(r"^b[0-9a-f]{4,32}$")    # bot.commands.BATCH_ID: names must not look so
PIPELINE_KEYS = ("name", "aliases", "workflow_id", "fallback_workflow_id", "coze_account",
                 "bitable_app_token", "bitable_table_id", "alert_chat_id", "admin_ids",
                 "oncall_ids")
ACCOUNT_KEYS = ("api_token_env", "api_token", "base_url", "max_runs", "qps")


@dataclass(frozen=True)
class CozeAccount:
    """One Coze account: a token, where it is served, and its limits (shared by its pipelines)."""

    name: str
    api_token: Any            # bot.settings.Secret
    base_url: str
    max_runs: int             # runs in flight at once, across every process on the store
    qps: float                # requests per second, submits and polls together
    token_env: str = ""       # the variable the token came from ("" when written in the file)

    @property
    def breaker_service(self) -> str:
        """The breaker row of this account: ``coze`` for the default one (as before)."""
        return "coze" if self.name == DEFAULT else f"coze:{self.name}"

    @property
    def token_source(self) -> str:
        """Where the token is set, for messages (never the token itself)."""
        if self.name == DEFAULT:
            return "COZE_API_TOKEN"
        return self.token_env or f"[coze.accounts.{self.name}] api_token"


@dataclass(frozen=True)
class PipelineSpec:
    """One pipeline, with every default already applied."""

    name: str
    workflow_id: str
    coze_account: str = DEFAULT
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
    return CozeAccount(DEFAULT, coze.api_token, coze.base_url, pipeline.max_coze,
                       pipeline.coze_qps)


def default_pipeline(feishu: Any, coze: Any, pipeline: Any) -> PipelineSpec:
    """The ``default`` pipeline from the single-pipeline settings."""
    return PipelineSpec(
        name=DEFAULT, workflow_id=coze.workflow_id, coze_account=DEFAULT,
        fallback_workflow_id=pipeline.fallback_workflow_id,
        bitable_app_token=feishu.bitable_app_token, bitable_table_id=feishu.bitable_table_id,
        alert_chat_id=feishu.alert_chat_id, admin_ids=feishu.admin_ids,
        oncall_ids=feishu.oncall_ids)


def build(accounts_data: Any, pipelines_data: Any, *, env: Mapping[str, str], feishu: Any,
          coze: Any, pipeline: Any, command_words: frozenset[str],
          ids: Any, check_url: Any) -> tuple[tuple[CozeAccount, ...], tuple[PipelineSpec, ...]]:
    """Validate ``[coze.accounts.*]`` and ``[[pipelines]]``; return the named accounts (without
    ``default``) and every pipeline (the ``default`` one included when it is defined).

    ``ids`` parses an open_id list (``bot.settings._ids``), ``check_url`` a base URL;
    ``command_words`` are the chat command names an alias may not shadow."""
    from .settings import Secret, SettingsError

    if accounts_data is None:
        accounts_data = {}
    if not isinstance(accounts_data, Mapping):
        raise SettingsError("[coze.accounts] must be a table of accounts, like "
                            "[coze.accounts.studio]")
    accounts: list[CozeAccount] = []
    for name, data in accounts_data.items():
        where = f"[coze.accounts.{name}]"
        if name == DEFAULT:
            raise SettingsError(f"{where}: the account 'default' is COZE_API_TOKEN and [coze]; "
                                f"give this account another name")
        if not NAME.match(str(name)):
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
        max_runs = _whole(f"{where} max_runs", data.get("max_runs", pipeline.max_coze))
        if max_runs < 1:
            raise SettingsError(f"{where} max_runs must be at least 1")
        qps = _number(f"{where} qps", data.get("qps", pipeline.coze_qps))
        if qps <= 0:
            raise SettingsError(f"{where} qps must be positive")
        accounts.append(CozeAccount(str(name), Secret(token), base_url, max_runs, qps,
                                    token_env=token_env))
    known_accounts = {DEFAULT, *(a.name for a in accounts)}

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
        if not isinstance(name, str) or not NAME.match(name) or _BATCH_ID.match(name):
            raise SettingsError(f"{where}: name must be lowercase letters, digits, _ and -, "
                                f"starting with a letter (at most 40), and not look like a batch "
                                f"id (b + hex digits); got {name!r}")
        if name == DEFAULT and coze.workflow_id:
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
                    or alias.startswith(("/", "-", "—")) or _BATCH_ID.match(alias.lower()):
                raise SettingsError(f"{where}: alias {alias!r} must be one word of at most 40 "
                                    f"characters, not starting with / or -, and not look like "
                                    f"a batch id")
            if alias.lower() in command_words:
                raise SettingsError(f"{where}: alias {alias!r} is a command word; pick "
                                    f"another")
            cleaned.append(alias)
        account = str(data.get("coze_account", DEFAULT) or DEFAULT)
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
    from .settings import SettingsError

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
    from .settings import SettingsError

    if key not in data:
        return default
    try:
        return ids(key, data[key])
    except SettingsError as exc:
        raise SettingsError(f"{where} {key}: {str(exc).split(': ', 1)[-1]}") from None


def _whole(name: str, value: Any) -> int:
    from .settings import SettingsError

    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise SettingsError(f"{name} must be a whole number, got {value!r}")
    try:
        return int(value)
    except ValueError:
        raise SettingsError(f"{name} must be a whole number, got {value!r}") from None


def _number(name: str, value: Any) -> float:
    from .settings import SettingsError

    if isinstance(value, bool):
        raise SettingsError(f"{name} must be a number, got {value!r}")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise SettingsError(f"{name} must be a number, got {value!r}") from None

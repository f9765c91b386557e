"""Pipeline configuration: limits, polling, retry budgets and classifier rules as data.

Built once at the entry point (see ``bot.settings``) and passed down; nothing in ``pipeline``
reads the environment. Durations are in seconds.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping


@dataclass(frozen=True)
class Rule:
    """One classifier rule: when it matches, the error gets ``action``.

    ``action`` is one of ``retry`` (backoff and try again), ``resubmit`` (end the wait at once and
    submit the run again, at most ``max_resubmits`` times), ``fail`` (stop this task now) or
    ``fatal`` (stop the batch, open the breaker, alert a human).
    Match fields are OR-ed inside a rule: any listed code, any HTTP status, or any message
    substring (case-insensitive) matches.
    """

    name: str
    action: str
    codes: tuple[str, ...] = ()
    http_statuses: tuple[int, ...] = ()
    messages: tuple[str, ...] = ()
    http_range: tuple[int, int] | None = None  # inclusive, e.g. (500, 599)
    tier: str | None = None  # alert tier override: LOW / MEDIUM / HIGH / CRITICAL
    scope: str = "any"       # "run": only a run that ended in Fail; "call": only an API call


ACTIONS = ("retry", "resubmit", "fail", "fatal")


DEFAULT_RULES: tuple[Rule, ...] = (
    # Order matters: the first matching rule wins.
    # Fatal rules judge API calls only: a run that ended in Fail because a plugin inside the
    # workflow got "permission denied" from a third party says nothing about opsbot's token.
    Rule("auth", "fatal", codes=("4100", "4101", "401", "403", "99991663", "99991661", "99991672"),
         http_statuses=(401, 403),
         messages=("token invalid", "invalid token", "token expired", "unauthorized",
                   "permission denied"), scope="call"),
    Rule("balance", "fatal", codes=("4011", "4019", "4022", "4008", "6003"),
         messages=("insufficient balance", "quota exhausted", "quota exceeded", "arrears"),
         scope="call"),
    Rule("risk_control", "fail", codes=("4102",)),  # a verdict on this input, not on the account
    Rule("plugin_timeout", "resubmit", codes=("720701002", "720701001"),
         messages=("timeout", "timed out", "access plugin", "server error"), scope="run"),
    Rule("rate_limited", "retry", codes=("4009", "4013", "4020", "429"), http_statuses=(429,),
         messages=("rate limit", "too many requests")),
    Rule("server", "retry", codes=("5000",), http_range=(500, 599)),
    Rule("network", "retry", codes=("network",)),
    Rule("bad_request", "fail", codes=("4000", "4200", "4314", "400", "404"),
         http_statuses=(400, 404), messages=("invalid parameter", "validation")),
)


@dataclass(frozen=True)
class RetryPolicy:
    """Bounded exponential backoff with full jitter."""

    max_attempts: int = 5          # tries of one call, including the first
    initial: float = 1.0           # first wait
    maximum: float = 30.0          # cap on one wait
    multiplier: float = 2.0
    max_total: float = 300.0       # give up once this much time was spent waiting
    max_resubmits: int = 1         # for ``resubmit`` rules: new runs after the first


@dataclass(frozen=True)
class PollPolicy:
    """Adaptive polling of a running workflow: soon at first, then spaced out, capped."""

    first: float = 1.0
    multiplier: float = 1.5
    maximum: float = 10.0


@dataclass(frozen=True)
class BreakerPolicy:
    failure_threshold: int = 5
    open_seconds: float = 60.0
    success_threshold: int = 3


@dataclass(frozen=True)
class PipelineConfig:
    max_coze: int = 16
    max_synthesis: int = 4
    coze_qps: float = 20.0              # shared by submit and poll
    run_timeout: float = 3600.0         # a run still Running after this is failed
    lease_seconds: float = 60.0
    synthesis_command: str = ""         # shell-free argv template; "" = built-in synthesis
    skip_synthesis: bool = False
    output_dir: str = "var/output"      # where synthesis writes its files
    task_id_param: str = "task_id"      # workflow parameter carrying the task id ("" = none)
    idle_interval: float = 0.2          # how often an idle worker looks for new work
    fallback_workflow_id: str = ""      # used while the primary's runs keep failing ("" = none)
    fallback_failure_rate: float = 0.5
    fallback_window: float = 600.0
    fallback_min_runs: int = 5
    fallback_cooldown: float = 600.0    # then the primary gets the traffic back
    synthesis_timeout: float = 600.0
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    poll: PollPolicy = field(default_factory=PollPolicy)
    breaker: BreakerPolicy = field(default_factory=BreakerPolicy)
    rules: tuple[Rule, ...] = DEFAULT_RULES


def rules_from_data(items: list[Mapping[str, Any]]) -> tuple[Rule, ...]:
    """Build rules from TOML ``[[pipeline.rules]]`` tables; raises ValueError on a bad rule."""
    rules = []
    for i, item in enumerate(items):
        action = item.get("action")
        if action not in ACTIONS:
            raise ValueError(f"pipeline.rules[{i}].action must be one of {ACTIONS}, got {action!r}")
        http_range = item.get("http_range")
        if http_range is not None:
            if not (isinstance(http_range, list) and len(http_range) == 2):
                raise ValueError(f"pipeline.rules[{i}].http_range must be [low, high]")
            http_range = (int(http_range[0]), int(http_range[1]))
        rules.append(Rule(
            name=str(item.get("name", f"rule{i}")),
            action=action,
            codes=tuple(str(c) for c in item.get("codes", ())),
            http_statuses=tuple(int(s) for s in item.get("http_statuses", ())),
            messages=tuple(str(m).lower() for m in item.get("messages", ())),
            http_range=http_range,
            tier=item.get("tier"),
            scope=str(item.get("scope", "any")),
        ))
        if rules[-1].scope not in ("any", "run", "call"):
            raise ValueError(f"pipeline.rules[{i}].scope must be any, run or call")
    return tuple(rules)

"""The error classifier: a pure function from an exception to a :class:`Decision`.

``classify`` reads the error's ``code``, ``http_status``, ``message`` and ``scope`` (see
:mod:`pipeline.errors`), finds the first matching :class:`~pipeline.config.Rule`, and turns the
rule's action into a decision, applying the retry budget:

* ``retry``: wait the Retry-After (plus a little jitter) when the error carries one, else
  exponential backoff with full jitter, ``rand() * min(maximum, initial * multiplier**(attempt-1))``.
  It becomes ``fail`` once ``attempt >= policy.max_attempts`` or ``elapsed + wait >
  policy.max_total``.
* ``resubmit``: submit a new run at once, while ``resubmits < policy.max_resubmits``; then
  ``fail``.
* ``fail`` stops the task (MEDIUM); ``fatal`` stops the batch and opens the breaker (HIGH).

Errors no rule matches: network errors and HTTP 5xx are retried, anything else fails with
``error_class`` ``"unknown"``. A rule's ``tier`` overrides the default tier; when retries or
resubmits run out the tier is at least MEDIUM.

For a ``scope == "run"`` error (a run that ended in Fail), ``retry`` means: submit the run again
after ``wait`` (polling a finished run again is pointless).
"""
from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass
from typing import Any, Callable

import aiohttp

from .config import Rule, RetryPolicy
from .errors import CozeNetworkError, PipelineError

__all__ = ["Decision", "classify", "decision_fields", "error_fields", "TIERS"]

TIERS = ("LOW", "MEDIUM", "HIGH", "CRITICAL")
_DEFAULT_TIER = {"retry": "LOW", "resubmit": "LOW", "fail": "MEDIUM", "fatal": "HIGH"}
_RAW_NETWORK = (ConnectionError, asyncio.TimeoutError, TimeoutError,
                aiohttp.ClientConnectionError)


@dataclass(frozen=True)
class Decision:
    """What to do about one error. ``wait`` is in seconds (0 unless the action is retry)."""

    action: str        # retry | resubmit | fail | fatal
    wait: float
    error_class: str   # the matching rule's name, or "unknown"
    tier: str          # LOW | MEDIUM | HIGH | CRITICAL
    reason: str


@dataclass(frozen=True)
class _Fields:
    code: str
    http_status: int | None
    message: str
    scope: str
    retry_after: float | None
    network: bool


def error_fields(error: BaseException) -> _Fields:
    """The parts of ``error`` the rules look at, for any exception type."""
    network = isinstance(error, (CozeNetworkError, *_RAW_NETWORK))
    code = getattr(error, "code", None)
    code = "network" if network and not code else str(code or "")
    status = getattr(error, "http_status", None)
    if isinstance(error, PipelineError):
        message = str(error.message or "")
    else:
        message = str(error) or type(error).__name__
    retry_after = getattr(error, "retry_after", None)
    if not isinstance(retry_after, (int, float)) or retry_after < 0:
        retry_after = None
    return _Fields(code=code, http_status=status if isinstance(status, int) else None,
                   message=message.lower(), scope=str(getattr(error, "scope", "call")),
                   retry_after=retry_after, network=network)


def _matches(rule: Rule, f: _Fields) -> bool:
    if rule.scope != "any" and rule.scope != f.scope:
        return False
    if f.code and f.code in rule.codes:
        return True
    if f.http_status is not None:
        if f.http_status in rule.http_statuses:
            return True
        if rule.http_range and rule.http_range[0] <= f.http_status <= rule.http_range[1]:
            return True
    return any(m and m.lower() in f.message for m in rule.messages)


def _raise_tier(tier: str, floor: str) -> str:
    return tier if TIERS.index(tier) >= TIERS.index(floor) else floor


def classify(error: BaseException, rules: tuple[Rule, ...], *, attempt: int, resubmits: int,
             elapsed: float, policy: RetryPolicy,
             rand: Callable[[], float] = random.random) -> Decision:
    """Decide what to do about ``error`` after ``attempt`` tries (1 = the first try failed).

    ``resubmits`` is how many new runs were already submitted for this task; ``elapsed`` is the
    seconds spent on this call so far. ``rand`` returns a float in [0, 1) for jitter. Pure: the
    same inputs (and the same ``rand``) give the same decision.
    """
    f = error_fields(error)
    rule = next((r for r in rules if _matches(r, f)), None)
    if rule is not None:
        action, name, tier = rule.action, rule.name, rule.tier
        why = f"matched rule {rule.name}"
    elif f.network or (f.http_status is not None and 500 <= f.http_status <= 599):
        action, name, tier = "retry", "unknown", None
        why = "network error" if f.network else f"HTTP {f.http_status}"
    else:
        action, name, tier = "fail", "unknown", None
        why = "no rule matched"
    tier = tier if tier in TIERS else _DEFAULT_TIER.get(action, "MEDIUM")
    if action == "retry":
        return _retry(f, name, tier, why, attempt, elapsed, policy, rand)
    if action == "resubmit":
        if resubmits < policy.max_resubmits:
            return Decision("resubmit", 0.0, name, tier, f"{why}: resubmit the run")
        return Decision("fail", 0.0, name, _raise_tier(tier, "MEDIUM"),
                        f"{why}: resubmitted {resubmits} time(s) already")
    if action == "fatal":
        return Decision("fatal", 0.0, name, tier, f"{why}: stop the batch")
    return Decision("fail", 0.0, name, tier, f"{why}: not retryable")


def _retry(f: _Fields, name: str, tier: str, why: str, attempt: int, elapsed: float,
           policy: RetryPolicy, rand: Callable[[], float]) -> Decision:
    jitter = min(max(rand(), 0.0), 1.0)
    if f.retry_after is not None:
        # Honour the server's wait; a small jitter keeps callers from returning in lockstep.
        wait = f.retry_after + jitter * min(1.0, policy.maximum)
    else:
        ceiling = policy.initial * policy.multiplier ** max(0, attempt - 1)
        wait = jitter * min(policy.maximum, ceiling)
    wait = max(0.0, wait)
    exhausted = _raise_tier(tier, "MEDIUM")
    if attempt >= policy.max_attempts:
        return Decision("fail", 0.0, name, exhausted,
                        f"{why}: retries exhausted after {attempt} attempt(s)")
    if elapsed + wait > policy.max_total:
        return Decision("fail", 0.0, name, exhausted,
                        f"{why}: retries exhausted, {elapsed + wait:.0f}s would exceed "
                        f"the {policy.max_total:.0f}s budget")
    return Decision("retry", wait, name, tier, f"{why}: retry in {wait:.1f}s")


def decision_fields(decision: Decision) -> dict[str, Any]:
    """A plain dict of ``decision`` for logs and storage."""
    return {"action": decision.action, "wait": decision.wait, "error_class": decision.error_class,
            "tier": decision.tier, "reason": decision.reason}

"""Retries for one call, driven by the classifier, run by tenacity (the only place it is used).

``call_with_retry`` asks :func:`pipeline.classifier.classify` about every failure: only a
``retry`` decision is retried, after the decision's wait, slept on the injected clock (so a
:class:`~pipeline.clock.FakeClock` makes retries instant). Any other decision re-raises the
original exception at once. The raised exception carries the last decision as ``exc.decision``;
when the retry budget runs out that decision is a ``fail`` saying so.
"""
from __future__ import annotations

import random
from typing import Awaitable, Callable, TypeVar

from tenacity import AsyncRetrying, RetryCallState, stop_never

from .classifier import Decision, classify
from .clock import Clock
from .config import Rule, RetryPolicy

__all__ = ["call_with_retry"]

T = TypeVar("T")
OnRetry = Callable[[Decision, BaseException, int], None]


async def call_with_retry(fn: Callable[[], Awaitable[T]], *, rules: tuple[Rule, ...],
                          policy: RetryPolicy, clock: Clock, on_retry: OnRetry | None = None,
                          resubmits: int = 0,
                          rand: Callable[[], float] = random.random) -> T:
    """Await ``fn()`` until it succeeds or the classifier says stop; returns its result.

    ``on_retry(decision, exc, attempt)`` is called before each wait (for logs and metrics).
    Raises the last exception from ``fn`` with ``exc.decision`` set.
    """
    started = clock.monotonic()
    decisions: dict[int, Decision] = {}

    def should_retry(state: RetryCallState) -> bool:
        exc = state.outcome.exception() if state.outcome else None
        if exc is None:
            return False
        decision = classify(exc, rules, attempt=state.attempt_number, resubmits=resubmits,
                            elapsed=clock.monotonic() - started, policy=policy, rand=rand)
        decisions[state.attempt_number] = decision
        _attach(exc, decision)
        if decision.action != "retry":
            return False
        if on_retry is not None:
            on_retry(decision, exc, state.attempt_number)
        return True

    def wait(state: RetryCallState) -> float:
        return decisions[state.attempt_number].wait

    retrying = AsyncRetrying(sleep=clock.sleep, retry=should_retry, wait=wait, stop=stop_never,
                             reraise=True)
    async for attempt in retrying:
        with attempt:
            return await fn()
    raise AssertionError("unreachable: tenacity either returns or raises")  # pragma: no cover


def _attach(exc: BaseException, decision: Decision) -> None:
    try:
        exc.decision = decision  # type: ignore[attr-defined]
    except AttributeError:  # pragma: no cover - exceptions with __slots__
        pass

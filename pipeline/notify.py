"""What the pipeline tells the outside world, as a protocol the bot implements.

The pipeline knows nothing of Feishu: it calls these hooks (synchronously, from the event loop;
implementations only write to the store, e.g. enqueue an outbox row) and the bot turns them into
cards, alerts and Bitable write-backs.
"""
from __future__ import annotations

from typing import Any, Protocol


class Notifier(Protocol):
    def task_retrying(self, task: dict[str, Any], decision: Any, error: BaseException) -> None:
        """A call failed and will be retried (LOW: counted, not announced)."""

    def task_finished(self, task: dict[str, Any], decision: Any | None,
                      error: BaseException | None) -> None:
        """A task reached a final status (``task["status"]``); decision/error when it failed."""

    def batch_blocked(self, batch_id: str, decision: Any, error: BaseException) -> None:
        """A fatal error stopped the batch until a human resumes it (HIGH)."""

    def breaker_changed(self, service: str, before: str, after: str, reason: str | None) -> None:
        """A circuit breaker changed state (open: CRITICAL; closed again: resolved)."""

    def batch_progress(self, batch_id: str) -> None:
        """Counts of a batch changed (progress card, throttled by the implementation)."""

    def batch_finished(self, batch_id: str) -> None:
        """No task of the batch is active any more."""

    def workflow_switched(self, switch: Any) -> None:
        """Submits moved to the fallback workflow, or back (a :class:`pipeline.fallback.Switch`)."""


class NullNotifier:
    """Ignores everything; the default for ``opsbot run`` without a chat."""

    def task_retrying(self, task, decision, error) -> None:
        pass

    def task_finished(self, task, decision, error) -> None:
        pass

    def batch_blocked(self, batch_id, decision, error) -> None:
        pass

    def breaker_changed(self, service, before, after, reason) -> None:
        pass

    def batch_progress(self, batch_id) -> None:
        pass

    def batch_finished(self, batch_id) -> None:
        pass

    def workflow_switched(self, switch) -> None:
        pass

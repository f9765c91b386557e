"""Which Coze account and workflow a task goes to: the worker's view of many pipelines.

A batch records its pipeline (``batches.pipeline``). Each pipeline has a workflow (and a
fallback) and runs on one Coze account; an account has its own client (token, QPS budget), its
own concurrent-run limit and its own breaker, shared by every pipeline on it and by every
process on the store. :class:`Routing` holds both lists; the entry points build it from the
settings (``bot.service``), tests build it by hand.

A worker built without a routing has one account (``default``, breaker ``coze``) that takes
every batch, whatever pipeline it names, and one pipeline: the single-pipeline behaviour.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

DEFAULT = "default"


@dataclass(frozen=True)
class Account:
    """One Coze account as the worker uses it."""

    name: str
    coze: Any                       # a CozeClient (its limiter holds the QPS budget)
    max_runs: int                   # runs in flight on the account, across every process
    qps: float
    breaker_service: str = "coze"   # the breakers row; "coze" for the default account
    #: the pipelines on this account; None: every batch (a worker with a single account)
    pipelines: tuple[str, ...] | None = None


@dataclass(frozen=True)
class Route:
    """One pipeline: its workflows and the account it runs on."""

    name: str
    workflow_id: str
    fallback_workflow_id: str = ""
    account: str = DEFAULT


@dataclass(frozen=True)
class Routing:
    accounts: tuple[Account, ...]
    routes: tuple[Route, ...]

    def __post_init__(self) -> None:
        if not self.accounts or not self.routes:
            raise ValueError("a routing needs at least one account and one pipeline")
        names = {a.name for a in self.accounts}
        for route in self.routes:
            if route.account not in names:
                raise ValueError(f"pipeline {route.name!r} names the unknown account "
                                 f"{route.account!r}")

    @classmethod
    def single(cls, coze: Any, workflow_id: str, *, max_runs: int, qps: float,
               fallback_workflow_id: str = "") -> "Routing":
        """One account taking every batch, one pipeline: the single-pipeline worker."""
        return cls((Account(DEFAULT, coze, max_runs, qps),),
                   (Route(DEFAULT, workflow_id, fallback_workflow_id),))

    def route(self, pipeline: str | None) -> Route:
        """The pipeline's route; an unknown one (or None) gets the first route."""
        for route in self.routes:
            if route.name == pipeline:
                return route
        return self.routes[0]

    def account(self, name: str) -> Account:
        return next(a for a in self.accounts if a.name == name)

"""The pipeline's exception tree.

::

    PipelineError
    ├── CozeError             a Coze call or run went wrong: code, message, http_status, log_id,
    │   │                     retry_after, scope, node, debug_url
    │   ├── CozeNetworkError  connection refused / reset / dropped, or a timeout (code "network")
    │   └── RunFailed         a run ended with execute_status "Fail" (scope "run")
    └── SynthesisError        the local synthesis stage failed (scope "run")
        └── VideoError        the built-in video step (pipeline.video.errors): code = class

``aiohttp`` and ``asyncio`` errors are translated into this tree in :mod:`pipeline.coze`, the one
boundary where they happen (``raise ... from exc``). The classifier (:mod:`pipeline.classifier`)
reads ``code``, ``http_status``, ``message`` and ``scope``; :mod:`pipeline.retry` attaches its
final :class:`~pipeline.classifier.Decision` as ``exc.decision``.

``scope`` is ``"call"`` for an API call that failed and ``"run"`` for work that ran and failed;
classifier rules can be limited to one of them. Messages never contain the API token: the client
redacts it (see :func:`redact`) before building an error.
"""
from __future__ import annotations

import re
from typing import Any

__all__ = [
    "PipelineError", "CozeError", "CozeNetworkError", "RunFailed", "SynthesisError",
    "redact", "node_from_message",
]


class PipelineError(Exception):
    """Base of every pipeline error. ``decision`` is set by :mod:`pipeline.retry`."""

    code: str = ""
    message: str = ""
    scope: str = "call"
    decision: Any = None


class CozeError(PipelineError):
    """A Coze API call failed, or (subclass :class:`RunFailed`) a run ended in Fail.

    ``code`` is the Coze ``code`` as a string (``"4100"``), or ``"http_<status>"`` when the
    answer carried no Coze code, or ``"network"``. ``retry_after`` is in seconds.
    """

    def __init__(self, code: str, message: str = "", *, http_status: int | None = None,
                 log_id: str | None = None, retry_after: float | None = None,
                 scope: str = "call", node: str | None = None,
                 debug_url: str | None = None) -> None:
        self.code = str(code)
        self.message = message
        self.http_status = http_status
        self.log_id = log_id
        self.retry_after = retry_after
        self.scope = scope
        self.node = node if node is not None else node_from_message(message)
        self.debug_url = debug_url
        super().__init__(self._text())

    def _text(self) -> str:
        parts = [f"[{self.code}] {self.message}".rstrip() if self.code else self.message]
        if self.http_status is not None:
            parts.append(f"http={self.http_status}")
        if self.node:
            parts.append(f"node={self.node}")
        if self.log_id:
            parts.append(f"logid={self.log_id}")
        return " ".join(parts)


class CozeNetworkError(CozeError):
    """Connection refused, reset or dropped, or no answer in time. Always code ``"network"``.

    ``sent`` is False only when the request cannot have reached Coze (refused, DNS, connect
    timeout); after that the request may have been received and acted on.
    """

    def __init__(self, message: str = "", *, sent: bool = True, **kwargs: Any) -> None:
        kwargs.setdefault("scope", "call")
        self.sent = sent
        super().__init__("network", message, **kwargs)


class RunFailed(CozeError):
    """A workflow run ended with ``execute_status`` ``Fail``; ``code`` is its ``error_code``."""

    def __init__(self, code: str, message: str = "", **kwargs: Any) -> None:
        kwargs["scope"] = "run"
        super().__init__(code, message, **kwargs)


class SynthesisError(PipelineError):
    """The local synthesis stage failed (bad input, command exited non-zero, timeout)."""

    def __init__(self, code: str, message: str = "") -> None:
        self.code = str(code)
        self.message = message
        self.scope = "run"
        super().__init__(f"[{self.code}] {message}".rstrip())


def redact(text: str, secret: str | None) -> str:
    """``text`` with every occurrence of ``secret`` replaced (no-op for an empty secret)."""
    if secret and text:
        return text.replace(secret, "***")
    return text


# Coze names the failing node in a few shapes: node "x", node: x, node_name=x, 节点 x, 节点「x」.
_NODE_PATTERNS = (
    re.compile(r"""node(?:[ _]?name)?\s*[:=]\s*["'“「]?([^"'”」,，;；\s)]+)""", re.I),
    re.compile(r"""node\s+["'“「]([^"'”」]+)["'”」]""", re.I),
    re.compile(r"""节点\s*[:：]?\s*["'“「]?([^"'”」,，;；:：\s)]+)"""),
)


def node_from_message(message: str | None) -> str | None:
    """The failing node's name when ``message`` reveals it, else None."""
    if not message:
        return None
    for pattern in _NODE_PATTERNS:
        match = pattern.search(message)
        if match:
            return match.group(1)
    return None

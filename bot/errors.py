"""The bot package's exceptions: one tree, raised at the Feishu boundary (``bot.feishu.client``).

::

    OpsbotError                      anything the bot package raises on purpose
    └── FeishuError                  a Feishu OpenAPI call failed: code, msg, log_id, http_status,
        │                            retry_after; classified by .retryable / .permanent
        └── FeishuNetworkError       no answer at all (connection refused or reset, timeout)

Classification (exactly one of ``retryable`` / ``permanent`` is true):

- retryable: network errors; HTTP 5xx and 429; rate limits (99991400 app, 99991402, 230020 per
  chat, 1254290 Bitable); 1254607 data not ready; 1254291 write conflict; token and credential
  errors (99991661, 99991663..99991668). The client already refreshes the token and retries once
  on an invalid or expired token; if the error still comes out, it is a config or platform problem
  that a person can fix, so callers back off and try again rather than throwing messages away.
- permanent: everything else, notably 230002 bot not in chat, 230025 card too big, 230001 bad
  params, 99991672 no permission (scope missing), 230099 card build failed, Bitable 1254xxx request
  errors. Sending the same request again would fail the same way.

Messages never contain a secret: they carry Feishu's code, its msg and the log id only.
"""
from __future__ import annotations

#: Codes worth trying again after a wait (see the module docstring).
RETRYABLE_CODES = frozenset({
    99991400,  # app rate limited (HTTP 429; wait x-ogw-ratelimit-reset)
    99991402,  # too many requests
    230020,    # chat rate limited (5 msg/s per chat, all bots together)
    1254290,   # Bitable: too many requests
    1254291,   # Bitable: write conflict (another write to the same table)
    1254607,   # Bitable: data not ready
    1061045,   # drive uploads: over 5 QPS or the daily count ("can retry" later)
})
#: Tenant token missing, invalid or expired: fixed by fetching a new token.
TOKEN_CODES = frozenset({99991661, 99991663, 99991664, 99991665, 99991666, 99991668})
#: Documented permanent codes, for readers and tests; any code not retryable is permanent.
PERMANENT_CODES = frozenset({230001, 230002, 230025, 230099, 99991672})

#: ``code`` of a FeishuError that carries no Feishu code (non-JSON answer, no answer).
NO_CODE = -1


class OpsbotError(Exception):
    """Base of every error the bot package raises on purpose."""


class FeishuError(OpsbotError):
    """A Feishu OpenAPI call answered with a non-zero code (or not at all, in the subclass).

    ``code`` is Feishu's error code (``NO_CODE`` when the answer had none); ``http_status`` the
    HTTP status when one came back; ``retry_after`` the seconds Feishu asked us to wait
    (``x-ogw-ratelimit-reset``), or None.
    """

    def __init__(self, code: int, msg: str, *, log_id: str | None = None,
                 http_status: int | None = None, retry_after: float | None = None,
                 operation: str = "") -> None:
        self.code = int(code)
        self.msg = msg or ""
        self.log_id = log_id
        self.http_status = http_status
        self.retry_after = retry_after
        self.operation = operation
        super().__init__(self._describe())

    def _describe(self) -> str:
        parts = [f"{self.operation or 'feishu'} failed: code={self.code} msg={self.msg!r}"]
        if self.http_status is not None:
            parts.append(f"http={self.http_status}")
        if self.log_id:
            parts.append(f"log_id={self.log_id}")
        return " ".join(parts)

    @property
    def token_invalid(self) -> bool:
        """The tenant token was missing, invalid or expired (a fresh token may fix it)."""
        return self.code in TOKEN_CODES

    @property
    def rate_limited(self) -> bool:
        return self.code in (99991400, 99991402, 230020, 1254290) or self.http_status == 429

    @property
    def retryable(self) -> bool:
        """True when the same call may succeed later (see the module docstring)."""
        if self.code in RETRYABLE_CODES or self.code in TOKEN_CODES:
            return True
        return self.http_status is not None and (self.http_status >= 500
                                                 or self.http_status == 429)

    @property
    def permanent(self) -> bool:
        """True when repeating the call cannot help: give up on it and tell someone."""
        return not self.retryable

    def as_log(self) -> dict[str, object]:
        """Structured fields for a log line (no secrets: Feishu never echoes them)."""
        # Keys avoid LogRecord's own attribute names ("msg"), so this can go in ``extra=``.
        return {"feishu_operation": self.operation, "feishu_code": self.code,
                "feishu_msg": self.msg, "feishu_log_id": self.log_id,
                "http_status": self.http_status, "retry_after": self.retry_after,
                "retryable": self.retryable}


class FeishuNetworkError(FeishuError):
    """No usable answer: connection refused or dropped, or the call timed out. Always retryable."""

    def __init__(self, msg: str, *, operation: str = "") -> None:
        super().__init__(NO_CODE, msg, operation=operation)

    @property
    def retryable(self) -> bool:
        return True

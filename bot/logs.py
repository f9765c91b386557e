"""Structured JSON logs, one object per line, with secrets redacted.

Extra fields given as ``log.info("...", extra={"batch_id": ..., "task_id": ...})`` become keys.
A filter masks anything that looks like a credential (Bearer tokens, tenant tokens ``t-...``,
``app_secret=...``) and every secret registered with :func:`register_secret`, so even an
exception message that quotes a request cannot leak one.
"""
from __future__ import annotations

import json
import logging
import re
import sys
import time

_SECRETS: set[str] = set()
_PATTERNS = [
    re.compile(r"(?i)(bearer\s+)[A-Za-z0-9._\-]{6,}"),
    re.compile(r"\b(t-)[A-Za-z0-9_\-]{10,}"),
    re.compile(r"(?i)((?:app_secret|encrypt_key|api_token|access_token|tenant_access_token|"
               r"verification_token|token)[\"']?\s*[:=]\s*[\"']?)[^\s\"',}]{4,}"),
]
_STD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


def register_secret(value: str) -> None:
    """Never print this value in any log line (settings secrets are registered at start)."""
    if value and len(value) >= 4:
        _SECRETS.add(value)


def redact(text: str) -> str:
    for secret in _SECRETS:
        if secret in text:
            text = text.replace(secret, "***")
    for pattern in _PATTERNS:
        text = pattern.sub(lambda m: m.group(1) + "***", text)
    return text


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STD and not key.startswith("_"):
                doc[key] = value
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return redact(json.dumps(doc, ensure_ascii=False, default=str))


def setup_logging(level: str = "INFO", stream=None) -> None:
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(getattr(logging, str(level).upper(), logging.INFO))
    for noisy in ("Lark", "urllib3", "aiohttp.access"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def register_settings_secrets(settings) -> None:
    for value in (settings.feishu.app_secret, settings.feishu.verification_token,
                  settings.feishu.encrypt_key, settings.coze.api_token,
                  *(a.api_token for a in getattr(settings, "coze_accounts", ()))):
        register_secret(value.get())

"""The chat command parser: pure, total (never raises), typed results.

``parse(text)`` returns a :class:`Command` or a :class:`ParseError`. Grammar::

    [@_user_N ...] [/]NAME [PIPELINE] [ARG ...] [--include ID..] [--exclude ID..] [--limit N]
        [--date D]

Names are case-insensitive English or their Chinese alias (``?``/``？`` mean help). Arguments are
split like a shell without escapes: whitespace (full-width spaces included) separates, and
``"..."``, ``'...'``, ``“...”`` or ``‘...’`` group. ID lists take comma or space separated values
up to the next option. A ParseError carries an i18n key and its arguments; ``message(lang)``
gives the text for the user.

Many pipelines: ``parse(text, pipelines)`` takes the names and aliases of the configured
pipelines (``{word.lower(): name}``). ``run``, ``status``, ``errors`` and ``report`` accept one
of them as their first argument (``run drama``, ``运行 短剧``, ``status drama``); ``run`` with an
argument that names no pipeline is refused, listing the names. Without ``pipelines``, no word is
a pipeline name (``run x`` is refused as an unexpected argument).
"""
from __future__ import annotations

import dataclasses
import re
import unicodedata
from dataclasses import dataclass, field
from datetime import date
from typing import Any, Union

from bot.chat.mdtext import escape
from bot.chat.i18n import t

MAX_TEXT = 2000
MAX_LIMIT = 100_000
MAX_SILENCE = 30 * 86400
DEFAULT_SILENCE = 3600
MIN_DATE, MAX_DATE = date(2000, 1, 1), date(2099, 12, 31)   # --date range (a report's day)

ALIASES: dict[str, str] = {
    "run": "run", "运行": "run",
    "status": "status", "状态": "status",
    "retry": "retry", "重试": "retry",
    "cancel": "cancel", "取消": "cancel",
    "pause": "pause", "暂停": "pause",
    "resume": "resume", "恢复": "resume",
    "report": "report", "日报": "report",
    "errors": "errors", "错误": "errors",
    "silence": "silence", "静默": "silence",
    "replay": "replay", "重发": "replay",
    "help": "help", "帮助": "help", "?": "help", "？": "help",
}
COMMANDS = ("run", "status", "retry", "cancel", "pause", "resume", "report", "errors", "silence",
            "replay", "help")
MUTATING = frozenset({"run", "retry", "cancel", "pause", "resume", "silence", "replay"})
MAX_REPLAY_IDS = 100
OPTIONS: dict[str, frozenset[str]] = {
    "run": frozenset({"include", "exclude", "limit"}),
    "report": frozenset({"date"}),
    "errors": frozenset({"limit"}),
}
_MULTI = frozenset({"include", "exclude"})
_MENTION = re.compile(r"@_(?:user_\d+|all)\b")
_QUOTES = {'"': '"', "'": "'", "“": "”", "‘": "’", "「": "」"}
BATCH_ID = re.compile(r"^b[0-9a-f]{4,32}$")   # what batch ids look like (new_batch_id, run)
_ID = re.compile(r"^[\w.:\-]{1,128}$")        # batch ids given to status/cancel/pause/...
MAX_ID = 128
_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
_DURATION = re.compile(r"^(\d{1,7})(s|m|h|d|秒|分钟|分|小时|时|天)$", re.IGNORECASE)
_UNIT = {"s": 1, "秒": 1, "m": 60, "分": 60, "分钟": 60, "h": 3600, "时": 3600, "小时": 3600,
         "d": 86400, "天": 86400}


@dataclass(frozen=True)
class Command:
    """A parsed command. Unused fields stay at their defaults."""

    name: str
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    limit: int | None = None
    date: str | None = None
    batch_id: str | None = None
    task_ref: str | None = None
    key: str | None = None
    seconds: int | None = None
    topic: str | None = None
    rows: tuple[int, ...] = ()      # replay: outbox row ids (empty: every dead row)
    pipeline: str | None = None     # run/status/errors/report NAME (the canonical name)

    @property
    def mutating(self) -> bool:
        return self.name in MUTATING

    def to_text(self) -> str:
        """Canonical text that parses back to this command."""
        parts = [self.name]
        if self.pipeline:
            parts.append(self.pipeline)
        if self.name == "retry":
            parts += [self.task_ref] if self.task_ref else ["batch", self.batch_id or ""]
        elif self.batch_id:
            parts.append(self.batch_id)
        if self.key is not None:
            parts.append(self.key)
        if self.seconds is not None:
            parts.append(f"{self.seconds}s")
        if self.topic:
            parts.append(self.topic)
        parts += [str(r) for r in self.rows]
        if self.include:
            parts += ["--include", ",".join(self.include)]
        if self.exclude:
            parts += ["--exclude", ",".join(self.exclude)]
        if self.limit is not None:
            parts += ["--limit", str(self.limit)]
        if self.date:
            parts += ["--date", self.date]
        return " ".join(_quote(p) for p in parts)


@dataclass(frozen=True)
class ParseError:
    """Why a text is not a valid command; ``command`` is set when the name was understood."""

    code: str
    params: dict[str, Any] = field(default_factory=dict)
    command: str | None = None

    def message(self, lang: str = "zh") -> str:
        """The text for the user; echoed input is neutralised (it is shown as card markdown)."""
        return t("parse." + self.code, lang,
                 **{k: escape(v) if isinstance(v, str) else v for k, v in self.params.items()})


Result = Union[Command, ParseError]


class _Fail(Exception):
    def __init__(self, code: str, **params: Any) -> None:
        super().__init__(code)
        self.code, self.params = code, params


PIPELINE_COMMANDS = frozenset({"run", "status", "errors", "report"})


def parse(text: str, pipelines: dict[str, str] | None = None) -> Result:
    """Parse one chat message. Never raises. ``pipelines``: ``{name or alias, lower case:
    pipeline name}`` (see the module docstring)."""
    name = None
    try:
        if not isinstance(text, str):
            return ParseError("empty")
        if len(text) > MAX_TEXT:
            return ParseError("too_long", {"max": MAX_TEXT})
        tokens = tokenize(_MENTION.sub(" ", text))
        if not tokens:
            return ParseError("empty")
        head = tokens[0]
        if head.startswith("/") or head.startswith("／"):
            head = head[1:]
        name = ALIASES.get(head.lower())
        if name is None:
            return ParseError("unknown_command", {"name": _short(tokens[0])})
        positional, options = _split_options(name, tokens[1:])
        pipeline = None
        if name in PIPELINE_COMMANDS and positional:
            word = positional[0]
            if pipelines is not None and word.lower() in pipelines:
                pipeline, positional = pipelines[word.lower()], positional[1:]
            elif name == "run" and pipelines is not None:
                raise _Fail("unknown_pipeline", value=_short(word),
                            names=", ".join(sorted(set(pipelines.values()))))
        cmd = _BUILDERS[name](positional, options)
        return dataclasses.replace(cmd, pipeline=pipeline) if pipeline else cmd
    except _Fail as exc:
        return ParseError(exc.code, exc.params, command=name)
    except Exception:  # noqa: BLE001 - the parser is total by contract
        return ParseError("unknown_command", {"name": "?"}, command=name)


def tokenize(text: str) -> list[str]:
    """Split like a shell (no escapes); raises _Fail on an unclosed quote."""
    tokens: list[str] = []
    buf: list[str] = []
    in_token = False
    i, n = 0, len(text)
    while i < n:
        ch = text[i]
        if ch.isspace():
            if in_token:
                tokens.append("".join(buf))
                buf, in_token = [], False
        elif ch in _QUOTES:
            close = text.find(_QUOTES[ch], i + 1)
            if close < 0:
                raise _Fail("unclosed_quote")
            buf.append(text[i + 1:close])
            in_token = True
            i = close
        else:
            buf.append(ch)
            in_token = True
        i += 1
    if in_token:
        tokens.append("".join(buf))
    return tokens


def _split_options(name: str, tokens: list[str]) -> tuple[list[str], dict[str, list[str]]]:
    allowed = OPTIONS.get(name, frozenset())
    positional: list[str] = []
    options: dict[str, list[str]] = {}
    current: list[str] | None = None
    for tok in tokens:
        if tok.startswith("--") or tok.startswith("——"):
            opt, _, inline = tok.lstrip("-—").partition("=")
            opt = opt.lower()
            if opt not in allowed:
                raise _Fail("unknown_option", command=name, option=_short(tok))
            current = options.setdefault(opt, [])
            if inline:
                current.append(inline)
                current = current if opt in _MULTI else None
        elif current is not None:
            current.append(tok)
            current = current if opt in _MULTI else None
        else:
            positional.append(tok)
    return positional, options


def _ids(opt: str, values: list[str]) -> tuple[str, ...]:
    out = [v.strip() for raw in values for v in re.split(r"[,，、]", raw) if v.strip()]
    if not out:
        raise _Fail("missing_value", option="--" + opt)
    for v in out:
        if not valid_ref(v):
            raise _Fail("bad_id", value=_short(v))
    return tuple(dict.fromkeys(out))


def valid_ref(value: str) -> bool:
    """A task key, record id or batch id as users type them: any printable text (spaces inside
    quotes too) up to :data:`MAX_ID` characters. Refs are only compared, and neutralised when
    shown, so nothing more is needed."""
    return (0 < len(value) <= MAX_ID and value.strip() == value
            and all(c.isprintable() or unicodedata.category(c) == "Zs" for c in value))


def _single(opt: str, values: list[str] | None) -> str | None:
    if values is None:
        return None
    if len(values) != 1:
        if not values:
            raise _Fail("missing_value", option="--" + opt)
        raise _Fail("unexpected", command="--" + opt, value=_short(values[1]))
    return values[0]


def _limit(values: list[str] | None) -> int | None:
    raw = _single("limit", values)
    if raw is None:
        return None
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 7 or not 0 < int(raw) <= MAX_LIMIT:
        raise _Fail("bad_limit", value=_short(raw))
    return int(raw)


def _date(raw: str | None) -> str | None:
    if raw is None:
        return None
    if not _DATE.match(raw):
        raise _Fail("bad_date", value=_short(raw))
    try:
        day = date.fromisoformat(raw)
    except ValueError:
        raise _Fail("bad_date", value=_short(raw)) from None
    if not MIN_DATE <= day <= MAX_DATE:  # the report also reads the day before and after
        raise _Fail("bad_date", value=_short(raw))
    return day.isoformat()


def parse_duration(raw: str) -> int | None:
    """Seconds in ``30m``/``2h``/``1d``/``45s`` (Chinese units too); None when malformed."""
    m = _DURATION.match(raw.strip())
    if not m:
        return None
    seconds = int(m.group(1)) * _UNIT[m.group(2).lower()]
    return seconds if 0 < seconds <= MAX_SILENCE else None


def _no_more(name: str, extra: list[str]) -> None:
    if extra:
        raise _Fail("unexpected", command=name, value=_short(extra[0]))


def _batch_arg(name: str, pos: list[str]) -> str | None:
    _no_more(name, pos[1:])
    if not pos:
        return None
    if not _ID.match(pos[0]):
        raise _Fail("bad_id", value=_short(pos[0]))
    return pos[0]


def _build_run(pos, opts):
    _no_more("run", pos)
    return Command("run", include=_ids("include", opts["include"]) if "include" in opts else (),
                   exclude=_ids("exclude", opts["exclude"]) if "exclude" in opts else (),
                   limit=_limit(opts.get("limit")))


def _build_batch_cmd(name):
    def build(pos, opts):
        return Command(name, batch_id=_batch_arg(name, pos))
    return build


def _build_errors(pos, opts):
    return Command("errors", batch_id=_batch_arg("errors", pos), limit=_limit(opts.get("limit")))


def _build_report(pos, opts):
    _no_more("report", pos[1:])
    if pos and "date" in opts:
        raise _Fail("unexpected", command="report", value=_short(pos[0]))
    return Command("report", date=_date(pos[0] if pos else _single("date", opts.get("date"))))


def _build_retry(pos, opts):
    if pos and pos[0].lower() in ("batch", "批次"):
        if len(pos) < 2:
            raise _Fail("retry_needs_target")
        _no_more("retry", pos[2:])
        if not valid_ref(pos[1]):
            raise _Fail("bad_id", value=_short(pos[1]))
        return Command("retry", batch_id=pos[1])
    if not pos:
        raise _Fail("retry_needs_target")
    _no_more("retry", pos[1:])
    if not valid_ref(pos[0]):
        raise _Fail("bad_id", value=_short(pos[0]))
    # A ref that looks like a batch id may still be a task key: the handler decides (a batch
    # only when one by that id exists); `retry batch X` is the unambiguous form.
    return Command("retry", task_ref=pos[0])


def _build_silence(pos, opts):
    if not pos or not pos[0].strip():
        raise _Fail("silence_needs_key")
    _no_more("silence", pos[2:])
    seconds = None
    if len(pos) == 2:
        seconds = parse_duration(pos[1])
        if seconds is None:
            raise _Fail("bad_duration", value=_short(pos[1]))
    return Command("silence", key=pos[0][:200], seconds=seconds)


def _build_replay(pos, opts):
    ids = [v for raw in pos for v in re.split(r"[,，、]", raw) if v]
    for v in ids:
        if not (v.isascii() and v.isdigit()) or len(v) > 12:
            raise _Fail("bad_id", value=_short(v))
    if len(ids) > MAX_REPLAY_IDS:
        raise _Fail("unexpected", command="replay", value=_short(ids[MAX_REPLAY_IDS]))
    return Command("replay", rows=tuple(dict.fromkeys(int(v) for v in ids)))


def _build_help(pos, opts):
    topic = ALIASES.get(pos[0].lstrip("/").lower()) if pos else None
    return Command("help", topic=topic)


_BUILDERS = {
    "run": _build_run, "status": _build_batch_cmd("status"), "retry": _build_retry,
    "cancel": _build_batch_cmd("cancel"), "pause": _build_batch_cmd("pause"),
    "resume": _build_batch_cmd("resume"), "report": _build_report, "errors": _build_errors,
    "silence": _build_silence, "replay": _build_replay, "help": _build_help,
}


def _short(value: str, n: int = 40) -> str:
    return value if len(value) <= n else value[:n] + "…"


def _quote(part: str) -> str:
    if part and not any(c.isspace() or c in _QUOTES or c in "”’」" for c in part) \
            and not part.startswith("@_"):
        return part
    for open_, close in (('"', '"'), ("'", "'"), ("“", "”"), ("「", "」")):
        if open_ not in part and close not in part:
            return open_ + part + close
    return part  # pragma: no cover - generators avoid keys holding every quote style


def replace(cmd: Command, **changes: Any) -> Command:
    return dataclasses.replace(cmd, **changes)

"""The command parser: examples, every error, and properties (total, round-trips)."""
from __future__ import annotations

import pytest
from hypothesis import given, settings as hsettings, strategies as st

from bot.chat.commands import (ALIASES, COMMANDS, MAX_DATE, MAX_TEXT, MIN_DATE, Command, ParseError,
                          parse, parse_duration)


@pytest.mark.parametrize("text,expected", [
    ("@_user_1 run", Command("run")),
    ("/run --include a,b c --exclude d --limit 3",
     Command("run", include=("a", "b", "c"), exclude=("d",), limit=3)),
    ("RUN --include=a，b", Command("run", include=("a", "b"))),
    ("运行\u3000--limit\u30005", Command("run", limit=5)),
    ("状态", Command("status")),
    ("/status b1a2b3c4d", Command("status", batch_id="b1a2b3c4d")),
    ("重试 12", Command("retry", task_ref="12")),
    ("retry batch b12345678", Command("retry", batch_id="b12345678")),
    ("retry b12345678", Command("retry", task_ref="b12345678")),  # the handler decides
    ("retry #17", Command("retry", task_ref="#17")),
    ("retry task-7", Command("retry", task_ref="task-7")),
    ("取消", Command("cancel")), ("pause b1234abcd", Command("pause", batch_id="b1234abcd")),
    ("恢复", Command("resume")),
    ("日报 --date 2024-05-01", Command("report", date="2024-05-01")),
    ("report", Command("report")),
    ("errors --limit 5 b1234", Command("errors", batch_id="b1234", limit=5)),
    ("silence “coze 4100” 2h", Command("silence", key="coze 4100", seconds=7200)),
    ("静默 coze:4100", Command("silence", key="coze:4100")),
    ("静默 k 30分钟", Command("silence", key="k", seconds=1800)),
    ("silence k 1d", Command("silence", key="k", seconds=86400)),
    ("help", Command("help")), ("帮助", Command("help")), ("?", Command("help")),
    ("？", Command("help")), ("@_user_1 @_user_2 help run", Command("help", topic="run")),
])
def test_examples(text, expected):
    assert parse(text) == expected


@pytest.mark.parametrize("text,expected", [
    ("run --include a/b,x+y", Command("run", include=("a/b", "x+y"))),
    ('run --exclude "视频 01",#3', Command("run", exclude=("视频 01", "#3"))),
    ('retry "task (old) 7"', Command("retry", task_ref="task (old) 7")),
    ("重试 <at id=all></at>", ParseError("unexpected", {"command": "retry",
                                                      "value": "id=all></at>"}, "retry")),
    ('retry "<at id=all></at>"', Command("retry", task_ref="<at id=all></at>")),
    ("retry " + "k" * 128, Command("retry", task_ref="k" * 128)),
])
def test_ids_are_any_printable_text(text, expected):
    assert parse(text) == expected


@pytest.mark.parametrize("text,code", [
    ("", "empty"), ("@_user_1", "empty"), ("   \u3000 ", "empty"),
    ("deploy", "unknown_command"), ("run x", "unexpected"),
    ('run --include "a', "unclosed_quote"), ("silence “k", "unclosed_quote"),
    ("run --limit 0", "bad_limit"), ("run --limit -1", "bad_limit"), ("run --limit x", "bad_limit"),
    ("run --limit ３", "bad_limit"), ("run --limit 99999999", "bad_limit"),
    ("run --limit", "missing_value"), ("run --include", "missing_value"),
    ("run --include ,", "missing_value"), ("run --date 2024-01-01", "unknown_option"),
    ("report --date 2024-02-30", "bad_date"), ("report --date 24-1-1", "bad_date"),
    ("report --date 0001-01-01", "bad_date"), ("日报 9999-12-31", "bad_date"),
    ("report 1999-12-31", "bad_date"),
    ("retry", "retry_needs_target"), ("retry batch", "retry_needs_target"),
    ("silence", "silence_needs_key"), ("silence k 5x", "bad_duration"),
    ("silence k 0m", "bad_duration"), ("silence k 31d", "bad_duration"),
    ("status a b", "unexpected"), ("run --include a\x07b", "bad_id"),
    ("retry " + "k" * 129, "bad_id"), ("retry batch a\x00", "bad_id"),
    ("x" * (MAX_TEXT + 1), "too_long"),
])
def test_errors(text, code):
    result = parse(text)
    assert isinstance(result, ParseError) and result.code == code
    assert result.message("zh") and result.message("en")
    assert "{" not in result.message("en")


def test_error_knows_the_command():
    assert parse("run --limit 0").command == "run"
    assert parse("nope").command is None


def test_every_command_has_both_names():
    for name in COMMANDS:
        assert parse(name) != parse("unknown") or name in ("retry", "silence")
    assert set(ALIASES.values()) == set(COMMANDS)


def test_durations():
    assert parse_duration("45s") == 45 and parse_duration("2H") == 7200
    assert parse_duration("1天") == 86400 and parse_duration("soon") is None


@hsettings(max_examples=500, deadline=None)
@given(st.text())
def test_parse_never_raises(text):
    result = parse(text)
    assert isinstance(result, (Command, ParseError))
    if isinstance(result, ParseError):
        assert isinstance(result.message("zh"), str)


@hsettings(max_examples=50, deadline=None)
@given(st.text(min_size=MAX_TEXT - 5, max_size=MAX_TEXT * 3))
def test_huge_strings(text):
    assert isinstance(parse(text), (Command, ParseError))


def test_huge_string_is_fast():
    import time
    start = time.perf_counter()
    assert parse("run " + "a," * 1_000_000).code == "too_long"
    assert parse('"' * 1999).code in ("unclosed_quote", "unknown_command", "empty")
    assert time.perf_counter() - start < 1.0


ids = st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9_\-]{0,11}", fullmatch=True)
refs = st.text(st.characters(blacklist_categories=("Cs", "Cc", "Cf", "Cn", "Co", "Zl", "Zp"),
                             blacklist_characters="\"'“”‘’「」,，、"), min_size=1, max_size=40) \
    .filter(lambda s: s.strip() == s and s and not s.startswith(("-", "—", "@_", "/", "／"))
            and "@_" not in s)
batch_ids = st.from_regex(r"b[0-9a-f]{8}", fullmatch=True)
keys = st.text(st.characters(blacklist_categories=("Cs", "Cc"),
                             blacklist_characters="\"'“”‘’「」"), min_size=1, max_size=30) \
    .filter(lambda s: s.strip() and not s.startswith("-") and not s.startswith("—")
            and "@_" not in s)


def _valid_commands():
    return st.one_of(
        st.builds(lambda i, e, n: Command("run", include=tuple(dict.fromkeys(i)),
                                          exclude=tuple(dict.fromkeys(e)), limit=n),
                  st.lists(refs, max_size=4), st.lists(refs, max_size=4),
                  st.none() | st.integers(1, 100_000)),
        st.builds(lambda name, b: Command(name, batch_id=b),
                  st.sampled_from(["status", "cancel", "pause", "resume"]), st.none() | ids),
        st.builds(lambda b, n: Command("errors", batch_id=b, limit=n), st.none() | ids,
                  st.none() | st.integers(1, 100)),
        st.builds(lambda d: Command("report", date=d.isoformat() if d else None),
                  st.none() | st.dates(MIN_DATE, MAX_DATE)),
        st.builds(lambda b: Command("retry", batch_id=b), batch_ids),
        st.builds(lambda r: Command("retry", task_ref=r),
                  refs.filter(lambda s: s.lower() not in ("batch", "批次"))),
        st.builds(lambda k, s: Command("silence", key=k, seconds=s), keys,
                  st.none() | st.integers(1, 30 * 86400)),
        st.builds(lambda rows: Command("replay", rows=tuple(dict.fromkeys(rows))),
                  st.lists(st.integers(0, 10**12 - 1), max_size=6)),
        st.just(Command("help")),
    )


@hsettings(max_examples=300, deadline=None)
@given(_valid_commands(), st.sampled_from(["", "/", "@_user_1 ", "@_user_1 /"]))
def test_round_trip(cmd, prefix):
    assert parse(prefix + cmd.to_text()) == cmd

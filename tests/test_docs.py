"""The README documents every env var, TOML key, CLI command and chat command: it cannot drift."""
from __future__ import annotations

import argparse
import dataclasses
import re
from pathlib import Path

import pytest

from bot.ops.cli import build_parser
from bot.chat.commands import COMMANDS
from bot.settings import ENV_KEYS, AlertSettings, CozeSettings, FeishuSettings
from pipeline.config import (BreakerPolicy, GatePolicy, PipelineConfig, PollPolicy,
                             RetryPolicy, SynthesisConfig)

README = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")

NESTED = {"retry", "poll", "breaker", "gate", "synthesis"}


def _toml_keys():
    keys = [f"feishu.{f.name}" for f in dataclasses.fields(FeishuSettings)]
    keys += [f"coze.{f.name}" for f in dataclasses.fields(CozeSettings)]
    keys += [f"alerts.{f.name}" for f in dataclasses.fields(AlertSettings)]
    keys += [f"pipeline.{f.name}" for f in dataclasses.fields(PipelineConfig)
             if f.name not in NESTED]
    for name, cls in (("retry", RetryPolicy), ("poll", PollPolicy), ("breaker", BreakerPolicy),
                      ("gate", GatePolicy), ("synthesis", SynthesisConfig)):
        keys += [f"pipeline.{name}.{f.name}" for f in dataclasses.fields(cls)]
    keys += ["pipeline.gate"]
    keys += ["opsbot.db", "opsbot.timezone", "opsbot.language", "opsbot.max_body_bytes"]
    return keys


@pytest.mark.parametrize("var", sorted(ENV_KEYS) + ["OPSBOT_CONFIG"])
def test_every_env_var_is_documented(var):
    assert f"`{var}`" in README


@pytest.mark.parametrize("key", _toml_keys())
def test_every_toml_key_is_documented(key):
    assert f"`{key}`" in README


def test_every_env_var_maps_to_a_documented_toml_key():
    for var, (section, key) in ENV_KEYS.items():
        assert re.search(rf"`{var}` \| `{section}\.{key}`", README), var


def _subcommands():
    return next(a for a in build_parser()._actions
                if isinstance(a, argparse._SubParsersAction)).choices


@pytest.mark.parametrize("name", sorted(_subcommands()))
def test_every_cli_command_and_option_is_documented(name):
    assert f"`opsbot {name}" in README
    for action in _subcommands()[name]._actions:
        for opt in action.option_strings:
            if opt.startswith("--") and opt != "--help":
                assert opt in README, f"opsbot {name} {opt}"


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_chat_command_is_documented(name):
    assert f"`{name}`" in README


def test_the_quick_start_has_the_two_commands_ci_runs():
    assert "pip install -e . && opsbot demo" in README
    assert "pip install -e '.[test]' && python -m pytest" in README
    ci = (Path(__file__).resolve().parent.parent / ".ci" / "run").read_text()
    assert "python -m pytest" in ci and "'.[test]'" in ci


def test_every_variable_read_from_the_environment_is_documented():
    """Entry points read a few variables outside Settings (e.g. the web log level)."""
    root = Path(__file__).resolve().parent.parent
    names = set()
    for package in ("bot", "pipeline", "storage"):
        for path in (root / package).rglob("*.py"):
            names |= set(re.findall(r"os\.environ(?:\.get\(|\[)\"([A-Z0-9_]+)\"",
                                    path.read_text(encoding="utf-8")))
    assert "OPSBOT_LOG_LEVEL" in names
    assert {n for n in names if f"`{n}`" not in README} == set()

"""[coze.accounts.NAME] and [[pipelines]]: parsed with every default, bad input refused with one
clear error naming the pipeline or account, tokens never shown; and the chat parser's NAME."""
from __future__ import annotations

import pytest
from hypothesis import given, strategies as st

from bot.chat.commands import ALIASES, Command, ParseError, parse
from bot.chat.handlers import pipeline_words
from bot.settings import SettingsError, load_settings

ACCOUNTS = """
[coze.accounts.studio]
api_token_env = "COZE_TOKEN_STUDIO"
max_runs = 4
qps = 5
"""
DRAMA = """
[[pipelines]]
name = "drama"
aliases = ["短剧", "Juchang"]
workflow_id = "wf-drama"
fallback_workflow_id = "wf-drama-2"
coze_account = "studio"
bitable_table_id = "tblD"
alert_chat_id = "oc_drama"
admin_ids = ["ou_d"]
"""
NEWS = """
[[pipelines]]
name = "news"
workflow_id = "wf-news"
bitable_table_id = "tblN"
"""


def settings(tmp_path, toml: str, **env: str):
    cfg = tmp_path / "c.toml"
    cfg.write_text(toml, encoding="utf-8")
    return load_settings({"OPSBOT_CONFIG": str(cfg), **env})


def test_pipelines_get_their_own_values_and_the_feishu_defaults(tmp_path):
    s = settings(tmp_path, "[feishu]\nalert_chat_id = \"oc_main\"\nadmin_ids = [\"ou_a\"]\n"
                 "oncall_ids = [\"ou_o\"]\nbitable_app_token = \"app1\"\n[coze]\n"
                 "api_token = \"pat_default\"\n[pipeline]\nmax_coze = 9\ncoze_qps = 7\n"
                 + ACCOUNTS + DRAMA + NEWS, COZE_TOKEN_STUDIO="pat_studio")
    assert [p.name for p in s.pipelines] == ["drama", "news"]     # no COZE_WORKFLOW_ID
    drama, news = s.pipelines
    assert drama.aliases == ("短剧", "Juchang") and drama.coze_account == "studio"
    assert drama.fallback_workflow_id == "wf-drama-2" and drama.admin_ids == ("ou_d",)
    assert drama.alert_chat_id == "oc_drama" and drama.oncall_ids == ("ou_o",)
    assert news.coze_account == "default" and news.alert_chat_id == "oc_main"
    assert news.admin_ids == ("ou_a",) and news.bitable_app_token == "app1"
    studio, default = s.account("studio"), s.account("default")
    assert (studio.max_runs, studio.qps, studio.base_url) == (4, 5.0, "https://api.coze.cn")
    assert studio.api_token.get() == "pat_studio" and studio.breaker_service == "coze:studio"
    assert (default.max_runs, default.qps, default.breaker_service) == (9, 7.0, "coze")
    assert s.find_pipeline("juchang") is drama and s.find_pipeline("短剧") is drama
    assert s.find_pipeline("nope") is None and s.default_pipeline is None
    assert s.chat_pipelines("oc_main") == (news,)
    scoped = s.scoped("drama")
    assert scoped.feishu.alert_chat_id == "oc_drama" and scoped.coze.workflow_id == "wf-drama"
    assert scoped.coze.api_token.get() == "pat_studio" and scoped.pipeline.max_coze == 4
    assert "pat_studio" not in repr(s) and "pat_studio" not in repr(studio)


def test_the_single_pipeline_variables_stay_the_default_pipeline(tmp_path):
    alone = load_settings({"COZE_WORKFLOW_ID": "wf1", "FEISHU_ALERT_CHAT_ID": "oc_1",
                           "BITABLE_TABLE_ID": "tbl1"})
    [default] = alone.pipelines
    assert (default.name, default.workflow_id, default.alert_chat_id, default.bitable_table_id) \
        == ("default", "wf1", "oc_1", "tbl1")
    assert alone.default_pipeline == default and not alone.many_pipelines
    # beside [[pipelines]], COZE_WORKFLOW_ID keeps the default pipeline running
    both = settings(tmp_path, NEWS, COZE_WORKFLOW_ID="wf1")
    assert [p.name for p in both.pipelines] == ["default", "news"]
    assert both.default_pipeline.workflow_id == "wf1" and both.many_pipelines


@pytest.mark.parametrize("toml, env, needle", [
    (NEWS + NEWS, {}, "name 'news' is already used"),
    (ACCOUNTS + DRAMA.replace('"Juchang"', '"news"') + NEWS, {"COZE_TOKEN_STUDIO": "t"},
     "'news' is already used by the pipeline 'drama'"),
    (ACCOUNTS + DRAMA + DRAMA.replace('name = "drama"', 'name = "drama2"')
     .replace('"tblD"', '"tblX"'), {"COZE_TOKEN_STUDIO": "t"}, "alias '短剧' is already used"),
    (NEWS.replace('"news"', '"运行"'), {}, "name must be lowercase"),
    (NEWS.replace('"news"', '"News"'), {}, "name must be lowercase"),
    (NEWS.replace('"news"', '"b1234abcd"'), {}, "look like a batch"),
    (NEWS + 'aliases = ["状态"]\n', {}, "is a command word"),
    (NEWS + 'aliases = ["two words"]\n', {}, "must be one word"),
    (NEWS + 'aliases = "x"\n', {}, "aliases must be a list"),
    (NEWS + 'coze_account = "ghost"\n', {}, "coze_account 'ghost' is not defined"),
    (NEWS + 'colour = "red"\n', {}, "unknown key(s) colour"),
    (NEWS.replace('workflow_id = "wf-news"\n', ""), {}, "workflow_id is required"),
    (NEWS + 'admin_ids = ["bad id!"]\n', {}, "(news) admin_ids"),
    (NEWS + NEWS.replace('"news"', '"other"'), {}, "two pipelines would run the same rows"),
    ('[[pipelines]]\nname = "default"\nworkflow_id = "x"\n', {"COZE_WORKFLOW_ID": "wf"},
     "already defined by COZE_WORKFLOW_ID"),
    ('pipelines = []\n', {}, "[[pipelines]] is empty"),
    ('pipelines = "drama"\n', {}, "must be an array of tables"),
    (ACCOUNTS + NEWS, {}, "COZE_TOKEN_STUDIO (api_token_env) is not set"),
    ("[coze.accounts.studio]\nmax_runs = 2\n", {}, "no token"),
    ("[coze.accounts.studio]\napi_token = \"a\"\napi_token_env = \"B\"\n", {}, "not both"),
    ("[coze.accounts.studio]\napi_token_env = \"lower\"\n", {}, "must name an environment"),
    ("[coze.accounts.default]\napi_token = \"a\"\n", {}, "the account 'default' is"),
    ("[coze.accounts.Studio]\napi_token = \"a\"\n", {}, "an account name is lowercase"),
    ("[coze.accounts.studio]\napi_token = \"a\"\nmax_runs = 0\n", {}, "max_runs must be at"),
    ("[coze.accounts.studio]\napi_token = \"a\"\nmax_runs = \"many\"\n", {}, "whole number"),
    ("[coze.accounts.studio]\napi_token = \"a\"\nqps = 0\n", {}, "qps must be positive"),
    ("[coze.accounts.studio]\napi_token = \"a\"\nbase_url = \"ftp://x\"\n", {}, "base_url"),
    ("[coze.accounts.studio]\napi_token = \"a\"\ntoken = \"b\"\n", {}, "unknown key(s) token"),
    ("[coze]\naccounts = 3\n", {}, "[coze.accounts] must be a table"),
    ("[coze]\nworkflow = \"x\"\n", {}, "[coze] has unknown keys: workflow"),
])
def test_bad_pipeline_settings_are_one_clear_error(tmp_path, toml, env, needle):
    with pytest.raises(SettingsError) as err:
        settings(tmp_path, toml, **env)
    assert needle in str(err.value)
    assert "pat_" not in str(err.value)


def test_an_account_token_never_reaches_an_error_or_a_repr(tmp_path):
    s = settings(tmp_path, "[coze.accounts.studio]\napi_token = \"pat_secret_in_file\"\n" + NEWS)
    assert "pat_secret_in_file" not in repr(s.account("studio")) + repr(s)


# --- the chat parser with pipeline names -------------------------------------------------------

WORDS = {"drama": "drama", "短剧": "drama", "news": "news"}


@pytest.mark.parametrize("text, expected", [
    ("run drama", Command("run", pipeline="drama")),
    ("运行 短剧", Command("run", pipeline="drama")),
    ("/run NEWS --limit 3", Command("run", pipeline="news", limit=3)),
    ("run --include a,b", Command("run", include=("a", "b"))),
    ("status news", Command("status", pipeline="news")),
    ("status b12345678", Command("status", batch_id="b12345678")),
    ("report drama --date 2025-01-02", Command("report", pipeline="drama", date="2025-01-02")),
    ("report 2025-01-02", Command("report", date="2025-01-02")),
    ("errors news --limit 5", Command("errors", pipeline="news", limit=5)),
])
def test_commands_take_a_pipeline_name_or_alias(text, expected):
    assert parse(text, WORDS) == expected


def test_run_with_an_unknown_name_lists_the_pipelines():
    err = parse("run sports", WORDS)
    assert isinstance(err, ParseError) and err.code == "unknown_pipeline"
    assert "drama, news" in err.message("en") and "sports" in err.message("en")
    # without a pipeline table nothing is a pipeline name (the single-pipeline grammar)
    assert parse("run drama").code == "unexpected"


names = st.text("abcdefghijklmnopqrstuvwxyz0123456789_-", min_size=1, max_size=12).map(
    lambda s: "p" + s)
aliases = st.text(st.characters(whitelist_categories=("Lo", "Ll", "Lu", "Nd")), min_size=1,
                  max_size=8).filter(lambda a: a.lower() not in ALIASES)


@given(st.dictionaries(names, st.lists(aliases, max_size=2), min_size=1, max_size=4),
       st.data())
def test_any_name_or_alias_picks_its_pipeline_and_round_trips(table, data):
    words: dict[str, str] = {}
    for name, alias_list in table.items():
        for word in (name, *alias_list):
            words.setdefault(word.lower(), name)
    word = data.draw(st.sampled_from(sorted(words)))
    limit = data.draw(st.none() | st.integers(1, 99))
    text = f"run {word}" + (f" --limit {limit}" if limit else "")
    cmd = parse(text, words)
    assert cmd == Command("run", pipeline=words[word], limit=limit)
    assert parse(cmd.to_text(), words) == cmd


def test_the_handlers_table_has_every_name_and_alias(tmp_path):
    s = settings(tmp_path, ACCOUNTS + DRAMA + NEWS, COZE_TOKEN_STUDIO="t")
    assert pipeline_words(s) == {"drama": "drama", "短剧": "drama", "juchang": "drama",
                                 "news": "news"}

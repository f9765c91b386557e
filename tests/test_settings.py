"""Settings: built from env and TOML, validated with one clear error, secrets never shown."""
from __future__ import annotations

import logging

import pytest

from bot.logs import JsonFormatter, redact, register_settings_secrets
from bot.settings import Secret, SettingsError, load_settings


def test_defaults_match_the_contract():
    s = load_settings({})
    assert s.feishu.domain == "https://open.feishu.cn"
    assert s.coze.base_url == "https://api.coze.cn"
    assert str(s.db_path) == "var/opsbot.db"
    assert s.timezone == "Asia/Shanghai"
    assert s.pipeline.max_coze == 16 and s.pipeline.max_synthesis == 4
    assert s.pipeline.breaker.failure_threshold == 5
    assert s.pipeline.breaker.open_seconds == 60 and s.pipeline.breaker.success_threshold == 3
    assert s.alerts.report_time == "09:00"
    assert not s.feishu.configured and not s.coze.configured


def test_env_wins_over_the_toml_file(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text('[feishu]\napp_id = "cli_toml"\nalert_chat_id = "oc_toml"\n'
                   '[pipeline]\nmax_coze = 8\n[pipeline.poll]\nmaximum = 5\n'
                   '[[pipeline.rules]]\nname = "mine"\naction = "fail"\ncodes = ["123"]\n',
                   encoding="utf-8")
    s = load_settings({"OPSBOT_CONFIG": str(cfg), "FEISHU_APP_ID": "cli_env"})
    assert s.feishu.app_id == "cli_env"
    assert s.feishu.alert_chat_id == "oc_toml"
    assert s.pipeline.max_coze == 8
    assert s.pipeline.poll.maximum == 5.0
    assert [r.name for r in s.pipeline.rules] == ["mine"]


@pytest.mark.parametrize("env, needle", [
    ({"FEISHU_DOMAIN": "open.feishu.cn"}, "FEISHU_DOMAIN"),
    ({"COZE_BASE_URL": "ftp://x"}, "COZE_BASE_URL"),
    ({"OPSBOT_TIMEZONE": "Mars/Olympus"}, "OPSBOT_TIMEZONE"),
    ({"FEISHU_ADMIN_IDS": "ou_1, bad id!"}, "FEISHU_ADMIN_IDS"),
    ({"OPSBOT_LANGUAGE": "fr"}, "OPSBOT_LANGUAGE"),
    ({"OPSBOT_CONFIG": "/nonexistent/opsbot.toml"}, "does not exist"),
])
def test_a_bad_value_is_one_clear_error_naming_the_variable(env, needle):
    with pytest.raises(SettingsError) as err:
        load_settings(env)
    assert needle in str(err.value)


def test_encrypt_key_without_verification_token_is_refused():
    with pytest.raises(SettingsError) as err:
        load_settings({"FEISHU_ENCRYPT_KEY": "enc-key-value"})
    assert "FEISHU_VERIFICATION_TOKEN" in str(err.value)
    s = load_settings({"FEISHU_ENCRYPT_KEY": "enc-key-value", "FEISHU_VERIFICATION_TOKEN": "v"})
    assert s.feishu.encrypt_key and s.feishu.verification_token


@pytest.mark.parametrize("toml, needle", [
    ("[pipeline]\nmax_coze = 0\n", "max_coze"),
    ("[pipeline]\nmax_coze = \"many\"\n", "max_coze"),
    ("[pipeline]\nbogus = 1\n", "unknown key 'bogus'"),
    ("[alerts]\nreport_time = \"9am\"\n", "report_time"),
    ("[[pipeline.rules]]\naction = \"explode\"\n", "action"),
    ("[feishu]\nnot_a_key = 1\n", "unknown keys"),
    ("this is = not toml [", "not valid TOML"),
])
def test_a_bad_toml_file_is_one_clear_error(tmp_path, toml, needle):
    cfg = tmp_path / "c.toml"
    cfg.write_text(toml, encoding="utf-8")
    with pytest.raises(SettingsError) as err:
        load_settings({"OPSBOT_CONFIG": str(cfg)})
    assert needle in str(err.value)


def test_secrets_never_show_in_repr_or_logs(caplog):
    env = {"FEISHU_APP_ID": "cli_1", "FEISHU_APP_SECRET": "s3cr3t-app-secret",
           "FEISHU_ENCRYPT_KEY": "enc-key-value", "COZE_API_TOKEN": "pat_abcdefgh12345",
           "FEISHU_VERIFICATION_TOKEN": "verif-token-xyz"}
    s = load_settings(env)
    text = repr(s)
    for secret in env.values():
        if secret != "cli_1":
            assert secret not in text
    assert s.coze.api_token.get() == "pat_abcdefgh12345"
    assert Secret("x") == Secret("x") and not Secret("")
    register_settings_secrets(s)
    record = logging.makeLogRecord({"msg": "calling with pat_abcdefgh12345 and %s",
                                    "args": ("s3cr3t-app-secret",), "levelname": "INFO"})
    line = JsonFormatter().format(record)
    assert "pat_abcdefgh12345" not in line and "s3cr3t-app-secret" not in line
    assert "***" in line


@pytest.mark.parametrize("text", [
    "Authorization: Bearer pat_live_0123456789",
    '{"tenant_access_token": "t-g1044ghJRUIJJ5ELPPXXXXXX"}',
    "app_secret=abcd1234efgh",
])
def test_credential_shapes_are_redacted_even_when_unregistered(text):
    out = redact(text)
    assert "0123456789" not in out and "g1044ghJRUIJJ5ELPPXXXXXX" not in out
    assert "abcd1234efgh" not in out


def test_the_synthesis_table_is_read_checked_and_its_mapping_validated(tmp_path):
    import pytest as _pytest

    from bot.settings import SettingsError, load_settings
    toml = tmp_path / "c.toml"
    toml.write_text('[pipeline.synthesis]\nwidth = 720\nheight = 1280\nsubtitles = "off"\n'
                    'music_volume = 0.05\n[pipeline.synthesis.mapping]\n'
                    'images = "data.scenes[].pic"\n[pipeline.synthesis.jianying_path_map]\n'
                    '"/srv/drafts" = "D:/Drafts"\n', encoding="utf-8")
    s = load_settings({"OPSBOT_CONFIG": str(toml)})
    syn = s.pipeline.synthesis
    assert (syn.width, syn.height, syn.subtitles, syn.music_volume) == (720, 1280, "off", 0.05)
    assert syn.mapping == {"images": "data.scenes[].pic"}
    assert syn.jianying_path_map == {"/srv/drafts": "D:/Drafts"}
    for bad, needle in [({"width": 721}, "width must be an even number"),
                        ({"preset": "turbo"}, "preset must be an x264 preset"),
                        ({"subtitle_color": "white"}, "#RRGGBB"),
                        ({"mode": "movie"}, "mode must be one of auto, video, manifest"),
                        ({"mapping": {"pictures": "a"}}, "keys among images"),
                        ({"colour": 1}, "unknown key 'colour'")]:
        with _pytest.raises(SettingsError, match=needle):
            load_settings({}, overrides={"pipeline.synthesis": bad})

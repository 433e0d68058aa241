from __future__ import annotations

from pathlib import Path

import pytest

from secretsd.errors import ConfigError
from secretsd.runtime.config import load_settings


def test_precedence_file_then_env_then_flags(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "c.toml"
    config.write_text('listen = "127.0.0.1:1111"\nmax_versions = 4\ntoken_cache_seconds = 1\n'
                      '[key_provider]\nkind = "file"\npath = "/keys/k.json"\n')
    s = load_settings(config)
    assert s.listen == "127.0.0.1:1111" and s.max_versions == 4
    assert s.key_provider.options() == {"kind": "file", "path": "/keys/k.json"}
    monkeypatch.setenv("SECRETSD_MAX_VERSIONS", "7")
    monkeypatch.setenv("SECRETSD_KEY_PROVIDER__PATH", "/other.json")
    s = load_settings(config)
    assert s.max_versions == 7 and s.key_provider.options()["path"] == "/other.json"
    assert s.token_cache_seconds == 1
    s = load_settings(config, listen="127.0.0.1:2222", max_versions=None)
    assert s.listen == "127.0.0.1:2222" and s.max_versions == 7


def test_config_from_env_variable_and_relative_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "etc" / "c.toml"
    config.parent.mkdir()
    config.write_text('data_dir = "../var"\npolicy_file = "policies.toml"\n')
    monkeypatch.setenv("SECRETSD_CONFIG", str(config))
    s = load_settings()
    assert s.data_dir == (tmp_path / "var").resolve()
    assert s.policy_file == config.parent / "policies.toml"


@pytest.mark.parametrize(("text", "message"), [
    ("listen = 'nowhere'\n", "listen"),
    ("max_versions = 0\n", "max_versions"),
    ("log_format = 'xml'\n", "log_format"),
    ("typo_setting = 1\n", "unknown setting"),
    ("not toml [", "not valid TOML"),
])
def test_invalid_config_is_one_clear_error(tmp_path: Path, text: str, message: str) -> None:
    config = tmp_path / "c.toml"
    config.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_settings(config)


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "absent.toml")


def test_validation_error_never_echoes_the_value(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text("max_versions = 'hunter2-secret'\n")
    with pytest.raises(ConfigError) as info:
        load_settings(config)
    assert "hunter2" not in str(info.value)

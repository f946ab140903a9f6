"""load_settings: overrides > BACKFILL_* environment > TOML file > defaults."""

from __future__ import annotations

from pathlib import Path

import pytest

from backfill.config import BackendSettings, Settings, config_warnings, load_settings, parse_duration_s
from backfill.errors import ConfigError


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    path = tmp_path / "backfill.toml"
    path.write_text(
        """
port = 9001
poll_interval_s = 0.25
max_lines = 1000
completion_windows = ["24h", "2h"]

[[backends]]
name = "vllm-a"
url = "http://10.0.0.5:8000/v1/"
models = ["llama", "qwen"]
max_concurrency = 8
"""
    )
    return path


def test_defaults_apply_without_file_or_environment() -> None:
    settings = load_settings()

    assert 8080 == settings.port
    assert 50_000 == settings.max_lines
    assert ["1h", "24h", "7d"] == settings.completion_windows
    assert [] == settings.backends


def test_file_values_override_defaults(config_file: Path) -> None:
    settings = load_settings(config_file)

    assert 9001 == settings.port
    assert 0.25 == settings.poll_interval_s
    assert 1000 == settings.max_lines
    assert ["24h", "2h"] == settings.completion_windows
    backend = BackendSettings(name="vllm-a", url="http://10.0.0.5:8000/v1", models=["llama", "qwen"], max_concurrency=8)
    assert [backend] == settings.backends


def test_environment_overrides_the_file(config_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BACKFILL_PORT", "9002")
    monkeypatch.setenv("BACKFILL_COMPLETION_WINDOWS", '["24h"]')

    settings = load_settings(config_file)

    assert 9002 == settings.port
    assert ["24h"] == settings.completion_windows
    assert 1000 == settings.max_lines  # still from the file


def test_overrides_beat_environment_and_file(config_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BACKFILL_PORT", "9002")
    monkeypatch.setenv("BACKFILL_MAX_LINES", "77")

    settings = load_settings(config_file, port=9003, max_lines=None)

    assert 9003 == settings.port
    assert 77 == settings.max_lines  # a None override is ignored


def test_config_file_may_come_from_backfill_config(config_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BACKFILL_CONFIG", str(config_file))

    assert 9001 == load_settings().port


def test_explicit_config_file_wins_over_backfill_config(
    config_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    other = tmp_path / "other.toml"
    other.write_text("port = 1234\n")
    monkeypatch.setenv("BACKFILL_CONFIG", str(other))

    assert 9001 == load_settings(config_file).port


def test_broken_toml_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("port = = 3\n")

    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings(path)


def test_missing_config_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_settings(tmp_path / "missing.toml")


@pytest.mark.parametrize(
    "toml",
    [
        "port = 70000\n",
        'port = "eighty"\n',
        "no_such_setting = 1\n",
        "poll_interval_s = 0\n",
        'completion_windows = ["1h", "7d"]\n',
        'completion_windows = ["24h", "soon"]\n',
        '[[backends]]\nname = "a"\nurl = "10.0.0.5:8000"\nmodels = ["m"]\n',
        '[[backends]]\nname = "a"\nurl = "http://x"\nmodels = ["m"]\nmax_concurrency = 0\n',
    ],
    ids=[
        "port-range",
        "port-type",
        "unknown-key",
        "zero-poll",
        "no-24h",
        "bad-window",
        "url-scheme",
        "zero-concurrency",
    ],
)
def test_invalid_values_are_config_errors(toml: str, tmp_path: Path) -> None:
    path = tmp_path / "backfill.toml"
    path.write_text(toml)

    with pytest.raises(ConfigError, match="invalid settings"):
        load_settings(path)


def test_a_harvest_band_upside_down_is_refused_with_both_values(tmp_path: Path) -> None:
    path = tmp_path / "backfill.toml"
    path.write_text(
        '[[backends]]\nname = "a"\nurl = "http://127.0.0.1:8000/v1"\nmodels = ["m"]\n'
        "harvest = true\nharvest_target = 0.5\nharvest_fill_below = 0.6\n"
    )

    with pytest.raises(ConfigError, match=r"harvest_fill_below \(0.6\) must be below harvest_target \(0.5\)"):
        load_settings(path)


def test_invalid_environment_value_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BACKFILL_COMPLETION_WINDOWS", '["1h"]')

    with pytest.raises(ConfigError, match="24h"):
        load_settings()


def test_completion_window_seconds_only_for_accepted_windows() -> None:
    settings = Settings(completion_windows=["24h", "90m"])

    assert 86_400 == settings.window_s("24h")
    assert 5_400 == settings.window_s("90m")
    assert settings.window_s("7d") is None


@pytest.mark.parametrize(("text", "seconds"), [("45s", 45), ("2m", 120), ("1h", 3600), ("7d", 604_800)])
def test_durations_parse(text: str, seconds: int) -> None:
    assert seconds == parse_duration_s(text)


@pytest.mark.parametrize("text", ["", "24", "h", "0h", "1.5h", "-1h", "1w", " 1h"])
def test_bad_durations_are_rejected(text: str) -> None:
    with pytest.raises(ValueError, match="not a duration"):
        parse_duration_s(text)


def test_default_database_is_sqlite_in_the_data_dir(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path)

    assert f"sqlite:///{tmp_path.resolve() / 'backfill.db'}" == settings.effective_database_url
    assert tmp_path / "blobs" == settings.blob_dir


def test_backend_api_key_is_read_from_the_named_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("UPSTREAM_TEST_KEY", "sk-secret")

    backend = BackendSettings(name="a", url="http://x", models=["m"], api_key_env="UPSTREAM_TEST_KEY")

    assert "sk-secret" == backend.api_key()
    assert BackendSettings(name="a", url="http://x", models=["m"]).api_key() is None


# --- mistakes named with their fix (issue 20) -----------------------------------------------------------------


def _error_of(path: Path, text: str) -> str:
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_settings(path)
    return caught.value.message


def test_an_unknown_top_level_key_is_named_with_the_file_and_a_did_you_mean(tmp_path: Path) -> None:
    path = tmp_path / "backfill.toml"

    message = _error_of(path, "prot = 9000\n")

    assert f"{path}: unknown key 'prot'; did you mean 'port'?" in message


def test_a_typo_inside_backends_is_named_not_reported_as_a_missing_field_only(tmp_path: Path) -> None:
    message = _error_of(
        tmp_path / "backfill.toml",
        '[[backends]]\nname = "a"\nurll = "http://127.0.0.1:8000"\nmodels = ["m"]\nmax_concurency = 4\n',
    )

    assert "unknown key 'backends[0].urll'; did you mean 'url'?" in message
    assert "unknown key 'backends[0].max_concurency'; did you mean 'max_concurrency'?" in message
    assert "'backends[0].url' is required but missing" in message


def test_an_unknown_key_deep_in_off_peak_windows_is_named(tmp_path: Path) -> None:
    message = _error_of(
        tmp_path / "backfill.toml",
        '[[off_peak]]\nmodel = "m"\nwindows = [{start = "22:00", end = "06:00", sahre = 1}]\n',
    )

    assert "unknown key 'off_peak[0].windows[0].sahre'; did you mean 'share'?" in message


def test_a_bad_value_names_its_key_the_value_and_the_rule(tmp_path: Path) -> None:
    message = _error_of(tmp_path / "backfill.toml", "max_lines = 0\n")

    assert "max_lines = 0: Input should be greater than or equal to 1" in message


@pytest.mark.parametrize("internal", ["_FromFile", "errors.pydantic.dev", "Value error,", "For further information"])
def test_no_pydantic_internals_reach_the_user(internal: str, tmp_path: Path) -> None:
    message = _error_of(
        tmp_path / "backfill.toml",
        'max_lines = 0\nprot = 1\n[[backends]]\nname = "a"\nurl = "ftp://x"\nmodels = ["m"]\n',
    )

    assert internal not in message


def test_a_bad_environment_value_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BACKFILL_MAX_LINES", "-1")

    with pytest.raises(ConfigError) as caught:
        load_settings()

    assert "environment variable BACKFILL_MAX_LINES: max_lines = '-1'" in caught.value.message


def test_a_bad_option_names_the_option() -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(port=70000)

    assert "option --port: port = 70000" in caught.value.message


def test_misspelt_variables_are_warned_about_with_the_one_meant() -> None:
    warnings = config_warnings({"BACKFILL_PORTT": "1", "BACKFILL_PORT": "2", "BACKFILL_BASE_URL": "x", "HOME": "/"})

    assert [
        "environment variable BACKFILL_PORTT is not a backfill setting and is ignored; did you mean BACKFILL_PORT?"
    ] == warnings

"""Settings: environment, YAML file, precedence, masked secrets, and `raycord config`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bot.cli import main
from bot.config import BOT_CONTEXT_COMMIT_DELAY, Settings


def test_environment_overrides_yaml_and_yaml_overrides_defaults(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = tmp_path / "raycord.yaml"
    cfg.write_text("cache:\n  max_entries: 7\n  shards: 3\nllm:\n  model: from-yaml\n")
    monkeypatch.setenv("RAYCORD_CACHE__MAX_ENTRIES", "9")
    settings = Settings.load(cfg)
    assert settings.cache.max_entries == 9
    assert settings.cache.shards == 3
    assert settings.llm.model == "from-yaml"
    assert settings.context.max_turns == 20


def test_the_bot_lets_context_commits_wait_unless_told_otherwise(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the bot's context writes are sent after the reply, so its store gathers them; a
    # config that sets other context fields keeps that, and one that sets the delay wins
    assert Settings().context.commit_delay_seconds == BOT_CONTEXT_COMMIT_DELAY > 0
    cfg = tmp_path / "raycord.yaml"
    cfg.write_text("context:\n  max_turns: 7\n")
    assert Settings.load(cfg).context.commit_delay_seconds == BOT_CONTEXT_COMMIT_DELAY
    monkeypatch.setenv("RAYCORD_CONTEXT__COMMIT_DELAY_SECONDS", "0")
    loaded = Settings.load(cfg)
    assert (loaded.context.max_turns, loaded.context.commit_delay_seconds) == (7, 0.0)


def test_secrets_come_from_their_usual_variables_and_print_masked(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("GEMINI_API_KEY", "gm-secret-123")
    monkeypatch.setenv("DISCORD_TOKEN", "dc-secret-456")
    settings = Settings.load()
    assert settings.gemini_api_key is not None
    assert settings.gemini_api_key.get_secret_value() == "gm-secret-123"
    assert "gm-secret-123" not in repr(settings)
    assert main(["config"]) == 0
    out = capsys.readouterr().out
    assert "gm-secret-123" not in out and "dc-secret-456" not in out
    data = json.loads(out)
    assert data["gemini_api_key"] == "**********"
    assert data["discord_token"] == "**********"


def test_a_bad_setting_is_a_clear_error(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("RAYCORD_CACHE__MAX_ENTRIES", "-1")
    assert main(["config"]) == 2
    assert "cache.max_entries" in capsys.readouterr().err


def test_a_missing_config_file_is_a_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "--config", "/nonexistent/raycord.yaml"]) == 2
    assert "config file not found" in capsys.readouterr().err


def test_the_llm_backend_is_offline_without_a_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GEMINI_API_KEY", raising=False)
    monkeypatch.delenv("GOOGLE_API_KEY", raising=False)
    assert Settings.load().llm_backend() == "offline"
    monkeypatch.setenv("GOOGLE_API_KEY", "k")
    assert Settings.load().llm_backend() == "gemini"

"""The Discord section of the settings: the API base from the environment, shards checked."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from bot.config import DiscordSettings, Settings


def test_the_api_base_and_shards_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RAYCORD_DISCORD__API_BASE_URL", "http://127.0.0.1:8766")
    monkeypatch.setenv("RAYCORD_DISCORD__SHARD_COUNT", "2")
    monkeypatch.setenv("RAYCORD_DISCORD__SHARD_IDS", "[1]")
    discord = Settings().discord
    assert discord.api_base_url == "http://127.0.0.1:8766"
    assert (discord.shard_count, discord.shard_ids) == (2, [1])
    assert discord.auto_thread is False


def test_shard_ids_need_a_shard_count_and_must_fit_in_it() -> None:
    with pytest.raises(ValidationError, match=r"needs discord\.shard_count"):
        DiscordSettings(shard_ids=[0])
    with pytest.raises(ValidationError, match=r"\[2\] are outside 0\.\.1"):
        DiscordSettings(shard_count=2, shard_ids=[0, 2])

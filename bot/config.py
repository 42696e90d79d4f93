"""One `Settings` for the whole bot: environment (`RAYCORD_*`), an optional YAML file, defaults.

Precedence, highest first: explicit overrides (CLI flags), environment, YAML file,
defaults. Secrets are `SecretStr` and print masked.
"""

from __future__ import annotations

import contextvars
import json
from pathlib import Path
from typing import Any, Literal

from pydantic import AliasChoices, BaseModel, Field, SecretStr, field_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

from actors.analytics import AnalyticsConfig
from actors.cache import CacheConfig
from actors.context import ContextConfig
from actors.ratelimit import RateLimitConfig
from storage.postgres import PgTarget

_yaml_file: contextvars.ContextVar[Path | None] = contextvars.ContextVar("yaml_file", default=None)


class LLMSettings(BaseModel):
    #: "auto" uses Gemini when an API key is set and the offline responder otherwise
    backend: Literal["auto", "gemini", "offline"] = "auto"
    model: str = "gemini-2.5-flash"
    base_url: str | None = None
    temperature: float = Field(default=0.7, ge=0, le=2)
    max_output_tokens: int = Field(default=1024, ge=1)
    max_concurrency: int = Field(default=16, ge=1)
    #: child processes running the SDK (each with one client); its CPU stays off the bot's loop
    sdk_processes: int = Field(default=1, ge=1, le=16)
    #: total deadline of one request: queueing, every attempt and the waits between them
    timeout_seconds: float = Field(default=60.0, gt=0)
    api_version: str = "v1beta"
    #: one attempt's limit (for a stream: until the first chunk, and between chunks)
    attempt_timeout_seconds: float = Field(default=30.0, gt=0)
    #: attempts per request, the first included; 429, 5xx and timeouts are retried
    max_attempts: int = Field(default=4, ge=1)
    backoff_base_seconds: float = Field(default=0.5, gt=0)
    backoff_max_seconds: float = Field(default=8.0, gt=0)
    #: consecutive upstream failures that open the circuit breaker
    breaker_threshold: int = Field(default=5, ge=1)
    breaker_cooldown_seconds: float = Field(default=30.0, gt=0)
    max_images: int = Field(default=4, ge=0)
    max_image_bytes: int = Field(default=7 * 1024 * 1024, ge=1)


class PipelineSettings(BaseModel):
    max_message_chars: int = Field(default=4000, ge=1)
    system_prompt: str = (
        "You are raycord, a helpful and concise assistant in a Discord server. "
        "Answer in Markdown suited to Discord."
    )
    #: bump when the system prompt changes meaningfully, so old cached replies are not served
    system_prompt_version: str = "1"


class DiscordSettings(BaseModel):
    answer_dms: bool = True
    admin_user_ids: list[str] = Field(default_factory=list)
    #: empty allow lists allow everything; block lists always win
    allow_servers: list[str] = Field(default_factory=list)
    block_servers: list[str] = Field(default_factory=list)
    allow_channels: list[str] = Field(default_factory=list)
    block_channels: list[str] = Field(default_factory=list)
    allow_roles: list[str] = Field(default_factory=list)
    block_roles: list[str] = Field(default_factory=list)
    allow_users: list[str] = Field(default_factory=list)
    block_users: list[str] = Field(default_factory=list)
    #: least time between two edits of a streamed reply in one channel
    edit_interval_seconds: float = Field(default=1.0, ge=0)
    max_image_bytes: int = Field(default=8 * 1024 * 1024, ge=1)


class StatusSettings(BaseModel):
    """`raycord status`: how often it refreshes and when a figure turns into an alert."""

    refresh_seconds: float = Field(default=2.0, gt=0)
    #: p95 latency and error rate are computed over the analytics events of this window
    window_seconds: float = Field(default=300.0, gt=0)
    p95_latency_ms_alert: float = Field(default=5_000.0, gt=0)
    #: resident memory of any one service process
    memory_mb_alert: float = Field(default=2_048.0, gt=0)
    #: share of answered-or-failed messages that failed (rate-limit denials are not errors)
    error_rate_alert: float = Field(default=0.05, ge=0, le=1)


#: how long the bot's context store lets a commit wait for more writers. The bot sends
#: its context writes after the reply, in the background, and resends any that fail, so
#: no user waits on them; a reset or forget commits at once. Against the load test's 100
#: users this cuts the context store's fsyncs from ~5 to ~2 a second.
BOT_CONTEXT_COMMIT_DELAY = 0.5


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="RAYCORD_",
        env_nested_delimiter="__",
        extra="forbid",
        populate_by_name=True,
        # a rejected value may be a secret (a token, a state URL with a password in it)
        hide_input_in_errors=True,
    )

    state_dir: Path = Path(".raycord")
    #: `postgresql://user@host:port/db`: the context store and the rate limiter keep their
    #: state there instead of SQLite files in `state_dir` (analytics stays in DuckDB)
    state_url: str | None = None
    #: the state database's password; None leaves it to libpq's `.pgpass` (or none)
    state_password: SecretStr | None = None
    #: Ray address to connect to; None starts an embedded Ray
    ray_address: str | None = None
    namespace: str = "raycord"
    dashboard: bool = True
    dashboard_port: int = 8265
    log_level: str = "INFO"

    discord_token: SecretStr | None = Field(
        default=None, validation_alias=AliasChoices("discord_token", "DISCORD_TOKEN", "RAYCORD_DISCORD_TOKEN")
    )
    gemini_api_key: SecretStr | None = Field(
        default=None,
        validation_alias=AliasChoices(
            "gemini_api_key", "GEMINI_API_KEY", "GOOGLE_API_KEY", "RAYCORD_GEMINI_API_KEY"
        ),
    )

    llm: LLMSettings = LLMSettings()
    pipeline: PipelineSettings = PipelineSettings()
    discord: DiscordSettings = DiscordSettings()
    cache: CacheConfig = CacheConfig()
    context: ContextConfig = ContextConfig(commit_delay_seconds=BOT_CONTEXT_COMMIT_DELAY)
    ratelimit: RateLimitConfig = RateLimitConfig()
    analytics: AnalyticsConfig = AnalyticsConfig()
    status: StatusSettings = StatusSettings()

    @field_validator("context", mode="before")
    @classmethod
    def _bot_context_commit_delay(cls, value: Any) -> Any:
        """A context section that leaves the commit delay out gets the bot's, not the store's."""
        if isinstance(value, dict) and "commit_delay_seconds" not in value:
            return {**value, "commit_delay_seconds": BOT_CONTEXT_COMMIT_DELAY}
        return value

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        yaml_file = _yaml_file.get()
        if yaml_file is not None:
            sources.append(YamlConfigSettingsSource(settings_cls, yaml_file=yaml_file))
        return tuple(sources)

    @classmethod
    def load(cls, config_file: Path | None = None, **overrides: Any) -> Settings:
        """Settings from the environment and `config_file`, with `overrides` on top."""
        if config_file is not None and not config_file.is_file():
            raise FileNotFoundError(f"config file not found: {config_file}")
        token = _yaml_file.set(config_file)
        try:
            return cls(**{k: v for k, v in overrides.items() if v is not None})
        finally:
            _yaml_file.reset(token)

    @field_validator("state_url")
    @classmethod
    def _state_url_is_postgres(cls, value: str | None) -> str | None:
        if value is not None:
            # the message never holds the URL: it might hold a password
            PgTarget(value)
        return value

    def state_location(self) -> Path | PgTarget:
        """Where the stateful actors keep their state: the PostgreSQL database, or the
        state directory's SQLite files."""
        if self.state_url is None:
            return self.state_dir.resolve()
        password = self.state_password.get_secret_value() if self.state_password else None
        return PgTarget(self.state_url, password)

    def llm_backend(self) -> Literal["gemini", "offline"]:
        if self.llm.backend == "auto":
            return "gemini" if self.gemini_api_key or self.llm.base_url else "offline"
        return self.llm.backend

    def masked_json(self) -> str:
        """The effective configuration, secrets masked, as JSON."""
        data = self.model_dump(mode="json")
        for name in ("discord_token", "gemini_api_key", "state_password"):
            data[name] = "**********" if getattr(self, name) else None
        return json.dumps(data, indent=2, default=str)

"""One `Settings` for the whole bot: environment (`RAYCORD_*`), an optional YAML file, defaults.

Precedence, highest first: explicit overrides (CLI flags), environment, YAML file,
defaults. Secrets are `SecretStr` and print masked.
"""

from __future__ import annotations

import contextvars
import json
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    AliasChoices,
    BaseModel,
    Field,
    SecretStr,
    ValidationInfo,
    field_validator,
    model_validator,
)
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


class ModelQuota(BaseModel):
    """One model's quota with the API key; None is no limit on that dimension."""

    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    requests_per_day: int | None = None

    @field_validator("requests_per_minute", "tokens_per_minute", "requests_per_day")
    @classmethod
    def _positive(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is not None and value <= 0:
            raise ValueError(
                f"{info.field_name} must be a positive number (got {value}); "
                "leave it out for no limit, since a quota of zero would refuse every request"
            )
        return value


#: Gemini API quotas per model (requests/min, tokens/min, requests/day), as Google
#: publishes them for the free tier and paid tier 1; "default" covers unlisted models
QUOTA_PRESETS: dict[str, dict[str, ModelQuota]] = {
    "free": {
        "gemini-2.5-pro": ModelQuota(requests_per_minute=5, tokens_per_minute=250_000, requests_per_day=100),
        "gemini-2.5-flash": ModelQuota(
            requests_per_minute=10, tokens_per_minute=250_000, requests_per_day=250
        ),
        "gemini-2.5-flash-lite": ModelQuota(
            requests_per_minute=15, tokens_per_minute=250_000, requests_per_day=1_000
        ),
        "gemini-2.0-flash": ModelQuota(
            requests_per_minute=15, tokens_per_minute=1_000_000, requests_per_day=200
        ),
        "default": ModelQuota(requests_per_minute=10, tokens_per_minute=250_000, requests_per_day=250),
    },
    "tier1": {
        "gemini-2.5-pro": ModelQuota(
            requests_per_minute=150, tokens_per_minute=2_000_000, requests_per_day=10_000
        ),
        "gemini-2.5-flash": ModelQuota(
            requests_per_minute=1_000, tokens_per_minute=1_000_000, requests_per_day=10_000
        ),
        "gemini-2.5-flash-lite": ModelQuota(requests_per_minute=4_000, tokens_per_minute=4_000_000),
        "gemini-2.0-flash": ModelQuota(requests_per_minute=2_000, tokens_per_minute=4_000_000),
        "default": ModelQuota(
            requests_per_minute=1_000, tokens_per_minute=1_000_000, requests_per_day=10_000
        ),
    },
}


class ModelPrice(BaseModel):
    """US dollars per million tokens of one model, by kind."""

    input: float = Field(ge=0)
    #: prompt tokens served from Gemini's (implicit or explicit) cache
    cached_input: float = Field(ge=0)
    #: reply tokens, thinking included
    output: float = Field(ge=0)


#: Gemini API list prices (paid tier, prompts up to 200k tokens), per million tokens
DEFAULT_PRICES: dict[str, ModelPrice] = {
    "gemini-2.5-pro": ModelPrice(input=1.25, cached_input=0.31, output=10.0),
    "gemini-2.5-flash": ModelPrice(input=0.30, cached_input=0.075, output=2.50),
    "gemini-2.5-flash-lite": ModelPrice(input=0.10, cached_input=0.025, output=0.40),
    "gemini-2.0-flash": ModelPrice(input=0.10, cached_input=0.025, output=0.40),
}


class QuotaSettings(ModelQuota):
    """`llm.quota`: a preset, with the three numbers (env
    `RAYCORD_LLM__QUOTA__REQUESTS_PER_MINUTE` etc.) and `models` overriding it.

    The numbers given here apply to every model; `models` sets one model's. "auto" is
    the free tier against Google's API and no preset against a configured `base_url`
    (a fake server or a proxy, whose limits Google's presets do not describe).
    """

    preset: Literal["auto", "free", "tier1", "none"] = "auto"
    models: dict[str, ModelQuota] = Field(default_factory=dict)

    def for_model(self, model: str, *, google_api: bool) -> ModelQuota:
        """The quota that holds for `model`."""
        preset = self.preset
        if preset == "auto":
            preset = "free" if google_api else "none"
        table = QUOTA_PRESETS.get(preset, {})
        base = table.get(model, table.get("default", ModelQuota()))
        own = self.models.get(model, ModelQuota())

        def pick(name: str) -> int | None:
            for source in (own, self, base):
                value: int | None = getattr(source, name)
                if value is not None:
                    return value
            return None

        return ModelQuota(
            requests_per_minute=pick("requests_per_minute"),
            tokens_per_minute=pick("tokens_per_minute"),
            requests_per_day=pick("requests_per_day"),
        )


class LLMSettings(BaseModel):
    #: "auto" uses Gemini when an API key is set and the offline responder otherwise
    backend: Literal["auto", "gemini", "offline"] = "auto"
    model: str = "gemini-2.5-flash"
    #: tried in order when the model answers 429 (quota) or 503 (overloaded)
    fallback_models: list[str] = Field(default_factory=list)
    #: what a server may choose with /model (its choice persists in the context store)
    allowed_models: list[str] = Field(
        default_factory=lambda: ["gemini-2.5-flash", "gemini-2.5-flash-lite", "gemini-2.5-pro"]
    )
    base_url: str | None = None
    temperature: float = Field(default=0.7, ge=0, le=2)
    max_output_tokens: int = Field(default=1024, ge=1)
    #: upstream calls in flight at once, per gateway replica
    max_concurrency: int = Field(default=16, ge=1)
    quota: QuotaSettings = QuotaSettings()
    #: gateway actors; they split the quota between them
    replicas: int = Field(default=1, ge=1, le=16)
    #: a request the quota would keep waiting longer than this is answered "busy" at once
    max_queue_seconds: float = Field(default=30.0, gt=0)
    #: requests waiting in one gateway at most; more are answered "busy"
    max_queued: int = Field(default=1_000, ge=1)
    #: a streamed reply travels from the gateway in pieces at most this often...
    stream_interval_seconds: float = Field(default=0.1, ge=0)
    #: ...or as soon as this many characters are waiting
    stream_chunk_chars: int = Field(default=400, ge=1)
    #: estimated cost per model (a model not listed is counted at no cost)
    prices: dict[str, ModelPrice] = Field(default_factory=lambda: dict(DEFAULT_PRICES))
    #: ground replies in Google Search; the pages they drew on are listed under the reply
    google_search: bool = False
    #: tokens the model may think with (0 turns thinking off, -1 lets the model decide);
    #: unset leaves the model's default. Thoughts are never shown to users.
    thinking_budget: int | None = Field(default=None, ge=-1)
    #: the history sent is trimmed, oldest turns first, to fit this many prompt tokens
    #: (estimated, and calibrated per conversation from what the API counted last time)
    max_prompt_tokens: int = Field(default=32_000, ge=1)
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
    #: the attachment policy's limits (bot.attachments), for every front-end and the
    #: gateway alike: files per message, and bytes per image and per PDF. Gemini takes
    #: at most 20 MB of inline data per request, and base64 adds a third on the wire.
    max_attachments: int = Field(default=4, ge=0)
    max_image_bytes: int = Field(default=7 * 1024 * 1024, ge=1)
    max_pdf_bytes: int = Field(default=14 * 1024 * 1024, ge=1)


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
    #: the largest text attachment (UTF-8 text, code, Markdown, JSON, CSV) put into the prompt
    max_text_attachment_bytes: int = Field(default=100_000, ge=1)
    #: Discord's REST base (the gateway URL comes from its `/gateway/bot`); point it at
    #: `raycord fake-discord` to try the bot without Discord
    api_base_url: str = "https://discord.com"
    #: sync the command tree to these guilds instead of globally (guild commands appear
    #: at once, global ones can take a while: for development)
    sync_guild_ids: list[str] = Field(default_factory=list)
    #: slash commands left out of the tree (and so unregistered at the next sync)
    disabled_commands: list[str] = Field(default_factory=list)
    #: open a thread for each new conversation started in a channel
    auto_thread: bool = False
    #: gateway shards of the whole bot; None asks Discord for its recommendation
    shard_count: int | None = Field(default=None, ge=1)
    #: the shards this process runs (all of them when None); needs `shard_count`
    shard_ids: list[int] | None = None
    #: on a Ray cluster, run the front-end as this many actors (`raycord run --frontends N`),
    #: each over a contiguous block of the shards; None runs it in the `raycord run` process
    frontends: int | None = Field(default=None, ge=1)

    @model_validator(mode="after")
    def _shards_fit(self) -> DiscordSettings:
        if self.shard_ids is not None:
            if self.shard_count is None:
                raise ValueError("discord.shard_ids needs discord.shard_count")
            bad = [s for s in self.shard_ids if not 0 <= s < self.shard_count]
            if bad:
                raise ValueError(f"discord.shard_ids {bad} are outside 0..{self.shard_count - 1}")
        shards = self.shard_ids if self.shard_ids is not None else self.shard_count
        if self.frontends is not None and shards is not None:
            count = len(shards) if isinstance(shards, list) else shards
            if self.frontends > count:
                raise ValueError(
                    f"discord.frontends {self.frontends} is more than the {count} shard(s) to share "
                    "out: each front-end runs at least one shard (raise discord.shard_count)"
                )
        return self


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
#: no user waits on them; a reset or forget commits at once. Fewer, larger commits cost
#: the store's process less work per turn.
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
    #: on a cluster, the Ray resource of the node whose local disk holds `state_dir`: the
    #: actors keeping SQLite or DuckDB files there are pinned to it (the head by default;
    #: start that node with `ray start --resources '{"raycord_state": 1}'` to name another)
    state_resource: str = "node:__internal_head__"
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

    def with_discord(self, **changes: Any) -> Settings:
        """These settings with `changes` to the discord section, validated (`model_copy` is not)."""
        discord = DiscordSettings.model_validate({**self.discord.model_dump(), **changes})
        return self.model_copy(update={"discord": discord})

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

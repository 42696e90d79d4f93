"""Shared fixtures: one local Ray for the whole session, and a fresh raycord runtime per test;
one PostgreSQL server for the session, and the state backends a test can run against.

Each runtime gets its own namespace and state directory (or PostgreSQL database), so tests
never see each other's actors or files while sharing one Ray and one server.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
import ray

from actors.context import DAY, ContextConfig, ContextStore
from bench.pgserver import PgServer, pg_bin_dir
from bot.config import Settings
from bot.pipeline import ChatPipeline
from bot.runtime import Runtime, init_ray
from storage.postgres import PgTarget


class FakeClock:
    """An injected clock that tests move by hand."""

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture(scope="session")
def ray_session() -> Iterator[None]:
    """One local Ray for the session: 2 CPUs, no dashboard.

    Ray gives its raylet a fixed 30 s to register; on a loaded 2-core machine that can
    pass, so a timed-out start is retried (the start is a precondition, not a test)."""
    for attempt in range(3):
        try:
            init_ray(Settings(dashboard=False), num_cpus=2, include_dashboard=False)
            break
        except Exception as exc:
            ray.shutdown()
            if attempt == 2 or "timed out during startup" not in str(exc):
                raise
    yield
    ray.shutdown()


def make_settings(tmp_path: Path, **overrides: Any) -> Settings:
    """Settings isolated from the environment and from other tests."""
    base: dict[str, Any] = {
        "state_dir": tmp_path / "state",
        "namespace": f"test-{uuid.uuid4().hex[:10]}",
        "dashboard": False,
        "discord_token": None,
        "gemini_api_key": None,
    }
    base.update(overrides)
    return Settings(**base)


@pytest_asyncio.fixture(scope="session")
async def runtime(ray_session: None, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Runtime]:
    """One raycord runtime on default settings, shared by the session (actors start in
    seconds here, not milliseconds). Tests keep apart by using their own `user`.
    A test that needs other settings or a fresh state starts its own `Runtime`."""
    rt = Runtime(make_settings(tmp_path_factory.mktemp("shared")))
    await rt.start()
    yield rt
    await rt.shutdown(kill_actors=True)


@pytest.fixture
def user() -> str:
    """A user id no other test uses."""
    return f"user-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def pipeline(runtime: Runtime) -> ChatPipeline:
    assert runtime.pipeline is not None
    return runtime.pipeline


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    """One PostgreSQL server for the session, in a temporary directory, stopped by its pid."""
    if pg_bin_dir() is None:
        pytest.skip("PostgreSQL is not installed (.ci/run installs Debian's postgresql)")
    server = PgServer()
    try:
        server.start()
        yield server
    finally:
        server.close()


@dataclass(frozen=True, slots=True)
class StateBackend:
    """Where a test's stores keep their state: an SQLite state directory, or a fresh
    PostgreSQL database of its own."""

    name: str
    location: Path | PgTarget

    def settings(self) -> dict[str, Any]:
        """`Settings` overrides that put the stateful actors on this backend."""
        if isinstance(self.location, PgTarget):
            return {"state_url": self.location.url, "state_password": self.location.password}
        return {}


#: run a test against both state backends (it takes the `backend` fixture)
both_backends = pytest.mark.parametrize("backend", ["sqlite", "postgres"], indirect=True)


@pytest_asyncio.fixture
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> StateBackend:
    """SQLite, unless the test is parametrized with `both_backends`."""
    name = getattr(request, "param", "sqlite")
    if name == "sqlite":
        return StateBackend(name, tmp_path / "state")
    server: PgServer = request.getfixturevalue("pg_server")
    return StateBackend(name, await server.create_database(f"t_{uuid.uuid4().hex[:16]}"))


MakeStore = Callable[..., ContextStore]


@pytest_asyncio.fixture
async def make_store(backend: StateBackend, clock: FakeClock) -> AsyncIterator[MakeStore]:
    """Opens ContextStores on the test's state backend and closes them all at the end."""
    opened: list[ContextStore] = []

    def make(**config: Any) -> ContextStore:
        store = ContextStore(ContextConfig(**config), backend.location, 0, clock=clock)
        # tests run `maintain()` themselves, at the moment they check
        store.maintenance_interval = 10 * DAY
        opened.append(store)
        return store

    yield make
    for store in opened:
        await store.close()

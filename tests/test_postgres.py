"""The PostgreSQL state backend under faults (the database down at start, restarted under
load, refusing the credentials, unreachable), and the schema migrations of both backends.

The fault tests stop and start a server of their own (one for the module), so the session
server the other tests share is never disturbed.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from actors.context import ContextConfig, ContextStore
from actors.errors import ServiceUnavailable
from actors.ratelimit import RateLimitConfig, RateLimiter, WindowLimits
from actors.schemas import Turn
from actors.state import StateOpener
from bench.pgserver import PgServer, pg_bin_dir
from bot.config import Settings
from bot.runtime import Runtime
from storage import context_db
from storage.migrations import Migration, SchemaTooNew, migrate_sqlite
from storage.postgres import PgDatabase, PgTarget, StateUnavailable
from tests.conftest import StateBackend, both_backends, make_settings

OPEN = WindowLimits(minute=1_000_000, hour=1_000_000, day=1_000_000)


@pytest.fixture(scope="module")
def own_server() -> Iterator[PgServer]:
    """A server these tests may stop and restart."""
    if pg_bin_dir() is None:
        pytest.skip("PostgreSQL is not installed (.ci/run installs Debian's postgresql)")
    server = PgServer()
    try:
        server.start()
        yield server
    finally:
        server.close()


async def fresh_database(server: PgServer) -> PgTarget:
    return await server.create_database(f"f_{uuid.uuid4().hex[:16]}")


def turn(text: str) -> Turn:
    return Turn(role="user", author="ada", text=text, time=1.0)


async def until_answered(call: object, attempts: int = 300) -> object:
    """Retry a call the way a user retries after "restarting, try again", until it answers."""
    for _ in range(attempts):
        try:
            return await call()  # type: ignore[operator]
        except ServiceUnavailable:
            await asyncio.sleep(0.1)
    raise AssertionError("the store never came back")


@pytest.mark.asyncio
async def test_with_the_database_down_at_start_the_bot_says_restarting_then_recovers(
    own_server: PgServer, ray_session: None, tmp_path: Path
) -> None:
    target = await fresh_database(own_server)
    own_server.stop()
    rt = Runtime(make_settings(tmp_path, state_url=target.url, state_password=target.password))
    try:
        # the actors start (and answer pings) although their database is down
        pipeline = await rt.start()
        with pytest.raises(ServiceUnavailable) as refused:
            await pipeline.handle({"text": "hello", "user_id": "ada", "scope": "chan"})
        assert "restarting" in refused.value.user_message() and "try again" in refused.value.user_message()
        assert f"127.0.0.1:{own_server.port}" in str(refused.value)
        assert target.password is not None and target.password not in str(refused.value)

        own_server.start()
        reply = await until_answered(
            lambda: pipeline.handle({"text": "hello", "user_id": "ada", "scope": "chan"})
        )
        await rt.flush()
        built = await pipeline.context.build("chan", "ada")
        assert [t[2] for t in built.turns] == ["hello", reply.text]  # type: ignore[attr-defined]
    finally:
        own_server.start()
        await rt.shutdown(kill_actors=True)


def test_the_open_is_retried_with_a_doubling_backoff_and_fails_fast_in_between(own_server: PgServer) -> None:
    own_server.stop()
    now = [0.0]
    target = own_server.target()
    try:
        opener = StateOpener(
            lambda: PgDatabase(target, "backoff_0", "backoff", ()),
            "test store",
            first_delay=1.0,
            max_delay=4.0,
            monotonic=lambda: now[0],
        )
        tried = []
        for t in (0.0, 0.5, 1.0, 2.0, 3.0, 7.0, 10.0, 11.0):
            now[0] = t
            with pytest.raises(ServiceUnavailable, match="waiting for its state"):
                opener.get()
            tried.append(opener.attempts)
        # attempts at 0, 1, 3, 7 and 11 (delays 1, 2, 4, then capped at 4); none in between
        assert tried == [1, 1, 2, 2, 3, 4, 4, 5]
        own_server.start()
        now[0] = 15.0
        opener.get().close()
        assert opener.attempts == 6
    finally:
        own_server.start()


@pytest.mark.asyncio
async def test_a_database_restart_mid_load_fails_in_flight_checks_and_loses_or_doubles_no_decision(
    own_server: PgServer,
) -> None:
    target = await fresh_database(own_server)
    config = RateLimitConfig(message=OPEN, commit_delay_ms=1.0)
    limiter = RateLimiter(config, target)
    allowed: dict[str, int] = {f"u{i}": 0 for i in range(10)}
    failures: list[BaseException] = []
    answered = 0
    before, after, stop = asyncio.Event(), asyncio.Event(), asyncio.Event()
    restarted = False

    async def checker(user: str) -> None:
        nonlocal answered
        while not stop.is_set():
            try:
                decision = await limiter.check(user)
            except ServiceUnavailable as exc:
                failures.append(exc)
                # a user told "try again" does so a moment later
                await asyncio.sleep(0.01)
                continue
            except BaseException:
                # any other outcome ends the test (the gather below raises it)
                before.set()
                after.set()
                raise
            assert decision.allowed
            allowed[user] += 1
            answered += 1
            if answered >= 200:
                before.set()
            if restarted and answered >= 400:
                after.set()

    checkers = [asyncio.create_task(checker(u)) for u in allowed for _ in range(3)]
    try:
        await before.wait()
        await asyncio.to_thread(own_server.stop)
        await asyncio.to_thread(own_server.start)
        restarted = True
        answered = 200
        await after.wait()
    finally:
        stop.set()
        await asyncio.gather(*checkers)
    # the checks in flight at the restart failed with the retryable error, and only those
    assert failures and all(isinstance(f, ServiceUnavailable) for f in failures)
    assert any("PostgreSQL state at" in str(f) for f in failures)

    def used(usage: list) -> int:  # type: ignore[type-arg]
        return next(u.used for u in usage if u.kind == "message" and u.window == "day")

    for user, count in allowed.items():
        assert used(await limiter.usage(user)) == count
    await limiter.flush()
    await limiter.close()
    # a restarted actor finds exactly the decisions it returned: none lost, none twice
    again = RateLimiter(config, target)
    try:
        for user, count in allowed.items():
            assert used(await again.usage(user)) == count
    finally:
        await again.close()


@pytest.mark.asyncio
async def test_wrong_credentials_give_a_clear_error_that_never_holds_the_secret(
    own_server: PgServer, caplog: pytest.LogCaptureFixture
) -> None:
    secret = "wrong-" + uuid.uuid4().hex
    with caplog.at_level(logging.DEBUG):
        store = ContextStore(ContextConfig(), PgTarget(own_server.url(), secret))
        try:
            with pytest.raises(ServiceUnavailable) as refused:
                await store.append("chan", "ada", [turn("hi")])
        finally:
            await store.close()
    message = str(refused.value)
    assert "password authentication failed" in message and f"127.0.0.1:{own_server.port}" in message
    assert (
        secret not in message
        and secret not in caplog.text
        and secret not in repr(PgTarget("postgresql://a@b/c", secret))
    )


def test_an_unreachable_host_gives_a_clear_error() -> None:
    # TEST-NET-1 (RFC 5737): routed nowhere, so the connection attempt times out or is refused
    target = PgTarget("postgresql://raycord@192.0.2.1:5432/raycord", "secret-never-shown")
    with pytest.raises(StateUnavailable, match=r"PostgreSQL state at 192\.0\.2\.1:5432/raycord") as failed:
        PgDatabase(target, "context_0", "context", context_db.MIGRATIONS, connect_timeout=1.0)
    assert "secret-never-shown" not in str(failed.value)


def test_the_state_password_is_masked_and_a_url_holding_one_is_refused_without_echo() -> None:
    settings = Settings(state_url="postgresql://bot@db:5432/raycord", state_password="hunter2-secret")
    assert "hunter2-secret" not in settings.masked_json() and "hunter2-secret" not in repr(settings)
    location = settings.state_location()
    assert isinstance(location, PgTarget) and location.password == "hunter2-secret"
    with pytest.raises(ValueError, match="must not hold a password") as refused:
        Settings(state_url="postgresql://bot:hunter2-secret@db/raycord")
    assert "hunter2-secret" not in str(refused.value)
    with pytest.raises(ValueError, match="postgresql://"):
        Settings(state_url="mysql://bot@db/raycord")


# --- migrations, both backends ---


@both_backends
@pytest.mark.asyncio
async def test_a_schema_newer_than_the_code_is_refused_with_a_clear_error(backend: StateBackend) -> None:
    store = ContextStore(ContextConfig(), backend.location)
    await store.append("chan", "ada", [turn("kept")])
    await store._db.write([("UPDATE schema_version SET version = 99 WHERE store = ?", ("context",))])
    await store.close()
    with pytest.raises(SchemaTooNew, match="schema version 99, newer than this raycord knows"):
        ContextStore(ContextConfig(), backend.location)


@pytest.mark.asyncio
async def test_a_new_migration_is_applied_once_on_both_backends_and_keeps_the_data(
    tmp_path: Path, pg_server: PgServer
) -> None:
    known = len(context_db.MIGRATIONS)
    extra = (
        *context_db.MIGRATIONS,
        Migration(
            known + 1,
            sqlite="CREATE TABLE reply_map (message TEXT PRIMARY KEY, key TEXT NOT NULL)",
            postgres="CREATE TABLE reply_map (message TEXT PRIMARY KEY, key TEXT NOT NULL)",
        ),
    )
    # SQLite: a file made before versioning (schema applied, no version table) is adopted
    path = tmp_path / "context-0.sqlite"
    conn = sqlite3.connect(path, isolation_level=None)
    for statement in context_db.MIGRATIONS[0].sqlite.split(";"):
        if statement.strip():
            conn.execute(statement)
    conn.execute("INSERT INTO conversations VALUES ('k', 's', 'u', 3, 1.0)")
    assert migrate_sqlite(conn, "context", context_db.MIGRATIONS, str(path)) == known
    assert migrate_sqlite(conn, "context", extra, str(path)) == known + 1
    assert migrate_sqlite(conn, "context", extra, str(path)) == known + 1  # applied once
    conn.execute("INSERT INTO reply_map VALUES ('m1', 'k')")
    assert conn.execute("SELECT version FROM conversations").fetchall() == [(3,)]
    conn.close()
    # PostgreSQL: the same list, the same outcome
    target = await pg_server.create_database(f"m_{uuid.uuid4().hex[:16]}")
    db = await asyncio.to_thread(PgDatabase, target, "context_0", "context", context_db.MIGRATIONS)
    db.execute([("INSERT INTO conversations VALUES ('k', 's', 'u', 3, 1.0)", ())])
    db.close()
    db = await asyncio.to_thread(PgDatabase, target, "context_0", "context", extra)
    try:
        db.execute([("INSERT INTO reply_map VALUES ('m1', 'k')", ())])
        assert db.read("SELECT version FROM schema_version") == [(known + 1,)]
        assert db.read("SELECT version FROM conversations") == [(3,)]
    finally:
        db.close()
    with pytest.raises(ValueError, match="out of order"):
        migrate_sqlite(sqlite3.connect(":memory:"), "x", (extra[-1],), ":memory:")


def test_with_a_state_url_only_the_context_store_and_the_rate_limiter_use_postgres(tmp_path: Path) -> None:
    from bot.runtime import SERVICES, state_location

    settings = make_settings(tmp_path, state_url="postgresql://bot@db:5432/raycord", state_password="pw")
    where = {spec.name: state_location(settings, spec) for spec in SERVICES}
    assert where["context"] == where["ratelimit"] == PgTarget("postgresql://bot@db:5432/raycord", "pw")
    assert where["cache"] == where["analytics"] == (tmp_path / "state").resolve()
    # without a state URL everything stays in the state directory
    plain = make_settings(tmp_path)
    assert {state_location(plain, spec) for spec in SERVICES} == {(tmp_path / "state").resolve()}

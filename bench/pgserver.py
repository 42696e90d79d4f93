"""A throwaway PostgreSQL server for the tests and the benchmarks: `initdb` into a temporary
directory, `postgres` on a free loopback port, stopped by its pid.

Debian's `postgresql` package puts the binaries in `/usr/lib/postgresql/<version>/bin`.
PostgreSQL refuses to run as root, so under root (CI) the server runs as the `postgres`
user the package creates. Connections over TCP need the password (scram-sha-256), so the
credential checks are real.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Any

import asyncpg

from storage.postgres import PgTarget

__all__ = ["PgServer", "StateBackends", "pg_bin_dir"]

#: how long the server may take to accept connections after it is started
START_TIMEOUT = 60.0


def pg_bin_dir() -> Path | None:
    """The newest installed PostgreSQL's binaries, or None when none is installed."""
    found = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/postgres"), key=lambda p: int(Path(p).parent.parent.name)
    )
    if found:
        return Path(found[-1]).parent
    on_path = shutil.which("postgres")
    return Path(on_path).resolve().parent if on_path else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PgServer:
    """One server in a fresh data directory. `start()` waits until it accepts connections;
    `stop()` shuts it down (fast mode) and waits for its pid; `start()` again restarts it
    on the same port and data, as a database restart does."""

    user = "raycord"

    def __init__(self, bin_dir: Path | None = None) -> None:
        found = bin_dir or pg_bin_dir()
        if found is None:
            raise FileNotFoundError("no PostgreSQL installed (Debian: apt-get install postgresql)")
        self.bin_dir = found
        self.password = secrets.token_urlsafe(16)
        self.port = _free_port()
        self.root = Path(tempfile.mkdtemp(prefix="raycord-pg-"))
        self.data = self.root / "data"
        self.log_path = self.root / "server.log"
        self.process: subprocess.Popen[bytes] | None = None
        self._run_as: dict[str, Any] = {}
        if os.geteuid() == 0:
            entry = pwd.getpwnam("postgres")
            os.chown(self.root, entry.pw_uid, entry.pw_gid)
            self._run_as = {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}
        self._initdb()

    def _initdb(self) -> None:
        pwfile = self.root / "pwfile"
        pwfile.write_text(self.password)
        if self._run_as:
            os.chown(pwfile, self._run_as["user"], self._run_as["group"])
        pwfile.chmod(0o600)
        try:
            subprocess.run(
                [
                    str(self.bin_dir / "initdb"),
                    "-D",
                    str(self.data),
                    "-U",
                    self.user,
                    f"--pwfile={pwfile}",
                    "--auth-local=trust",
                    "--auth-host=scram-sha-256",
                    "--no-locale",
                    "-E",
                    "UTF8",
                    # the server fsyncs its commits; only the template files skip it
                    "--no-sync",
                ],
                check=True,
                capture_output=True,
                cwd=self.root,
                **self._run_as,
            )
        finally:
            pwfile.unlink()

    def start(self) -> None:
        if self.process is not None:
            return
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [
                    str(self.bin_dir / "postgres"),
                    "-D",
                    str(self.data),
                    "-p",
                    str(self.port),
                    "-c",
                    "listen_addresses=127.0.0.1",
                    "-c",
                    f"unix_socket_directories={self.data}",
                    "-c",
                    "max_connections=200",
                    "-c",
                    "shared_buffers=32MB",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.root,
                **self._run_as,
            )
        self._wait_ready()

    def _wait_ready(self) -> None:
        """Poll `pg_isready` until the server accepts connections (nothing to await on)."""
        deadline = time.monotonic() + START_TIMEOUT
        assert self.process is not None
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"postgres exited with {self.process.returncode}: {self.log_tail()}")
            ready = subprocess.run(
                [str(self.bin_dir / "pg_isready"), "-q", "-h", "127.0.0.1", "-p", str(self.port)],
                check=False,
            )
            if ready.returncode == 0:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"postgres did not accept connections: {self.log_tail()}")
            time.sleep(0.05)

    def log_tail(self, lines: int = 20) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def stop(self, mode: signal.Signals = signal.SIGINT) -> None:
        """Shut the server down by its pid: SIGINT is PostgreSQL's fast shutdown (clients
        disconnected, committed work kept)."""
        if self.process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            self.process.send_signal(mode)
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process = None

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> PgServer:
        self.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def url(self, database: str = "postgres", user: str | None = None) -> str:
        return f"postgresql://{user or self.user}@127.0.0.1:{self.port}/{database}"

    def target(self, database: str = "postgres") -> PgTarget:
        return PgTarget(self.url(database), self.password)

    async def create_database(self, name: str) -> PgTarget:
        """A new empty database on this server, and where to find it."""
        if not name.replace("_", "").isalnum():
            raise ValueError(f"database names here are letters, digits and underscores, got {name!r}")
        conn = await asyncpg.connect(self.url(), password=self.password)
        try:
            await conn.execute(f'CREATE DATABASE "{name}"')
        finally:
            await conn.close()
        return self.target(name)


class StateBackends:
    """Fresh state locations for a benchmark, per backend: SQLite files under `workdir`,
    and PostgreSQL on loopback when it is installed (a server started for the run, and
    stopped by `close`). `skipped` says why a backend is missing."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.server: PgServer | None = None
        self.skipped: dict[str, str] = {}
        self.names = ["sqlite"]
        try:
            self.server = PgServer()
            self.server.start()
            self.names.append("postgres")
        except (FileNotFoundError, RuntimeError, TimeoutError, subprocess.CalledProcessError) as exc:
            self.skipped["postgres"] = f"{type(exc).__name__}: {exc}"
            if self.server is not None:
                self.server.close()
                self.server = None

    async def fresh(self, backend: str, label: str) -> Path | PgTarget:
        """A location nothing has written to yet, for `backend`."""
        if backend == "sqlite":
            return self.workdir / f"{label}-sqlite"
        assert self.server is not None, "PostgreSQL is not running"
        return await self.server.create_database(f"{label}_{secrets.token_hex(4)}")

    def close(self) -> None:
        if self.server is not None:
            self.server.close()
            self.server = None

    def __enter__(self) -> StateBackends:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

"""How a command finds the running bot: the Ray address it is given (--address,
RAY_ADDRESS) or the one `raycord run` records in its state directory.

Nothing answering there is an expected condition, so it is checked first and reported
in two lines saying where we looked and what to do; `ray.init` would retry for minutes.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
from dataclasses import asdict, dataclass
from pathlib import Path

import ray

from bot.config import Settings

__all__ = [
    "ADDRESS_FILE",
    "NoBotFound",
    "RecordedBot",
    "answers",
    "attach",
    "forget_bot",
    "locate",
    "record_bot",
    "recorded_bot",
]

#: written by `raycord run` into the state directory while its embedded Ray is up
ADDRESS_FILE = "ray-address.json"
#: seconds a TCP connection to the Ray address has to open before it counts as down
CONNECT_TIMEOUT = 2.0
#: what to do, shown under every "nothing is running" message
HOW_TO_START = "Start one with `raycord run`, or pass --address HOST:PORT of the Ray cluster it runs on."
#: Ray's switch for token authentication, which a cluster `ray.init()` starts has on
_AUTH_MODE = "RAY_AUTH_MODE"


class NoBotFound(Exception):
    """Nothing runs where a command looked; the message says where, and what to do."""


@dataclass(frozen=True, slots=True)
class RecordedBot:
    """What a running bot records about its embedded Ray, for the commands that attach."""

    address: str
    pid: int
    namespace: str
    dashboard_url: str | None = None


def address_file(settings: Settings) -> Path:
    return settings.state_dir.resolve() / ADDRESS_FILE


def record_bot(settings: Settings, dashboard_url: str | None) -> Path:
    """Record this process's Ray (it must be connected) so `raycord status` and
    `raycord analytics` find it from the same state directory."""
    path = address_file(settings)
    bot = RecordedBot(
        address=ray.get_runtime_context().gcs_address,
        pid=os.getpid(),
        namespace=settings.namespace,
        dashboard_url=dashboard_url,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_suffix(f".{os.getpid()}.tmp")
    temp.write_text(json.dumps(asdict(bot)))
    os.replace(temp, path)
    return path


def recorded_bot(settings: Settings) -> RecordedBot | None:
    """The bot recorded in the state directory, if any (it may since have died)."""
    try:
        return RecordedBot(**json.loads(address_file(settings).read_text()))
    except (OSError, ValueError, TypeError):
        return None


def forget_bot(settings: Settings) -> None:
    """Remove this process's record (never another bot's, sharing the state directory)."""
    bot = recorded_bot(settings)
    if bot is not None and bot.pid == os.getpid():
        with contextlib.suppress(FileNotFoundError):
            address_file(settings).unlink()


def answers(address: str, timeout: float = CONNECT_TIMEOUT) -> bool:
    """Whether something accepts TCP connections at a Ray address (`host:port`, `ray://host:port`)."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise NoBotFound(f"{address!r} is not a Ray address: expected HOST:PORT (or `auto`).")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            return True
    except OSError:
        return False


def locate(settings: Settings) -> tuple[str, RecordedBot | None]:
    """The Ray address of the running bot, and its record when it came from one.

    Raises:
        NoBotFound: no address given and none recorded by a live bot, or nothing answers
            at the address given.
    """
    given, source = settings.ray_address, "--address"
    if not given and os.environ.get("RAY_ADDRESS"):
        given, source = os.environ["RAY_ADDRESS"], "RAY_ADDRESS"
    if given:
        if given != "auto" and not answers(given):
            raise NoBotFound(
                f"nothing answers at the Ray address {given} (from {source}).\n"
                "Check the address, or start the bot with `raycord run`."
            )
        return given, None
    path = address_file(settings)
    bot = recorded_bot(settings)
    if bot is None:
        raise NoBotFound(
            f"no running raycord bot found: no --address given, none recorded in {path}.\n{HOW_TO_START}"
        )
    if not answers(bot.address):
        raise NoBotFound(
            f"no running raycord bot found: {path} records one (pid {bot.pid}, Ray at {bot.address}) "
            f"that no longer answers.\n{HOW_TO_START}"
        )
    return bot.address, bot


def attach(settings: Settings) -> RecordedBot | None:
    """Join the running bot's Ray cluster (never start one); a no-op when already joined.

    Raises:
        NoBotFound: see `locate`; also when joining the cluster fails.
    """
    if ray.is_initialized():
        return None
    address, bot = locate(settings)
    if bot is not None and _AUTH_MODE not in os.environ:
        # The recorded bot's Ray is a local cluster that `ray.init()` started, with token
        # authentication on. Ray turns it on in a client for a local cluster it finds by
        # itself (`auto`); for an address passed in it reads RAY_AUTH_MODE once, at import.
        # So the step ray.init takes for `auto` is taken here, by calling Ray's own function.
        from ray._private.authentication.authentication_token_setup import (
            maybe_enable_token_auth_if_token_available,
        )

        # its notice says what ray.init(logging_level=ERROR) below would keep quiet
        logging.getLogger("ray").setLevel(logging.ERROR)
        maybe_enable_token_auth_if_token_available(warn_if_disabled=False)
    try:
        ray.init(
            address=address, namespace=settings.namespace, logging_level=logging.ERROR, log_to_driver=False
        )
    except Exception as exc:  # Ray's own errors here are many; the user needs the first line
        if address == "auto":
            reason = "no Ray cluster found on this machine (--address auto)."
        else:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            auth = (
                f" (token authentication: is {_AUTH_MODE}=token set?)" if _AUTH_MODE not in os.environ else ""
            )
            reason = f"could not join the Ray cluster at {address}: {first}{auth}"
        raise NoBotFound(f"{reason}\n{HOW_TO_START}") from exc
    return bot

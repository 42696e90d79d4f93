"""The `raycord` command: run, chat, deploy, config, status, analytics, discord, fake-gemini, fake-discord.

The load test is `python -m bench.loadtest`: benchmarks sit above the bot, not inside it."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from pathlib import Path
from typing import NoReturn

from pydantic import ValidationError

from bot.attach import NoBotFound
from bot.config import Settings

log = logging.getLogger("raycord")


class ToolParser(argparse.ArgumentParser):
    """argparse that fails in one line: what was wrong, and where the usage is."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="YAML configuration file")
    parser.add_argument("--address", help="Ray address to connect to (default: start an embedded Ray)")
    parser.add_argument("--state-dir", type=Path, help="where services keep their state")
    parser.add_argument("--llm-base-url", help="Gemini API base URL (e.g. the fake server)")
    parser.add_argument("--model", help="Gemini model name")


def _frontends_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--frontends",
        type=int,
        metavar="N",
        help="on a Ray cluster, run N Discord front-end actors sharing the gateway shards "
        "(default: the front-end runs in this process)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = ToolParser(prog="raycord", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser(
        "run", help="start the bot: Discord when DISCORD_TOKEN is set, else the terminal chat"
    )
    _common(run)
    _frontends_flag(run)
    chat = sub.add_parser("chat", help="chat in the terminal (reads stdin; piped input works)")
    _common(chat)
    deploy = sub.add_parser("deploy", help="submit the bot as a Ray job to a cluster (--stop: stop it)")
    _common(deploy)
    _frontends_flag(deploy)
    deploy.add_argument(
        "--stop", action="store_true", help="stop the deployed bot and drain and remove its services"
    )
    deploy.add_argument(
        "--working-dir", type=Path, help="the project directory the job runs (default: this raycord's)"
    )
    config = sub.add_parser("config", help="print the effective configuration, secrets masked")
    _common(config)
    status = sub.add_parser("status", help="live terminal dashboard of the running services, with alerts")
    _common(status)
    status.add_argument("--once", action="store_true", help="render the dashboard once and exit")
    from bot.analytics_cli import add_analytics_parser
    from bot.llm.fake_server import add_arguments

    add_analytics_parser(sub, _common)

    fake = sub.add_parser("fake-gemini", help="serve a fake Gemini API, to try or load-test without a key")
    add_arguments(fake)
    from bot.fake_discord import add_arguments as add_fake_discord_arguments

    fake_discord = sub.add_parser("fake-discord", help="serve a Discord stand-in (REST v10 + Gateway v10)")
    add_fake_discord_arguments(fake_discord)
    discord_cmd = sub.add_parser("discord", help="Discord housekeeping: `raycord discord sync`")
    _common(discord_cmd)
    discord_cmd.add_argument("action", choices=["sync"], help="sync: register the slash commands now")
    return parser


def load_settings(args: argparse.Namespace) -> Settings:
    overrides: dict[str, object] = {"state_dir": args.state_dir, "ray_address": args.address}
    settings = Settings.load(args.config, **overrides)
    if args.llm_base_url or args.model:
        llm = settings.llm.model_copy(
            update={k: v for k, v in {"base_url": args.llm_base_url, "model": args.model}.items() if v}
        )
        settings = settings.model_copy(update={"llm": llm})
    frontends = getattr(args, "frontends", None)
    if frontends is not None:
        settings = settings.with_discord(frontends=frontends)
    return settings


def _one_line(exc: BaseException) -> str:
    """A configuration error in one line: pydantic's first error, or the message squeezed."""
    if isinstance(exc, ValidationError):
        errors = exc.errors()
        first = errors[0]
        where = ".".join(str(p) for p in first["loc"]) or "configuration"
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        return f"{where}: {first['msg']}{more}"
    return " ".join(str(exc).split()) or type(exc).__name__


def backend_label(settings: Settings) -> str:
    if settings.llm_backend() == "offline":
        return "offline responder; set GEMINI_API_KEY for Gemini"
    return f"Gemini API at {settings.llm.base_url}" if settings.llm.base_url else "Gemini API"


def start_block(
    settings: Settings, front_end: str, model: str, dashboard_url: str | None, ray_log: Path
) -> str:
    """What `raycord run` says it started, before the first prompt."""
    frontends = settings.discord.frontends
    if front_end == "discord" and frontends is not None:
        where = (
            f"Discord, {frontends} front-end actor(s) over {settings.discord.shard_count} shard(s) "
            "(logging in; its name follows once all are connected)"
        )
        stop = "Ctrl-C"
    elif front_end == "discord":
        where, stop = "Discord (logging in; its name follows once connected)", "Ctrl-C"
    else:
        where, stop = "terminal chat (/help lists the commands)", "/quit or Ctrl-D (Ctrl-C works too)"
    return "\n".join(
        [
            "raycord is running",
            f"  front-end  {where}",
            f"  model      {model} ({backend_label(settings)})",
            f"  state      {settings.state_dir.resolve()}",
            f"  dashboard  {dashboard_url or 'off'}",
            f"  Ray log    {ray_log}",
            f"  stop       {stop}",
        ]
    )


def announce_discord_ready(bot_name: str, servers: int) -> None:
    """The line `raycord run` prints when the Discord front-end has logged in (on_ready)."""
    print(f"raycord: logged in to Discord as {bot_name}, on {servers} server(s)", file=sys.stderr, flush=True)


async def _serve(settings: Settings, command: str, front_end: str, announce: bool) -> int:
    from bot.runtime import ConfigurationError, Runtime, ray_log_path, route_ray_logs

    route_ray_logs(ray_log_path(settings))
    if settings.discord.frontends is not None:
        from bot.frontend import FrontendError, prepare_frontends

        try:
            settings = await prepare_frontends(settings)
        except FrontendError as exc:
            print(f"raycord {command}: {exc}", file=sys.stderr)
            return 1
    runtime = Runtime(settings)
    try:
        pipeline = await runtime.start()
    except ConfigurationError as exc:
        print(f"raycord {command}: bad configuration: {exc}", file=sys.stderr)
        return 2
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    if announce:
        print(
            start_block(settings, front_end, pipeline.model, runtime.dashboard_url, ray_log_path(settings)),
            file=sys.stderr,
            flush=True,
        )
    try:
        if front_end == "discord" and settings.discord.frontends is not None:
            from bot.frontend import FrontendError, run_frontends

            try:
                await run_frontends(settings, stop, on_ready=announce_discord_ready)
            except FrontendError as exc:
                print(f"raycord {command}: {exc}", file=sys.stderr)
                return 1
        elif front_end == "discord":
            from bot.discord_app import run_discord

            await run_discord(settings, pipeline, stop, on_ready=announce_discord_ready)
        else:
            from bot.console import ConsoleChat

            await ConsoleChat(pipeline).run(stop)
    finally:
        await runtime.shutdown()
    return 0


def _usable_state_dir(settings: Settings) -> str | None:
    """Why the state directory cannot hold the bot's state, or None when it can."""
    try:
        settings.state_dir.resolve().mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        return f"cannot use the state directory {settings.state_dir}: {exc.strerror or exc}"
    return None


def _deploy(args: argparse.Namespace, settings: Settings) -> int:
    """`raycord deploy`: submit the bot as a Ray job, or `--stop` it."""
    import os

    from bot.deploy import DeployError, how_to_follow, stop, submit
    from bot.runtime import project_root

    prog = "raycord deploy"
    address = args.address
    if not address or "://" not in address:
        print(f"{prog}: --address must be the head's dashboard URL, e.g. http://HEAD:8265", file=sys.stderr)
        return 2
    working_dir = (args.working_dir or project_root()).resolve()
    try:
        if args.stop:
            stopped = stop(settings, address, working_dir)
            jobs = ", ".join(stopped) or "none was running"
            print(
                f"raycord: stopped job(s): {jobs}; "
                f"services of namespace {settings.namespace} drained and removed"
            )
            return 0
        if not settings.state_dir.is_absolute():
            print(
                f"{prog}: the state directory {settings.state_dir} is relative; the job runs in a "
                "directory of its own on the head. Set RAYCORD_STATE_DIR (or --state-dir) to an absolute "
                f"path on the local disk of the node with the Ray resource {settings.state_resource!r} "
                "(the head by default).",
                file=sys.stderr,
            )
            return 2
        flags = {"RAYCORD_LLM__BASE_URL": args.llm_base_url, "RAYCORD_LLM__MODEL": args.model}
        deployment = submit(settings, address, working_dir, os.environ, flags, args.config, args.frontends)
    except DeployError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 1
    print(how_to_follow(deployment))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # said by the subcommand that got them, as argparse says its other errors
        prog = f"raycord {args.command}"
        parser.exit(2, f"{prog}: unrecognized arguments: {' '.join(extra)} (see {prog} --help)\n")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return _dispatch(args)
    except NoBotFound as exc:
        print(f"raycord {args.command}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _dispatch(args: argparse.Namespace) -> int:
    prog = f"raycord {args.command}"
    if args.command == "fake-gemini":
        from bot.llm.fake_server import config_from_args, serve

        try:
            asyncio.run(serve(args.host, args.port, config_from_args(args)))
        except OSError as exc:
            print(f"{prog}: cannot listen on {args.host}:{args.port}: {exc.strerror or exc}", file=sys.stderr)
            return 1
        return 0
    if args.command == "fake-discord":
        from bot.fake_discord import serve as serve_fake_discord

        asyncio.run(serve_fake_discord(args.host, args.port, args.token, args.guilds))
        return 0
    try:
        settings = load_settings(args)
    except Exception as exc:
        print(f"{prog}: bad configuration: {_one_line(exc)}", file=sys.stderr)
        return 2
    if args.command == "config":
        print(settings.masked_json())
        return 0
    if args.command == "status":
        from bot.status import run_status

        return asyncio.run(run_status(settings, once=args.once))
    if args.command == "deploy":
        return _deploy(args, settings)
    if args.command == "analytics":
        from bot.analytics_cli import run_analytics

        return run_analytics(args, settings)
    from bot.deploy import in_ray_job

    if args.command == "run" and settings.discord_token is None and in_ray_job():
        print(
            f"{prog}: no Discord token and no terminal: this Ray job has nothing to serve. "
            "Set DISCORD_TOKEN in the environment of `raycord deploy`, which passes it to the job.",
            file=sys.stderr,
        )
        return 2
    problem = _usable_state_dir(settings)
    if problem is not None:
        print(f"{prog}: {problem}", file=sys.stderr)
        return 2
    if args.command == "discord":
        from bot.discord_app import sync_commands_now

        return asyncio.run(sync_commands_now(settings))
    front_end = "terminal"
    if args.command == "run" and settings.discord_token is not None:
        front_end = "discord"
    if settings.discord.frontends is not None:
        from bot.frontend import FrontendError, check_frontends

        try:
            check_frontends(settings, front_end)
        except FrontendError as exc:
            print(f"{prog}: {exc}", file=sys.stderr)
            return 2
    # `run` always says what it started; `chat` only on a terminal, so piped use stays silent
    announce = args.command == "run" or sys.stdin.isatty()
    return asyncio.run(_serve(settings, args.command, front_end, announce))


if __name__ == "__main__":
    sys.exit(main())

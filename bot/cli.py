"""The `raycord` command: run, chat, config, status, analytics, discord, fake-gemini, fake-discord,
loadtest."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from pathlib import Path

from bot.config import Settings

log = logging.getLogger("raycord")


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="YAML configuration file")
    parser.add_argument("--address", help="Ray address to connect to (default: start an embedded Ray)")
    parser.add_argument("--state-dir", type=Path, help="where services keep their state")
    parser.add_argument("--llm-base-url", help="Gemini API base URL (e.g. the fake server)")
    parser.add_argument("--model", help="Gemini model name")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="raycord", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser(
        "run", help="start the bot: Discord when DISCORD_TOKEN is set, else the terminal chat"
    )
    _common(run)
    chat = sub.add_parser("chat", help="chat in the terminal (reads stdin; piped input works)")
    _common(chat)
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
    sub.add_parser(
        "loadtest", help="load test: raycord against the naive pipeline (see --help)", add_help=False
    )
    return parser


def load_settings(args: argparse.Namespace) -> Settings:
    overrides: dict[str, object] = {"state_dir": args.state_dir, "ray_address": args.address}
    settings = Settings.load(args.config, **overrides)
    if args.llm_base_url or args.model:
        llm = settings.llm.model_copy(
            update={k: v for k, v in {"base_url": args.llm_base_url, "model": args.model}.items() if v}
        )
        settings = settings.model_copy(update={"llm": llm})
    return settings


async def _serve(settings: Settings, front_end: str) -> int:
    from bot.runtime import Runtime

    runtime = Runtime(settings)
    pipeline = await runtime.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    backend = "offline responder" if settings.llm_backend() == "offline" else "Gemini"
    print(f"raycord: {front_end} front-end, model {pipeline.model} ({backend})", file=sys.stderr)
    try:
        if front_end == "discord":
            from bot.discord_app import run_discord

            await run_discord(settings, pipeline, stop)
        else:
            from bot.console import ConsoleChat

            await ConsoleChat(pipeline).run(stop)
    finally:
        await runtime.shutdown()
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["loadtest"]:
        from bench.loadtest import main as loadtest_main

        return loadtest_main(argv[1:])
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.command == "fake-gemini":
        from bot.llm.fake_server import config_from_args, serve

        asyncio.run(serve(args.host, args.port, config_from_args(args)))
        return 0
    if args.command == "fake-discord":
        from bot.fake_discord import serve as serve_fake_discord

        asyncio.run(serve_fake_discord(args.host, args.port, args.token, args.guilds))
        return 0
    try:
        settings = load_settings(args)
    except Exception as exc:
        print(f"raycord: bad configuration: {exc}", file=sys.stderr)
        return 2
    if args.command == "config":
        print(settings.masked_json())
        return 0
    if args.command == "status":
        from bot.status import run_status

        return asyncio.run(run_status(settings, once=args.once))
    if args.command == "analytics":
        from bot.analytics_cli import run_analytics

        return run_analytics(args, settings)
    if args.command == "discord":
        from bot.discord_app import sync_commands_now

        return asyncio.run(sync_commands_now(settings))
    front_end = "terminal"
    if args.command == "run" and settings.discord_token is not None:
        front_end = "discord"
    return asyncio.run(_serve(settings, front_end))


if __name__ == "__main__":
    sys.exit(main())

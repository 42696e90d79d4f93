"""`raycord analytics`: read-only SQL, built-in reports and Parquet export, through the sink.

DuckDB allows one writing process, so the command never opens the database itself: it
asks the `analytics-0` actor of the running bot (found as `raycord status` finds it), or,
with no bot running, of an embedded Ray it starts, creating only that actor.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import io
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ray

from actors.analytics import AnalyticsClient
from bot.attach import NoBotFound, attach
from bot.config import Settings
from bot.runtime import SERVICES, init_ray, ray_log_path, route_ray_logs, service_handles
from storage.analytics_db import REPORTS, AnalyticsStorageError, QueryRejected, QueryResult

FORMATS = ("table", "csv", "json")


def add_analytics_parser(
    sub: argparse._SubParsersAction[Any],
    common: Callable[[argparse.ArgumentParser], None],
) -> None:
    parser = sub.add_parser(
        "analytics",
        help="query the analytics database (SELECT only), print a report, or export Parquet",
        description='Examples: raycord analytics "SELECT type, count(*) FROM events GROUP BY 1"; '
        "raycord analytics --report daily; raycord analytics --export ./parquet",
    )
    common(parser)
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("sql", nargs="?", help="one SELECT statement")
    what.add_argument("--report", choices=sorted(REPORTS), help="a built-in report")
    what.add_argument("--export", type=Path, metavar="DIR", help="write every table as Parquet into DIR")
    parser.add_argument("--format", choices=FORMATS, default="table", help="output format (default: table)")
    parser.add_argument("--max-rows", type=int, help="most rows to print (default: analytics.query_max_rows)")


def analytics_client(settings: Settings) -> AnalyticsClient:
    """A client on the `analytics-0` actor, getting or creating only that actor."""
    spec = next(s for s in SERVICES if s.name == "analytics")
    return AnalyticsClient(service_handles(settings, spec), settings.analytics, state_dir=settings.state_dir)


def _cell(value: Any) -> str:
    return "" if value is None else str(value)


def format_result(result: QueryResult, fmt: str) -> str:
    """The rows as an aligned text table, CSV, or a JSON list of objects."""
    if fmt == "json":
        return json.dumps([dict(zip(result.columns, row, strict=True)) for row in result.rows], default=str)
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(result.columns)
        writer.writerows([[_cell(v) for v in row] for row in result.rows])
        return out.getvalue().rstrip("\n")
    cells = [[_cell(v) for v in row] for row in result.rows]
    widths = [max([len(c), *(len(r[i]) for r in cells)]) for i, c in enumerate(result.columns)]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(result.columns, widths, strict=True)),
        "  ".join("-" * w for w in widths),
        *("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip() for r in cells),
        f"({len(cells)} row{'s' if len(cells) != 1 else ''})",
    ]
    return "\n".join(lines)


def _cause(exc: BaseException) -> BaseException:
    # an error raised in the actor arrives wrapped; `cause` is the original
    return getattr(exc, "cause", None) or exc


async def _run(args: argparse.Namespace, settings: Settings) -> int:
    client = analytics_client(settings)
    try:
        if args.export is not None:
            written = await client.export_parquet(str(args.export.resolve()))
            for table, rows in written.items():
                print(f"{args.export / f'{table}.parquet'}: {rows} rows")
            return 0
        sql = REPORTS[args.report] if args.report else args.sql
        result = await client.query(sql, args.max_rows)
    except QueryRejected as exc:
        print(f"raycord analytics: query refused: {_cause(exc)}", file=sys.stderr)
        return 2
    except AnalyticsStorageError as exc:
        reason = str(_cause(exc))
        if "lock" in reason.lower():
            reason += (
                "\nAnother process holds the database (a bot running on an embedded Ray?). "
                "Query through it with --address, or stop it first."
            )
        print(f"raycord analytics: {reason}", file=sys.stderr)
        return 1
    print(format_result(result, args.format))
    if result.truncated:
        print(
            f"raycord analytics: showing the first {len(result.rows)} rows; add a LIMIT or raise --max-rows",
            file=sys.stderr,
        )
    return 0


def run_analytics(args: argparse.Namespace, settings: Settings) -> int:
    """The `raycord analytics` command; returns the exit status.

    Queries go through the running bot's sink when one is found (given with --address,
    or recorded in the state directory); with none running, an embedded Ray opens the
    state directory's database, which must exist.

    Raises:
        NoBotFound: nothing answers at the address given, or no bot and no database.
    """
    if args.max_rows is not None and args.max_rows < 1:
        print("raycord analytics: --max-rows must be at least 1", file=sys.stderr)
        return 2
    owns_ray = False
    if not ray.is_initialized():
        owns_ray = not _attach_to_running_bot(settings)
    if owns_ray:
        route_ray_logs(ray_log_path(settings))
        init_ray(settings, include_dashboard=False)
    try:
        return asyncio.run(_run(args, settings))
    finally:
        if owns_ray:
            # the embedded Ray and the sink in it end with this command: release the file
            ray.shutdown()


def _attach_to_running_bot(settings: Settings) -> bool:
    """Join the running bot's cluster; False when none runs and the database is there to open."""
    try:
        attach(settings)
    except NoBotFound as exc:
        database = settings.state_dir.resolve() / "analytics.duckdb"
        given = settings.ray_address or os.environ.get("RAY_ADDRESS")
        if given or not database.is_file():
            if not given:
                raise NoBotFound(f"no analytics database at {database}, and {exc}") from exc
            raise
        return False
    try:
        ray.get_actor("analytics-0", namespace=settings.namespace)
    except ValueError:
        raise NoBotFound(
            f"no raycord analytics sink in namespace {settings.namespace!r} on this Ray cluster.\n"
            "Start the bot with `raycord run`, or set RAYCORD_NAMESPACE to the namespace it runs in."
        ) from None
    return True

"""The Grafana dashboard in `deploy/grafana` loads and charts raycord's own metrics."""

from __future__ import annotations

import json
import re
from pathlib import Path

DASHBOARD = Path(__file__).resolve().parent.parent / "deploy" / "grafana" / "raycord-dashboard.json"


def test_every_panel_queries_raycord_metrics_through_the_datasource_variable() -> None:
    dash = json.loads(DASHBOARD.read_text())
    assert dash["uid"] and dash["title"] == "raycord"
    assert [v["name"] for v in dash["templating"]["list"]] == ["datasource"]
    charts = [p for p in dash["panels"] if p["type"] != "row"]
    assert len({p["id"] for p in dash["panels"]}) == len(dash["panels"])
    for panel in charts:
        assert panel["datasource"]["uid"] == "${datasource}"
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert re.search(r"\bray_raycord_\w+", target["expr"]), target["expr"]
            assert target["expr"].count("(") == target["expr"].count(")"), target["expr"]


def test_the_issue_s_figures_each_have_a_panel() -> None:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    exprs = " ".join(t["expr"] for p in panels for t in p.get("targets", []))
    for metric in (
        "ray_raycord_message_latency_ms_bucket",
        "ray_raycord_stage_latency_ms_bucket",
        "ray_raycord_cache_hits_total",
        "ray_raycord_cache_misses_total",
        "ray_raycord_cache_stored_bytes",
        "ray_raycord_ratelimit_allowed_total",
        "ray_raycord_ratelimit_denied_total",
        "ray_raycord_context_bytes",
        "ray_raycord_analytics_queue_depth",
        "ray_raycord_analytics_commit_ms_bucket",
        "ray_raycord_llm_in_flight",
        "ray_raycord_llm_errors_total",
        "ray_raycord_service_rss_bytes",
    ):
        assert metric in exprs, metric

"""serving.metrics: the Prometheus scrape config and the Grafana dashboard match what the app exports."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def test_the_scrape_config_and_the_docs_name_the_metrics_port_drugprot_serve_uses():
    from drugprot.cli.serve import METRICS_PORT

    scrape = yaml.safe_load((REPO / "infra" / "prometheus" / "scrape.yaml").read_text())
    assert scrape["scrape_configs"][0]["static_configs"][0]["targets"] == [f"127.0.0.1:{METRICS_PORT}"]
    assert f"| `--metrics-port N` | {METRICS_PORT} |" in (REPO / "docs" / "serving.md").read_text()


def test_the_grafana_dashboard_queries_only_series_the_app_exports():
    """Every drugprot series a panel queries is one serving.metrics defines (Ray adds the ray_ prefix)."""
    dashboard = json.loads((REPO / "infra" / "grafana" / "drugprot-serving.json").read_text())
    source = (REPO / "platform" / "drugprot" / "serving" / "metrics.py").read_text()
    defined = set(re.findall(r'(?:Counter|Gauge|Histogram)\("(drugprot_\w+)"', source))
    queried = {m for panel in dashboard["panels"] for target in panel["targets"]
               for m in re.findall(r"ray_(drugprot_\w+?)(?:_total|_bucket|_sum|_count)?\b", target["expr"])}
    assert queried and queried <= defined, queried - defined
    assert queried == defined  # and every series has a panel

"""Prometheus metrics: the handlers' histograms as TorchServe serves them on ``/metrics``, and the Grafana
dashboard (deploy/grafana) checked to query only metric names that a real scrape holds."""

from __future__ import annotations

import base64
import json
import logging
import re
import subprocess
import time
from pathlib import Path

import pytest
import requests

from handlers.audit.metrics import FAITHFULNESS_SECONDS, OVERHEAD_SECONDS, AuditMetrics
from handlers.serving.metrics import CAM_SECONDS, ENCODE_MILLISECONDS, CamMetrics
from tests.helpers.answers import post
from tests.helpers.inputs import encode, square_image
from tests.helpers.serving import AUDIT_FULL, BATCH_MODEL

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "deploy" / "grafana" / "torchserve-cam.json"
#: the Prometheus Java client's default buckets, which TorchServe 0.12 gives every histogram
DEFAULT_BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, float("inf")]
PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset", "and", "or",
                "unless", "inf", "nan", "le"}  # fmt: skip


# ---------------------------------------------------------------------------------------------- helpers
def promql_metric_names(expression: str) -> set[str]:
    """Metric names an expression selects: identifiers outside strings, label matchers, ranges and
    ``by (...)`` lists that are neither functions/aggregations (followed by ``(``) nor PromQL keywords."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expression)
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    names = set()
    for match in re.finditer(r"(?<![\w$.])([A-Za-z_:][A-Za-z0-9_:]*)\b(\s*\()?", text):
        if match.group(2) is None and match.group(1).lower() not in PROMQL_WORDS:
            names.add(match.group(1))
    return names


def dashboard_expressions(dashboard: dict) -> list[str]:
    expressions = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    for variable in dashboard["templating"]["list"]:
        query = variable.get("query")
        if isinstance(query, dict):
            expressions.append(re.sub(r"^label_values\((.*),\s*\w+\)$", r"\1", query["query"]))
    return expressions


def parse_scrape(text: str) -> tuple[dict[str, str], list[tuple[str, dict[str, str], float]]]:
    """(``{name: type}`` from ``# TYPE`` lines, ``[(sample name, labels, value)]``) of a text exposition."""
    types, samples = {}, []
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            types[name] = kind
        elif line and not line.startswith("#"):
            match = re.fullmatch(r"([A-Za-z_:][\w:]*)(?:\{(.*)\})?\s+(\S+)(?:\s+\d+)?", line)
            assert match, line
            labels = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', match.group(2) or ""))
            samples.append((match.group(1), labels, float(match.group(3))))
    return types, samples


def histogram(samples, name: str, **labels: str) -> tuple[list[tuple[float, float]], float, float]:
    """(``[(le, cumulative count)]`` sorted by le, sum, count) of one histogram series."""

    def mine(sample_labels: dict[str, str]) -> bool:
        return all(sample_labels.get(k) == v for k, v in labels.items())

    buckets = sorted(
        (float(tags["le"].replace("+Inf", "inf")), v) for n, tags, v in samples if n == f"{name}_bucket" and mine(tags)
    )
    total = sum(v for n, tags, v in samples if n == f"{name}_sum" and mine(tags))
    count = sum(v for n, tags, v in samples if n == f"{name}_count" and mine(tags))
    return buckets, total, count


def scrape(server) -> str:
    answer = requests.get(f"{server.url('metrics')}/metrics", timeout=30)
    assert answer.status_code == 200
    return answer.text


# ------------------------------------------------------------------------------------ offline checks
def test_promql_name_extraction() -> None:
    expression = ('histogram_quantile(0.95, sum by (le, Method) (rate(CamMethodSeconds_bucket{ModelName=~"$model", '
                  'x="a{b}"}[$__rate_interval]))) / on (Method) group_left sum(rate(Other_total[5m])) > bool 1e3')  # fmt: skip
    assert promql_metric_names(expression) == {"CamMethodSeconds_bucket", "Other_total"}


def test_backend_metric_lines_declare_histograms_in_the_documented_units(caplog) -> None:
    """TorchServe's own backend metric cache, fed by our metric classes: the log lines its frontend parses."""
    import ts
    from ts.metrics.metric_cache_yaml_impl import MetricsCacheYamlImpl
    from ts.metrics.metric_type_enum import MetricTypes

    cache = MetricsCacheYamlImpl(str(Path(ts.__file__).parent / "configs" / "metrics.yaml"))
    context = type("Context", (), {"metrics": cache})()
    cam = CamMetrics(context, "m")
    audit = AuditMetrics((cache, MetricTypes), "m", "sqlite")
    with caplog.at_level(logging.INFO):
        cam.cam("gradcam", 1234.5, 3)
        assert cam.encoded("png", lambda size: b"x" * size, 100) == b"x" * 100
        audit.observe(OVERHEAD_SECONDS, 20.0)
        audit.observe(FAITHFULNESS_SECONDS, 7.5)
        audit.publish({"committed": 0, "write_errors": 0, "dropped": 0})
        audit.publish({"committed": 2, "write_errors": 0, "dropped": 0})
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("[METRICS]")]
    parsed = [re.match(r"\[METRICS\](\w+)\.(\w+):([\d.]+)\|#([^|]*)\|#type:(\w+)", line).groups() for line in lines]
    by_name: dict[str, list] = {}
    for name, unit, value, dims, kind in parsed:
        by_name.setdefault(name, []).append((unit, float(value), dims, kind))
    assert by_name[CAM_SECONDS] == [("Seconds", 1.2345, "ModelName:m,Method:gradcam", "HISTOGRAM")]
    assert by_name["CamExplanations"] == [("Count", 3.0, "ModelName:m,Method:gradcam", "COUNTER")]
    (unit, value, dims, kind), = by_name[ENCODE_MILLISECONDS]  # fmt: skip
    assert (unit, dims, kind) == ("Milliseconds", "ModelName:m,Format:png", "HISTOGRAM") and 0 <= value < 1000
    assert by_name["HeatmapBytes"] == [("bytes", 100.0, "ModelName:m,Format:png", "COUNTER")]
    assert by_name[OVERHEAD_SECONDS] == [("Seconds", 0.02, "ModelName:m,Sink:sqlite", "HISTOGRAM")]
    assert by_name[FAITHFULNESS_SECONDS] == [("Seconds", 0.0075, "ModelName:m,Sink:sqlite", "HISTOGRAM")]
    # every counter is published once at zero (the series exist), then only deltas
    assert by_name["AuditDropped"] == [("Count", 0.0, "ModelName:m,Sink:sqlite", "COUNTER")]
    assert by_name["AuditRecords"] == [("Count", 0.0, "ModelName:m,Sink:sqlite", "COUNTER"),
                                       ("Count", 2.0, "ModelName:m,Sink:sqlite", "COUNTER")]  # fmt: skip


def test_dashboard_is_valid_grafana_json() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] and dashboard["title"] and isinstance(dashboard["schemaVersion"], int)
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    for panel in dashboard["panels"]:
        assert {"x", "y", "w", "h"} <= set(panel["gridPos"]) and panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24
        for target in panel.get("targets", []):
            assert target["datasource"]["uid"] == "${datasource}" and target["expr"].count("(") == target["expr"].count(")")
            assert set(re.findall(r"\$(\w+)", target["expr"])) <= variables | {"__rate_interval"}, target["expr"]
    names = set().union(*map(promql_metric_names, dashboard_expressions(dashboard)))
    for wanted in (f"{CAM_SECONDS}_bucket", f"{ENCODE_MILLISECONDS}_bucket", f"{OVERHEAD_SECONDS}_bucket",
                   f"{FAITHFULNESS_SECONDS}_bucket", "AuditDropped", "CamExplanations", "HeatmapBytes",
                   "ts_inference_requests_total", "ts_inference_latency_microseconds"):  # fmt: skip
        assert wanted in names, wanted
    quantiles = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", []) if CAM_SECONDS in t["expr"]]
    assert any(e.startswith("histogram_quantile(0.5,") for e in quantiles)
    assert any(e.startswith("histogram_quantile(0.95,") for e in quantiles)


def test_dashboard_ships_as_a_sidecar_configmap_in_the_prometheus_overlay() -> None:
    import yaml

    overlay = ROOT / "deploy" / "kubernetes" / "overlays" / "gpu-prometheus"
    rendered = subprocess.run(["kubectl", "kustomize", str(overlay)], capture_output=True, text=True, timeout=120)
    assert rendered.returncode == 0, rendered.stderr
    maps = [d for d in yaml.safe_load_all(rendered.stdout) if d and d["kind"] == "ConfigMap"
            and d["metadata"]["labels"].get("grafana_dashboard") == "1"]  # fmt: skip
    assert len(maps) == 1
    assert json.loads(maps[0]["data"]["torchserve-cam.json"]) == json.loads(DASHBOARD.read_text())


# ------------------------------------------------------------------------------------ the real scrape
@pytest.fixture(scope="module")
def exercised(server):
    """The session TorchServe after an explanation, an audited explanation and a refused request; the
    scrape taken once the frontend has taken in the workers' metric lines."""
    before = parse_scrape(scrape(server))[1]
    started = time.perf_counter()
    answer = post(server, f"explanations/{BATCH_MODEL}", encode(square_image(50, 50, (5, 5, 20, 20), seed=3)))
    wall = time.perf_counter() - started
    assert answer.status_code == 200 and answer.json()["explanations"]
    assert post(server, f"explanations/{AUDIT_FULL}", encode(square_image(40, 40, (5, 5, 20, 20), seed=4))).ok
    assert 400 <= post(server, f"predictions/{BATCH_MODEL}", b"not an image").status_code < 500
    deadline = time.monotonic() + 60
    while True:  # the frontend reads metric lines from the worker's log asynchronously
        text = scrape(server)
        types, samples = parse_scrape(text)
        count = histogram(samples, CAM_SECONDS, ModelName=BATCH_MODEL, Method="gradcam")[2]
        encoded = histogram(samples, ENCODE_MILLISECONDS, ModelName=BATCH_MODEL, Format="png")[2]
        audited = histogram(samples, FAITHFULNESS_SECONDS, ModelName=AUDIT_FULL)[2]
        if (count > histogram(before, CAM_SECONDS, ModelName=BATCH_MODEL, Method="gradcam")[2] and audited
                and encoded > histogram(before, ENCODE_MILLISECONDS, ModelName=BATCH_MODEL, Format="png")[2]) \
                or time.monotonic() > deadline:  # fmt: skip
            return {"before": before, "types": types, "samples": samples, "wall": wall, "answer": answer.json()}
        time.sleep(0.5)


@pytest.mark.parametrize("name, labels", [
    (CAM_SECONDS, {"ModelName": BATCH_MODEL, "Method": "gradcam"}),
    (ENCODE_MILLISECONDS, {"ModelName": BATCH_MODEL, "Format": "png"}),
    (OVERHEAD_SECONDS, {"ModelName": AUDIT_FULL, "Sink": "sqlite"}),
    (FAITHFULNESS_SECONDS, {"ModelName": AUDIT_FULL, "Sink": "sqlite"}),
])  # fmt: skip
def test_times_are_real_prometheus_histograms(exercised, name, labels) -> None:
    assert exercised["types"][name] == "histogram"
    buckets, total, count = histogram(exercised["samples"], name, **labels)
    assert [le for le, _ in buckets] == DEFAULT_BUCKETS
    counts = [c for _, c in buckets]
    assert counts == sorted(counts) and counts[-1] == count >= 1  # cumulative; +Inf holds every observation
    assert total > 0


def test_cam_time_histogram_counts_the_call_and_its_seconds(exercised) -> None:
    """One explanation of a lone request: one batched CAM call more, its time below the request's wall time."""
    labels = {"ModelName": BATCH_MODEL, "Method": "gradcam"}
    _, sum_before, count_before = histogram(exercised["before"], CAM_SECONDS, **labels)
    _, sum_after, count_after = histogram(exercised["samples"], CAM_SECONDS, **labels)
    assert count_after - count_before == 1
    assert 0 < sum_after - sum_before < exercised["wall"]  # seconds, not milliseconds


def test_encode_histogram_and_heatmap_bytes_count_the_pictures_sent(exercised) -> None:
    """One PNG heatmap per explanation of the answer: as many encode observations, and their exact bytes."""
    pictures = [base64.b64decode(e["heatmap"]["data"]) for e in exercised["answer"]["explanations"]]
    labels = {"ModelName": BATCH_MODEL, "Format": "png"}
    count_delta = histogram(exercised["samples"], ENCODE_MILLISECONDS, **labels)[2] - histogram(
        exercised["before"], ENCODE_MILLISECONDS, **labels)[2]  # fmt: skip

    def sent(samples) -> float:
        return sum(v for n, tags, v in samples if n == "HeatmapBytes" and all(tags.get(k) == x for k, x in labels.items()))

    assert count_delta == len(pictures) >= 1
    assert sent(exercised["samples"]) - sent(exercised["before"]) == sum(map(len, pictures))


def test_dashboard_queries_only_metrics_the_server_emits(exercised) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    wanted = set().union(*map(promql_metric_names, dashboard_expressions(dashboard)))
    # a sample, or a counter/gauge TorchServe registers at start whose series come with the first event
    # (Requests5XX: the first 5xx response)
    emitted = {name for name, _, _ in exercised["samples"]}
    emitted |= {name for name, kind in exercised["types"].items() if kind in ("counter", "gauge")}
    assert wanted - emitted == set(), f"the dashboard queries metrics the server does not emit: {wanted - emitted}"

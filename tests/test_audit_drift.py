"""The audit's drift signals: bounded class labels, the metric lines a batch emits, and the shipped alert
rules evaluated by Prometheus' own ``promtool`` on series that drift (and on series that do not).

The same rules on metrics scraped from a real TorchServe: ``tests/test_audit_postgres_serving.py``.
"""

from __future__ import annotations

import subprocess
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from handlers.audit.metrics import DRIFT_METRICS, OTHER_CLASS, AuditMetrics, ClassLabels
from handlers.config import DriftConfig

ROOT = Path(__file__).resolve().parents[1]
RULES = ROOT / "deploy" / "kubernetes" / "overlays" / "gpu-prometheus" / "audit-drift-rules.yaml"
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 7.5, 10)  # TorchServe's, fixed


def test_class_labels_name_the_frequent_classes_and_stay_bounded() -> None:
    labels = ClassLabels(top=2)
    assert [labels.label(name) for name in ["a", "a", "b", "c"]] == ["a", "a", "b", OTHER_CLASS]  # c: not top-2 yet
    assert [labels.label("c") for _ in range(3)][-1] == "c"  # now among the 2 most frequent: named from then on
    seen = {labels.label(f"class_{i % 50}") for i in range(5000)}  # 50 classes in turn: at most 2 x top named
    assert len(labels.named) == 4 and len(seen - {OTHER_CLASS}) <= 4 and OTHER_CLASS in seen


class FakeMetric:
    def __init__(self, name: str, log: list) -> None:
        self.name, self.log = name, log

    def add_or_update(self, value, dimensions) -> None:
        self.log.append((self.name, value, tuple(dimensions)))


class FakeCache:
    def __init__(self) -> None:
        self.log: list = []
        self.types: dict[str, str] = {}

    def add_metric_to_cache(self, name, unit, dimensions, kind):
        self.types[name] = kind
        return FakeMetric(name, self.log)


def test_a_batch_emits_its_drift_observations_and_the_thresholds_once() -> None:
    cache = FakeCache()
    kinds = SimpleNamespace(COUNTER="counter", HISTOGRAM="histogram", GAUGE="gauge")
    metrics = AuditMetrics((cache, kinds), "m", "postgres", DriftConfig(top_classes=1, faithfulness_floor=0.1,
                                                                          class_share_shift=0.3))  # fmt: skip
    batch = [{"faithfulness": 0.25, "top10_mass": 0.4, "top_label": "cat"},
             {"faithfulness": -0.1, "top10_mass": None, "top_label": "cat"},
             {"faithfulness": None, "top10_mass": 0.9, "top_label": "dog"}]  # fmt: skip
    metrics.drift(batch)
    metrics.drift(batch[:1])
    names = DRIFT_METRICS
    assert {cache.types[names[k]] for k in ("faithfulness", "top10_mass")} == {"histogram"}
    assert (cache.types[names["top_class"]], cache.types[names["floor"]]) == ("counter", "gauge")
    assert [e for e in cache.log if e[0] == names["floor"]] == [(names["floor"], 0.1, ("m",))]  # once
    assert [e for e in cache.log if e[0] == names["shift"]] == [(names["shift"], 0.3, ("m",))]
    assert [e[1] for e in cache.log if e[0] == names["faithfulness"]] == [0.25, -0.1, 0.25]
    assert [e[1] for e in cache.log if e[0] == names["top10_mass"]] == [0.4, 0.9, 0.4]
    counted = [(e[2][1], e[1]) for e in cache.log if e[0] == names["top_class"]]
    assert counted == [("cat", 2), (OTHER_CLASS, 1), ("cat", 1)]  # top_classes 1: dog is "other"


def _promtool() -> str:
    subprocess.run([str(ROOT / "tests" / "ensure_debian.sh"), "prometheus", "command -v promtool"], check=False, timeout=600)
    found = subprocess.run(["bash", "-c", "command -v promtool"], capture_output=True, text=True).stdout.strip()
    if not found:
        pytest.skip("promtool missing (`tests/ensure_debian.sh prometheus 'command -v promtool'` installs Debian's prometheus as root)")
    return found


def _bucket_series(phases: list[tuple[float, int]], model: str = "m") -> list[dict]:
    """AuditFaithfulness_bucket series: ``phases`` of (the value observed 10 times a minute, minutes)."""
    series = []
    for le in [*BUCKETS, "+Inf"]:
        parts, total = [], 0
        for value, minutes in phases:
            step = 10 if le == "+Inf" or value <= le else 0
            parts.append(f"{total}+{step}x{minutes}")
            total += step * (minutes + 1)
        series.append({"series": f'AuditFaithfulness_bucket{{ModelName="{model}",le="{le}"}}', "values": " ".join(parts)})
    return series


def test_shipped_alert_rules_fire_on_drift_and_stay_quiet_without(tmp_path: Path) -> None:
    promtool = _promtool()
    rules = tmp_path / "rules.yaml"
    rules.write_text(yaml.safe_dump(yaml.safe_load(RULES.read_text())["spec"]))
    assert "SUCCESS: 2 rules found" in subprocess.run([promtool, "check", "rules", str(rules)], capture_output=True,
                                                      text=True, check=True).stdout  # fmt: skip
    day = 1500  # minutes of steady traffic, then the shift
    series = [
        # model m: class_6 only for a day, then class_1 only; model steady: one mix throughout
        {"series": 'AuditTopClass{ModelName="m",Class="class_6"}', "values": f"0+10x{day} {10 * day}+0x120"},
        {"series": 'AuditTopClass{ModelName="m",Class="class_1"}', "values": f"0+0x{day} 0+10x120"},
        {"series": 'AuditTopClass{ModelName="steady",Class="a"}', "values": f"0+7x{day + 121}"},
        {"series": 'AuditTopClass{ModelName="steady",Class="b"}', "values": f"0+3x{day + 121}"},
        # model fresh: deployed at the shift, no day before to compare with: no alert
        {"series": 'AuditTopClass{ModelName="fresh",Class="a"}', "values": f"_x{day} 0+10x120"},
        {"series": 'AuditDriftShareShift{ModelName="fresh"}', "values": f"0.2x{day + 121}"},
        {"series": 'AuditDriftShareShift{ModelName="m"}', "values": f"0.2x{day + 121}"},
        {"series": 'AuditDriftShareShift{ModelName="steady"}', "values": f"0.2x{day + 121}"},
        {"series": 'AuditDriftFaithfulnessFloor{ModelName="m"}', "values": f"0.05x{day + 121}"},
        # faithfulness of m: 0.3 for a day, then 0.0 (the heatmaps stopped mattering)
        *_bucket_series([(0.3, day), (0.0, 120)]),
    ]
    firing = 'count by (alertname) (ALERTS{alertstate="firing"})'
    tests = {
        "rule_files": [str(rules)],
        "evaluation_interval": "1m",
        "tests": [{
            "interval": "1m",
            "input_series": series,
            "promql_expr_test": [
                {"expr": firing, "eval_time": f"{day - 10}m", "exp_samples": []},  # a day of steady traffic
                {"expr": firing, "eval_time": f"{day + 10}m", "exp_samples": []},  # shifting, not yet for 15 m
                {"expr": firing, "eval_time": f"{day + 40}m", "exp_samples": [
                    {"labels": '{alertname="AuditClassShareShift"}', "value": 2}]},  # class_6 down, class_1 up
                {"expr": firing, "eval_time": f"{day + 119}m", "exp_samples": [
                    {"labels": '{alertname="AuditClassShareShift"}', "value": 2},
                    {"labels": '{alertname="AuditFaithfulnessLow"}', "value": 1}]},  # the 1 h median: below 0.05
            ],
        }],
    }  # fmt: skip
    (tmp_path / "tests.yaml").write_text(yaml.safe_dump(tests))
    result = subprocess.run([promtool, "test", "rules", str(tmp_path / "tests.yaml")], capture_output=True, text=True)
    assert result.returncode == 0, textwrap.shorten(result.stdout + result.stderr, 3000)


# ----------------------------------------------------------------------------------- the Grafana panels
DASHBOARD = ROOT / "deploy" / "grafana" / "torchserve-cam.json"


def _audit_panels() -> dict[str, list[str]]:
    """Title -> expressions of the dashboard's panels that query the audit's metrics."""
    import json

    panels = json.loads(DASHBOARD.read_text())["panels"]
    found = {p["title"]: [t["expr"] for t in p.get("targets", [])] for p in panels}
    return {title: exprs for title, exprs in found.items() if any("Audit" in e for e in exprs)}


def _exported_audit_metrics() -> set[str]:
    """Every series name the audit exports (handlers/audit/metrics.py), histograms with their suffixes."""
    from handlers.audit.metrics import FAITHFULNESS_SECONDS, OVERHEAD_SECONDS

    histograms = [DRIFT_METRICS["faithfulness"], DRIFT_METRICS["top10_mass"], OVERHEAD_SECONDS, FAITHFULNESS_SECONDS]
    plain = [*AuditMetrics.NAMES.values(), DRIFT_METRICS["top_class"], DRIFT_METRICS["floor"], DRIFT_METRICS["shift"]]
    return set(plain) | {f"{name}_{suffix}" for name in histograms for suffix in ("bucket", "sum", "count")}


def _grafana_to_promql(expression: str, model: str = ".*") -> str:
    return expression.replace("$model", model).replace("$__rate_interval", "2m")


def test_dashboard_drift_and_sink_panels_query_exported_metrics_and_parse(tmp_path: Path) -> None:
    """Every drift signal and sink counter has a panel; every Audit* name a panel queries is one the audit
    exports; promtool parses every audit panel's expression (as a recording rule)."""
    from test_prometheus import promql_metric_names

    panels = _audit_panels()
    queried = {name for exprs in panels.values() for e in exprs for name in promql_metric_names(e)}
    exported = _exported_audit_metrics()
    assert {n for n in queried if n.startswith("Audit")} <= exported, {n for n in queried if n.startswith("Audit")} - exported
    wanted = {f"{DRIFT_METRICS['faithfulness']}_bucket", f"{DRIFT_METRICS['top10_mass']}_bucket",
              DRIFT_METRICS["top_class"], DRIFT_METRICS["floor"], DRIFT_METRICS["shift"], *AuditMetrics.NAMES.values()}  # fmt: skip
    assert wanted <= queried, wanted - queried
    promtool = _promtool()
    rules = [{"record": f"dashboard:audit_{i}", "expr": _grafana_to_promql(e)}
             for i, e in enumerate(e for exprs in panels.values() for e in exprs)]  # fmt: skip
    (tmp_path / "panels.yaml").write_text(yaml.safe_dump({"groups": [{"name": "panels", "rules": rules}]}))
    checked = subprocess.run([promtool, "check", "rules", str(tmp_path / "panels.yaml")], capture_output=True, text=True)
    assert checked.returncode == 0 and f"SUCCESS: {len(rules)} rules found" in checked.stdout, checked.stdout + checked.stderr


def test_dashboard_class_share_panels_show_the_drift_the_alert_fires_on(tmp_path: Path) -> None:
    """The share and shift panels on the alert test's series (model m: class_6 for a day, then class_1 only):
    an hour after the change class_1 holds the whole share, and both classes' shares moved by 1 from the day
    before (the threshold panel: 0.2)."""
    promtool = _promtool()
    panels = _audit_panels()
    share = _grafana_to_promql(panels["Share of audited top-1 classes (last hour)"][0], model="m")
    shift, threshold = (_grafana_to_promql(e, model="m") for e in panels["Class share shift: last hour against the day before"])
    day = 1500
    series = [
        {"series": 'AuditTopClass{ModelName="m",Class="class_6"}', "values": f"0+10x{day} {10 * day}+0x120"},
        {"series": 'AuditTopClass{ModelName="m",Class="class_1"}', "values": f"0+0x{day} 0+10x120"},
        {"series": 'AuditTopClass{ModelName="steady",Class="a"}', "values": f"0+7x{day + 121}"},
        {"series": 'AuditDriftShareShift{ModelName="m"}', "values": f"0.2x{day + 121}"},
    ]
    at = f"{day + 60}m"  # the day before: exactly the day of class_6
    tests = {"rule_files": [], "evaluation_interval": "1m", "tests": [{"interval": "1m", "input_series": series, "promql_expr_test": [
        {"expr": share, "eval_time": at, "exp_samples": [{"labels": '{ModelName="m",Class="class_1"}', "value": 1},
                                                         {"labels": '{ModelName="m",Class="class_6"}', "value": 0}]},
        {"expr": shift, "eval_time": at, "exp_samples": [{"labels": '{ModelName="m",Class="class_1"}', "value": 1},
                                                         {"labels": '{ModelName="m",Class="class_6"}', "value": 1}]},
        {"expr": threshold, "eval_time": at, "exp_samples": [{"labels": '{ModelName="m"}', "value": 0.2}]},
        {"expr": share, "eval_time": f"{day - 10}m", "exp_samples": [{"labels": '{ModelName="m",Class="class_1"}', "value": 0},
                                                                     {"labels": '{ModelName="m",Class="class_6"}', "value": 1}]},
    ]}]}  # fmt: skip
    (tmp_path / "tests.yaml").write_text(yaml.safe_dump(tests))
    result = subprocess.run([promtool, "test", "rules", str(tmp_path / "tests.yaml")], capture_output=True, text=True)
    assert result.returncode == 0, textwrap.shorten(result.stdout + result.stderr, 3000)

"""The audit's faithfulness options (remove_top, ROAD), the endpoint a record names, and the report's
columns and command line (default database, unknown model), in-process."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_audit import REPO, call, make_handler, rows

from cam_engine.metrics import ROADMostRelevantFirst
from cam_engine.targets import ClassifierOutputTarget
from handlers.audit import remove_top_pixels
from handlers.audit.report import READING_FAITHFULNESS, load_records, render_report
from handlers.audit.sinks import COLUMNS, SqliteSink
from handlers.config import ConfigError, HandlerConfig
from handlers.serving.base import decode_image
from handlers.serving.preprocess import preprocess
from tests.helpers.inputs import encode, square_image

BASE = {"architecture": "resnet18", "target_layers": ["layer4"], "num_classes": 3}


def test_faithfulness_option_keeps_true_as_remove_top_and_offers_road() -> None:
    def parsed(value):
        return HandlerConfig.from_dict({**BASE, "audit": {"faithfulness": value}}).audit.faithfulness

    assert (parsed(True), parsed(False), parsed("ROAD"), parsed("remove_top")) == ("remove_top", False, "road", "remove_top")
    assert HandlerConfig.from_dict(BASE).audit.faithfulness is False
    with pytest.raises(ConfigError, match=r"handler\.audit\.faithfulness.*remove_top, road, got 'deletion'"):
        parsed("deletion")


@pytest.fixture(scope="module")
def road_handler(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("road")
    handler = make_handler(root / "model", {"faithfulness": "road", "directory": str(root / "audit")}, name="tiny_road")
    yield handler, root / "audit" / "audit.sqlite3"
    handler.audit.close()


def test_road_faithfulness_is_the_confidence_drop_after_roads_imputation(road_handler) -> None:
    """The record's numbers against ROAD called directly (same noise seed) on the same input and CAM."""
    handler, db = road_handler
    image = encode(square_image(50, 70, (10, 20, 40, 50), seed=3))
    torch.manual_seed(123)  # the imputer's noise is the only random draw of the request
    call(handler, [image], [True], bodies=[{"image": base64.b64encode(image).decode(), "targets": [3]}])
    assert handler.audit.flush()
    record = next(r for r in rows(db) if r["input_sha256"] == hashlib.sha256(image).hexdigest())
    x, _ = preprocess(decode_image(image, 10**8), handler.config.preprocessing)
    x = x[None]
    cam = handler.cams["gradcam"].run(x, [[ClassifierOutputTarget(3)]]).cams  # [1, 64, 64]
    torch.manual_seed(123)
    imputed = ROADMostRelevantFirst(percentile=80).perturb(x, cam)
    with torch.inference_mode():
        before = torch.softmax(handler.model(x), -1)[0]
        after = torch.softmax(handler.model(imputed), -1)[0]
        masked = torch.softmax(handler.model(remove_top_pixels(x, cam)), -1)[0, 3].item()
    faith = json.loads(record["explanations"])[0]["faithfulness"]
    assert faith["perturbation"] == "road" and faith["basis"] == "softmax"
    assert faith["before"] == pytest.approx(before[3].item(), abs=1e-4)
    assert faith["after"] == pytest.approx(after[3].item(), abs=1e-4)
    assert abs(faith["after"] - masked) > 1e-4  # imputed, not the mean colour
    assert record["faithfulness"] == pytest.approx(before[3].item() - after[3].item(), abs=2e-4)
    top = int(after.argmax())
    assert faith["after_top"] == {"index": top, "label": f"class_{top}", "score": pytest.approx(after[top].item(), abs=1e-4)}
    predicted = [p["index"] for p in json.loads(record["predictions"])]
    assert [shift["index"] for shift in faith["shifts"]] == predicted and len(predicted) == 3
    for shift in faith["shifts"]:  # where the probability went, class by class
        assert shift["before"] == pytest.approx(before[shift["index"]].item(), abs=1e-4)
        assert shift["after"] == pytest.approx(after[shift["index"]].item(), abs=1e-4)
    assert record["faithfulness_ms"] > 0


def test_records_name_the_endpoint_not_only_whether_explanations_were_returned(road_handler) -> None:
    """/explanations, /predictions, and /predictions asking for explanations in its options."""
    handler, db = road_handler
    images = [encode(square_image(40, 40, (5, 5, 20, 20), seed=s)) for s in (21, 22, 23)]
    bodies = [images[0], images[1], {"image": base64.b64encode(images[2]).decode(), "explain": True}]
    call(handler, images, [True, False, False], bodies=bodies)
    assert handler.audit.flush()
    by_hash = {r["input_sha256"]: r for r in rows(db)}
    found = [by_hash[hashlib.sha256(i).hexdigest()] for i in images]
    assert [(r["endpoint"], r["explained"]) for r in found] == [("explanations", 1), ("predictions", 0), ("predictions", 1)]


def test_a_database_from_before_the_endpoint_column_gets_it(tmp_path: Path) -> None:
    old_columns = [c for c in COLUMNS if c != "endpoint"]
    connection = sqlite3.connect(tmp_path / "audit.sqlite3")
    connection.execute(f"CREATE TABLE audit_records (id INTEGER PRIMARY KEY, {', '.join(old_columns)})")
    connection.commit()
    connection.close()
    sink = SqliteSink(tmp_path)
    sink.open()
    sink.close()
    connection = sqlite3.connect(tmp_path / "audit.sqlite3")
    columns = [row[1] for row in connection.execute("PRAGMA table_info(audit_records)")]
    connection.close()
    assert columns[-1] == "endpoint" and columns.count("endpoint") == 1


# ------------------------------------------------------------------------------------------------ report
def test_report_columns_and_how_to_read_faithfulness(road_handler) -> None:
    handler, db = road_handler
    records = load_records(db=db)
    assert records
    page = render_report(records, db.parent)
    header = re.search(r"<thead>(.*?)</thead>", page, re.S).group(1)
    columns = re.findall(r"<th[^>]*>(.*?)</th>", header)
    assert "endpoint" in columns and "entropy" not in columns and "top-10% mass" in columns
    assert "faithfulness" in columns
    body = re.search(r"<tbody>(.*?)</tbody>", page, re.S).group(1)
    cells = [re.findall(r"<td[^>]*>(.*?)</td>", row) for row in re.findall(r"<tr class=\"record\".*?</tr>", body, re.S)]
    assert len(cells) == len(records)
    position = columns.index("endpoint")
    assert sorted({row[position] for row in cells}) == ["/explanations", "/predictions"]
    scored = [row[columns.index("faithfulness")] for row in cells if "road" in row[columns.index("faithfulness")]]
    assert scored and all("after: class_" in cell for cell in scored)
    assert all(re.search(r"class_\d \d\.\d\d\u2192\d\.\d\d", cell) for cell in scored)  # the sibling that moved most
    assert "Negative: the target gained probability" in READING_FAITHFULNESS and "sibling" in READING_FAITHFULNESS
    assert 'id="reading-faithfulness"' in page


def _report(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if k not in ("CAM_AUDIT_DIR", "LOG_LOCATION")}
    environment.update(env, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "handlers.audit", "report", *args], cwd=cwd, env=environment,
                          capture_output=True, text=True, timeout=300)  # fmt: skip


def test_report_finds_the_database_make_serve_writes_and_lists_models(road_handler, tmp_path: Path) -> None:
    """`make serve` runs TorchServe with LOG_LOCATION=<checkout>/logs: records land in logs/audit/."""
    _, db = road_handler
    served = tmp_path / "checkout"
    (served / "logs" / "audit").mkdir(parents=True)
    source, copy = sqlite3.connect(db), sqlite3.connect(served / "logs" / "audit" / "audit.sqlite3")
    source.backup(copy)  # with what is still in the WAL
    source.close()
    copy.close()
    done = _report(["--out", str(tmp_path / "a.html")], cwd=served, env={})
    assert done.returncode == 0, done.stderr
    assert f"from {served.resolve() / 'logs' / 'audit' / 'audit.sqlite3'}" in done.stdout
    total = len(load_records(db=db))
    assert f"{total} records" in done.stdout and (tmp_path / "a.html").is_file()
    missing = _report(["--model", "resnet50", "--out", str(tmp_path / "b.html")], cwd=served, env={})
    assert missing.returncode == 1 and not (tmp_path / "b.html").exists()
    assert f"holds no records of model 'resnet50'; it holds: tiny_road ({total} records)" in missing.stderr
    nowhere = tmp_path / "empty"
    nowhere.mkdir()
    lost = _report([], cwd=nowhere, env={"CAM_AUDIT_DIR": str(tmp_path / "none")})
    if not Path("/tmp/torchserve-cam-audit/audit.sqlite3").exists() and not (REPO / "logs/audit/audit.sqlite3").exists():
        assert lost.returncode == 1 and "no audit database found; looked at:" in lost.stderr
        assert str(tmp_path / "none" / "audit.sqlite3") in lost.stderr and str(nowhere / "logs" / "audit") in lost.stderr

"""Prediction auditing in-process: config, summary maths, faithfulness, sinks, shutdown, the HTML report.

The report test opens the rendered page in headless Chromium (Debian's ``chromium``, which ``make test``
installs when missing) through Playwright, counts its rows, applies the filters and takes a screenshot.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import math
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from PIL import Image

from cam_engine.targets import ClassifierOutputTarget
from handlers.audit import Auditor, heatmap_summary, remove_top_pixels
from handlers.config import ConfigError, HandlerConfig
from handlers.serving.base import decode_image
from handlers.serving.preprocess import preprocess
from handlers.tasks.classifier import ClassifierHandler
from tests.helpers.browser import headless_chromium, require_chromium
from tests.helpers.fake_context import FakeContext  # noqa: E402
from tests.helpers.inputs import encode, square_image  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
LABELS = [f"class_{i}" for i in range(10)]


def make_handler(directory: Path, audit: dict, name: str = "tiny") -> ClassifierHandler:
    config = {
        "batchSize": 8,
        "handler": {
            "architecture": "timm/test_efficientnet",
            "labels": LABELS,
            "preprocessing": {"input_size": [64, 64]},
            "target_layers": ["bn2"],
            "top_k": 3,
            "audit": {"enabled": True, **audit},
        },
    }
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "model-config.yaml").write_text(yaml.safe_dump(config))
    torch.manual_seed(0)
    handler = ClassifierHandler()
    handler.initialize(FakeContext(directory, name))
    return handler


def call(handler: ClassifierHandler, images: list[bytes], explain: list[bool], bodies: list | None = None) -> list[dict]:
    context = FakeContext(Path(handler.context.system_properties["model_dir"]), handler.model_name, explain)
    items = [{"body": body if isinstance(body, dict) else bytearray(body)} for body in (bodies or images)]
    answers = [json.loads(r) for r in handler.handle(items, context)]
    assert context.status == {}, context.status
    return answers


def rows(db: Path) -> list[dict]:
    connection = sqlite3.connect(db)
    connection.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in connection.execute("SELECT * FROM audit_records ORDER BY id")]
    finally:
        connection.close()


# ------------------------------------------------------------------------------------------------ config
def test_audit_config_is_validated_like_the_rest() -> None:
    base = {"architecture": "resnet18", "target_layers": ["layer4"], "num_classes": 3}
    assert HandlerConfig.from_dict(base).audit.enabled is False
    config = HandlerConfig.from_dict({**base, "audit": {"enabled": True, "sample_rate": 0.25, "sink": "STDOUT"}}).audit
    assert (config.enabled, config.sample_rate, config.sink, config.store_inputs) == (True, 0.25, "stdout", False)
    bad = {
        "sampel_rate": "handler.audit.sampel_rate: unknown key; did you mean 'sample_rate'?",
        "sample_rate": "handler.audit.sample_rate: must be a number in [0, 1]",
        "sink": "handler.audit.sink: must be one of sqlite, stdout, postgres",
        "store_heatmaps": "handler.audit.store_heatmaps: must be true or false",
    }
    values = {"sampel_rate": 1, "sample_rate": 1.5, "sink": "kafka", "store_heatmaps": "yes"}
    for key, message in bad.items():
        with pytest.raises(ConfigError, match=re.escape(message)):
            HandlerConfig.from_dict({**base, "audit": {key: values[key]}})
    with pytest.raises(ConfigError, match="handler.audit.store_inputs"):
        HandlerConfig.from_dict({**base, "audit": {"sink": "stdout", "store_inputs": True}})




# ------------------------------------------------------------------------------------------------ maths
def test_heatmap_summary_against_hand_computed_values() -> None:
    heatmap = torch.zeros(2, 5)
    heatmap[0, 4], heatmap[1, 2] = 1.0, 3.0
    summary = heatmap_summary(heatmap)
    assert (summary["peak_x"], summary["peak_y"]) == (2, 1)
    assert summary["top10_mass"] == pytest.approx(0.75)  # the top ceil(0.1 * 10) = 1 pixel holds 3 of 4
    expected = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75)) / math.log(10)
    assert summary["entropy"] == pytest.approx(expected, abs=1e-6)
    assert heatmap_summary(torch.ones(4, 4))["entropy"] == pytest.approx(1.0)  # uniform
    flat = heatmap_summary(torch.zeros(3, 3))
    assert flat["top10_mass"] is None and flat["entropy"] is None


def test_remove_top_pixels_zeroes_exactly_the_hottest_fifth() -> None:
    generator = torch.Generator().manual_seed(0)
    cams = torch.rand(2, 10, 10, generator=generator)
    inputs = torch.rand(2, 3, 10, 10, generator=generator) + 1.0  # never 0 before
    out = remove_top_pixels(inputs, cams)
    for image in range(2):
        removed = (out[image] == 0).all(dim=0)
        assert int(removed.sum()) == 20 and (out[image] == 0).sum() == 60
        threshold = cams[image].flatten().topk(20).values.min()
        assert torch.equal(removed, cams[image] >= threshold)
        assert torch.equal(out[image][:, ~removed], inputs[image][:, ~removed])


def test_sampling_follows_the_rate() -> None:
    handler = SimpleNamespace(config=HandlerConfig.from_dict(
        {"architecture": "x", "target_layers": ["a"], "audit": {"enabled": False, "sample_rate": 0.25}}))
    auditor = Auditor(handler)
    auditor.enabled = True  # sampling only: no sink
    import random

    auditor.rng = random.Random(0)
    requests = [SimpleNamespace(explain=False, aug_smooth=True, audited=False) for _ in range(2000)]
    auditor.sample(requests)
    share = sum(r.audited for r in requests) / len(requests)
    assert 0.22 < share < 0.28
    assert all(not r.aug_smooth for r in requests if r.audited)


# ------------------------------------------------------------------------------------------------ handler
@pytest.fixture(scope="module")
def audited(tmp_path_factory: pytest.TempPathFactory) -> tuple[ClassifierHandler, Path]:
    root = tmp_path_factory.mktemp("audited")
    handler = make_handler(root / "model", {"faithfulness": True, "store_inputs": True, "directory": str(root / "audit")})
    yield handler, root / "audit"
    handler.audit.close()


def test_faithfulness_is_the_confidence_drop_of_a_manual_forward(audited) -> None:
    handler, directory = audited
    image = encode(square_image(50, 70, (10, 20, 40, 50), seed=3))
    other = encode(square_image(50, 70, (5, 5, 25, 25), seed=4))
    (answer, _) = call(handler, [image, other], [True, False],
                       bodies=[{"image": base64.b64encode(image).decode(), "targets": [3]}, other])
    assert handler.audit.flush()
    record = next(r for r in rows(directory / "audit.sqlite3") if r["input_sha256"] == hashlib.sha256(image).hexdigest())
    x, _ = preprocess(decode_image(image, 10**8), handler.config.preprocessing)
    x = x[None]
    cam = handler.cams["gradcam"].run(x, [[ClassifierOutputTarget(3)]]).cams  # [1, 64, 64]
    with torch.inference_mode():
        before = torch.softmax(handler.model(x), -1)[0, 3].item()
        after = torch.softmax(handler.model(remove_top_pixels(x, cam)), -1)[0, 3].item()
    faith = json.loads(record["explanations"])[0]["faithfulness"]
    assert faith["before"] == pytest.approx(before, abs=1e-4) and faith["before"] == pytest.approx(
        next(p["score"] for p in answer["predictions"] if p["index"] == 3) if any(p["index"] == 3 for p in answer["predictions"]) else before, abs=1e-4)
    assert faith["after"] == pytest.approx(after, abs=1e-4)
    assert record["faithfulness"] == pytest.approx(before - after, abs=2e-4)
    assert record["faithfulness_ms"] > 0 and json.loads(record["targets"]) == [{"target": 3, "label": "class_3"}]


def test_records_of_other_tasks_name_their_results_and_subjects(tmp_path: Path) -> None:
    """A detector's and an embedding model's audit records carry the task's own results (detections,
    similarities) and what each heatmap explains (the box, the concept), not empty predictions."""
    from handlers.tasks.detection import DetectionHandler
    from handlers.tasks.embedding import EmbeddingHandler

    image = encode(square_image(90, 150, (20, 80, 70, 140)))
    cases = [
        (DetectionHandler, {
            "task": "detection", "architecture": "fasterrcnn_mobilenet_v3_large_fpn", "labels": ["bg", "a", "b", "c"],
            "model_options": {"box_score_thresh": 0.0, "representation_size": 64},
            "preprocessing": {"input_size": [128, 128], "resize": "letterbox", "mean": [0, 0, 0], "std": [1, 1, 1]},
            "target_layers": ["backbone"], "reshape": "fasterrcnn", "methods": ["eigencam"],
            "detection": {"score_threshold": 0.0, "explain_top": 2},
        }, {}),
        (EmbeddingHandler, {
            "task": "embedding", "architecture": "mobilenet_v3_small_embedding", "preprocessing": {"input_size": [64, 64]},
            "target_layers": ["features.-1"], "methods": ["gradcam"], "embedding": {"concepts": {}},
        }, {"references": [base64.b64encode(image).decode()]}),
    ]  # fmt: skip
    for handler_class, section, extra in cases:
        directory = tmp_path / handler_class.__name__
        section = {**section, "audit": {"enabled": True, "top_k": 3, "directory": str(directory / "audit")}}
        (directory / "model").mkdir(parents=True)
        (directory / "model" / "model-config.yaml").write_text(yaml.safe_dump({"handler": section}))
        torch.manual_seed(0)
        handler = handler_class()
        handler.initialize(FakeContext(directory / "model", "task"))
        try:
            (answer,) = call(handler, [], [True], bodies=[{"image": base64.b64encode(image).decode(), **extra}])
            assert handler.audit.flush()
        finally:
            handler.audit.close()
        (record,) = rows(directory / "audit" / "audit.sqlite3")
        targets = json.loads(record["targets"])
        if handler_class is DetectionHandler:
            best = answer["detections"][0]
            assert json.loads(record["predictions"]) == answer["detections"][:3]
            assert (record["top_index"], record["top_label"], record["top_score"]) == (best["class"], best["label"], best["score"])
            assert [t["target"] for t in targets] == [0, 1]  # the explained boxes
            assert targets[1]["box"] == answer["detections"][1]["box"] and targets[1]["label"] == answer["detections"][1]["label"]
        else:
            assert json.loads(record["predictions"]) == answer["similarities"]
            assert (record["top_label"], record["top_score"]) == ("references", answer["similarities"][0]["similarity"])
            assert targets == [{"target": "references", "label": None, "kind": "similarity"}]


def test_stdout_sink_prints_one_json_line_per_record(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    handler = make_handler(tmp_path / "model", {"sink": "stdout"}, name="tiny_stdout")
    images = [encode(square_image(30, 40, (2, 2, 12, 12), seed=i)) for i in range(3)]
    try:
        capsys.readouterr()
        call(handler, images, [True, False, True])
        assert handler.audit.flush()
        lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith('{"type":"cam_audit_record"')]
    finally:
        handler.audit.close()
    assert len(lines) == 3
    records = [json.loads(line) for line in lines]
    assert sorted(r["input_sha256"] for r in records) == sorted(hashlib.sha256(i).hexdigest() for i in images)
    for record in records:
        assert record["model"] == "tiny_stdout" and "input_path" not in record
        (entry,) = record["explanations"]
        picture = Image.open(io.BytesIO(base64.b64decode(entry["heatmap_png"])))
        assert picture.format == "PNG" and picture.size == (40, 30)
    assert not list(tmp_path.rglob("*.sqlite3"))


def test_unwritable_directory_and_failing_writes_never_fail_a_prediction(tmp_path: Path, caplog) -> None:
    blocker = tmp_path / "blocker"
    blocker.write_text("not a directory")
    with caplog.at_level("ERROR", logger="handlers.audit"):
        handler = make_handler(tmp_path / "model", {"directory": str(blocker / "audit")}, name="tiny_blocked")
    assert "cannot be opened" in caplog.text and str(blocker / "audit") in caplog.text
    images = [encode(square_image(30, 30, (2, 2, 12, 12), seed=i)) for i in range(3)]
    answers = call(handler, images, [True, False, True])
    assert all(a["predictions"] for a in answers) and "explanations" in answers[0]
    assert handler.audit.flush()
    counts = handler.audit.writer.counters()
    handler.audit.close()
    assert counts == {"committed": 0, "write_errors": 3, "dropped": 0}


def test_a_disk_full_error_mid_write_is_counted(audited, monkeypatch) -> None:
    handler, directory = audited
    before = handler.audit.writer.counters()

    def full(records):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(handler.audit.writer.sink, "write", full)
    answers = call(handler, [encode(square_image(30, 30, (2, 2, 12, 12), seed=9))] * 2, [False, False])
    assert all(a["predictions"] for a in answers)
    assert handler.audit.flush()
    after = handler.audit.writer.counters()
    assert after["write_errors"] - before["write_errors"] == 2 and after["committed"] == before["committed"]
    monkeypatch.undo()
    handler.audit.writer._last_open_try = -math.inf  # let the writer reopen at once
    call(handler, [encode(square_image(30, 30, (2, 2, 12, 12), seed=10))], [False])
    assert handler.audit.flush() and handler.audit.writer.counters()["committed"] == after["committed"] + 1


def test_sigterm_drains_the_queue_before_the_process_dies(tmp_path: Path) -> None:
    """A worker that gets SIGTERM with records still queued commits them, then dies of the signal."""
    out = tmp_path / "records.txt"
    script = textwrap.dedent(f"""
        import os, signal, time
        from handlers.audit import AuditWriter, PendingRecord
        class SlowSink:
            name = "slow"
            def open(self): pass
            def close(self): pass
            def write(self, records):
                time.sleep(0.05)
                with open({str(out)!r}, "a") as f:
                    f.writelines(r.fields["n"] + "\\n" for r in records)
        writer = AuditWriter(SlowSink(), 100)
        for n in range(40):
            writer.submit(PendingRecord({{"n": str(n)}}, b""))
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(30)
        print("survived SIGTERM")
    """)
    env = {**os.environ, "PYTHONPATH": str(REPO)}  # this checkout's handlers
    completed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env)
    assert completed.returncode == -signal.SIGTERM, completed.stderr  # the signal still kills it
    assert sorted(int(n) for n in out.read_text().split()) == list(range(40))


# ------------------------------------------------------------------------------------------------ report
def test_html_report_renders_in_headless_chromium(tmp_path: Path) -> None:
    require_chromium()
    handler = make_handler(tmp_path / "model", {"faithfulness": True, "store_inputs": True,
                                                "directory": str(tmp_path / "audit")}, name="tiny_report")
    classifier = handler.model.get_classifier()
    # Three batches whose top-1 class is forced through the classifier bias: class_1 (confident),
    # class_4 (middling) and class_7 (unsure), so the filters have something to separate.
    for batch, (index, bias) in enumerate([(1, 12.0), (4, 2.0), (7, 0.7)]):
        with torch.no_grad():
            classifier.bias.zero_()
            classifier.bias[index] = bias
        images = [encode(square_image(48, 64, (5, 5 + 8 * i, 30, 25 + 8 * i), seed=10 * batch + i)) for i in range(4)]
        call(handler, images, [i % 2 == 0 for i in range(4)])
    assert handler.audit.flush()
    handler.audit.close()
    db = tmp_path / "audit" / "audit.sqlite3"
    records = rows(db)
    assert len(records) == 12
    report = tmp_path / "report.html"
    completed = subprocess.run(
        [sys.executable, "-m", "handlers.audit", "report", "--since", "1h", "--model", "tiny_report",
         "--db", str(db), "--out", str(report)],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr
    assert "12 records" in completed.stdout
    page_text = report.read_text().replace('xmlns="http://www.w3.org/2000/svg"', "")
    assert "http://" not in page_text and "https://" not in page_text  # no external asset
    by_label = {label: sum(r["top_label"] == label for r in records) for label in ("class_1", "class_4", "class_7")}
    assert by_label == {"class_1": 4, "class_4": 4, "class_7": 4}
    confident = sum(r["top_score"] >= 0.9 for r in records)
    assert 0 < confident < 12
    with headless_chromium() as browser:
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        fetched: list[str] = []
        page.on("request", lambda request: fetched.append(request.url))
        page.goto(report.as_uri())
        visible = "#records tbody tr.record:visible"
        assert page.locator(visible).count() == 12
        assert page.locator("#shown-count").inner_text() == "12 of 12 records shown"
        sizes = page.eval_on_selector_all("img.thumb", "imgs => imgs.map(i => [i.complete, i.naturalWidth, i.alt])")
        assert len(sizes) == 12 and all(done and width > 0 and alt == "overlay" for done, width, alt in sizes)
        assert page.locator("#mix-plot rect.mix-bar").count() >= 3
        assert page.locator("#faithfulness-plot circle.faithfulness-point").count() == 12
        page.select_option("#class-filter", "class_4")
        assert page.locator(visible).count() == 4
        assert set(page.locator(visible).evaluate_all("rs => rs.map(r => r.dataset.label)")) == {"class_4"}
        page.select_option("#class-filter", "")
        page.fill("#min-confidence", "0.9")
        assert page.locator(visible).count() == confident
        assert page.locator("#shown-count").inner_text() == f"{confident} of 12 records shown"
        page.fill("#min-confidence", "0")
        page.screenshot(path=str(tmp_path / "report.png"), full_page=True)
        if os.environ.get("AUDIT_REPORT_SCREENSHOT"):
            shutil.copy(tmp_path / "report.png", os.environ["AUDIT_REPORT_SCREENSHOT"])
        assert all(url.startswith(("file:", "data:")) for url in fetched), fetched
    assert (tmp_path / "report.png").stat().st_size > 10_000

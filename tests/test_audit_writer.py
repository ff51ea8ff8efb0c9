"""The audit's split between the request path and the writer thread: the request path queues the model-input
CAMs (on the CPU) with the fields it knows; the writer maps and summarises them, encodes the PNGs and observes
the drift metrics once per record, before the commit that ``strict`` answers wait for."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from test_audit import make_handler, rows  # noqa: E402
from test_audit_drift import FakeCache  # noqa: E402

from cam_engine.targets import ClassifierOutputTarget
from handlers.audit import heatmap_summary
from handlers.audit.metrics import DRIFT_METRICS, AuditMetrics
from handlers.serving.base import decode_image
from handlers.serving.preprocess import preprocess, to_source
from tests.helpers.fake_context import FakeContext
from tests.helpers.inputs import encode, square_image

KINDS = SimpleNamespace(COUNTER="counter", HISTOGRAM="histogram", GAUGE="gauge")


def _handle(handler, images: list[bytes], explain: list[bool]) -> tuple[list[dict], FakeContext]:
    context = FakeContext(Path(handler.context.system_properties["model_dir"]), handler.model_name, explain)
    answers = handler.handle([{"body": bytearray(image)} for image in images], context)
    return [json.loads(answer) for answer in answers], context


@pytest.mark.parametrize("durability", ["async", "strict"])
def test_the_writer_summarises_and_observes_each_record_once(tmp_path: Path, durability: str) -> None:
    directory = tmp_path / "audit"
    handler = make_handler(tmp_path / "model", {"directory": str(directory), "durability": durability,
                                                "faithfulness": True}, name=f"tiny_writer_{durability}")  # fmt: skip
    cache = FakeCache()
    handler.audit.metrics = AuditMetrics((cache, KINDS), handler.model_name, "sqlite", handler.audit.config.drift)
    queued: list[tuple] = []  # what the request path handed over, seen as the writer takes it
    prepare = handler.audit.writer.prepare

    def spy(record) -> None:
        queued.append((record.fields["record_id"], "top10_mass" in record.fields, record.cams.device.type,
                       tuple(record.cams.shape), record.pngs))  # fmt: skip
        prepare(record)

    handler.audit.writer.prepare = spy
    images = [encode(square_image(40 + 10 * i, 70, (5, 10 + 8 * i, 30, 40 + 8 * i), seed=i)) for i in range(3)]
    try:
        for _ in range(2):
            answers, context = _handle(handler, images, [True, False, True])
            assert context.status == {} and all(a["predictions"] for a in answers)
        committed_when_answered = len(rows(directory / "audit.sqlite3"))
        assert handler.audit.flush()
    finally:
        handler.audit.close()
    if durability == "strict":
        assert committed_when_answered == 6
    # the request path queued no id, no summary, no PNG: the model-input CAMs on the CPU, one per target
    assert queued == [(None, False, "cpu", (1, 64, 64), None)] * 6
    records = rows(directory / "audit.sqlite3")
    assert len(records) == 6 and len({r["record_id"] for r in records}) == 6
    # each summary is heatmap_summary of the record's CAM mapped onto its image, recomputed here
    for record, image in zip(records[:3], images):
        x, geometry = preprocess(decode_image(image, 10**8), handler.config.preprocessing)
        cam = handler.cams["gradcam"].run(x[None], [[ClassifierOutputTarget(record["top_index"])]]).cams
        expected = heatmap_summary(to_source(cam, geometry)[0])
        assert (record["peak_x"], record["peak_y"]) == (expected["peak_x"], expected["peak_y"])
        assert record["top10_mass"] == pytest.approx(expected["top10_mass"], abs=1e-3)
        explanation = json.loads(record["explanations"])[0]
        assert explanation["entropy"] == pytest.approx(expected["entropy"], abs=1e-3)
        assert explanation["heatmap_path"] == record["heatmap_path"]
        assert (directory / record["heatmap_path"]).read_bytes().startswith(b"\x89PNG")
        assert "faithfulness" in explanation  # the request path's check, in the same explanation
    # the drift metrics: one observation per record, of the values committed
    observed = {key: sorted(e[1] for e in cache.log if e[0] == DRIFT_METRICS[key]) for key in ("top10_mass", "faithfulness")}
    assert observed["top10_mass"] == pytest.approx(sorted(r["top10_mass"] for r in records), abs=1e-6)
    assert observed["faithfulness"] == pytest.approx(sorted(r["faithfulness"] for r in records), abs=1e-6)
    assert sum(e[1] for e in cache.log if e[0] == DRIFT_METRICS["top_class"]) == 6


def test_a_record_the_writer_cannot_finish_is_counted_and_strict_refuses_its_answer(tmp_path: Path) -> None:
    directory = tmp_path / "audit"
    handler = make_handler(tmp_path / "model", {"directory": str(directory), "durability": "strict"},
                           name="tiny_writer_failing")  # fmt: skip
    cache = FakeCache()
    handler.audit.metrics = AuditMetrics((cache, KINDS), handler.model_name, "sqlite", handler.audit.config.drift)
    prepare = handler.audit.writer.prepare
    seen = []

    def fails_once(record) -> None:
        seen.append(record)
        if len(seen) == 2:
            raise RuntimeError("summary failed")
        prepare(record)

    handler.audit.writer.prepare = fails_once
    images = [encode(square_image(48, 48, (5, 5, 30, 30), seed=i)) for i in range(3)]
    try:
        answers, context = _handle(handler, images, [False, False, False])
        assert handler.audit.flush()
        counts = handler.audit.writer.counters()
    finally:
        handler.audit.close()
    refused = [i for i, a in enumerate(answers) if a.get("type") == "AuditUnavailable"]
    assert len(refused) == 1 and context.status == {refused[0]: (503, "Service Unavailable")}
    assert counts == {"committed": 2, "write_errors": 1, "dropped": 0}
    assert len(rows(directory / "audit.sqlite3")) == 2
    assert len([e for e in cache.log if e[0] == DRIFT_METRICS["top10_mass"]]) == 2  # the lost record: none

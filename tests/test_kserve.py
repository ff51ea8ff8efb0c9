"""KServe v1 and v2 against a real TorchServe started with the shipped KServe config (ports moved to loopback).

The TorchServe here serves the session's small batching archive (batch 8, 300 ms) from the session's model
store, with ``deploy/kserve/config/config.properties`` as it ships; requests are built with KServe's own
client types (``kserve.InferRequest`` / ``InferInput``) where KServe has them, and v2 answers are read back
with ``kserve.InferResponse.from_rest``.
"""

from __future__ import annotations

import base64
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests

from model_store import serve
from tests.helpers.answers import post as _post
from tests.helpers.inputs import encode, square_image
from tests.helpers.serving import BATCH_MODEL

kserve = pytest.importorskip("kserve")

KSERVE_CONFIG = Path(__file__).resolve().parent.parent / "deploy" / "kserve" / "config" / "config.properties"
MODEL = BATCH_MODEL


@pytest.fixture(scope="module")
def kserve_server(server, tmp_path_factory):
    """A second TorchServe: the shipped KServe config, the session's model store, only the batching archive."""
    workdir = tmp_path_factory.mktemp("kserve")
    ports = {api: serve.free_port() for api in serve.PORT_VARIABLES}
    try:
        running = serve.start(workdir, server.workdir / "model_store", [MODEL], ports=ports, timeout=180,
                              base_config=KSERVE_CONFIG)  # fmt: skip
    except BaseException:
        serve.stop(workdir)
        raise
    yield running
    serve.stop(workdir)


def _png(seed: int, box=(20, 20, 60, 60), size=(96, 128)) -> bytes:
    return encode(square_image(*size, box, seed=seed))


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _native(srv, image: bytes, explain: bool = False, **options) -> dict:
    route = "explanations" if explain else "predictions"
    answer = _post(srv, f"{route}/{MODEL}", json={"image": _b64(image), **options})
    assert answer.status_code == 200, answer.text
    return answer.json()


def _same_prediction(got: dict, expected: dict) -> None:
    assert [p["label"] for p in got["predictions"]] == [p["label"] for p in expected["predictions"]]
    np.testing.assert_allclose([p["score"] for p in got["predictions"]],
                               [p["score"] for p in expected["predictions"]], atol=1e-4)  # fmt: skip


def test_v1_predict_answers_one_object_per_instance_with_errors_in_place(kserve_server):
    good = [_png(1), _png(2, box=(50, 70, 90, 120))]
    body = {"instances": [{"data": _b64(good[0])}, {"b64": _b64(b"not an image")}, {"data": _b64(good[1]), "top_k": 2},
                          {"data": "%%% not base64"}, {"data": _b64(good[0]), "method": "no-such-method"}]}  # fmt: skip
    answer = _post(kserve_server, f"v1/models/{MODEL}:predict", json=body)
    assert answer.status_code == 200, answer.text
    assert answer.headers["Content-Type"].startswith("application/json")
    predictions = answer.json()["predictions"]
    assert len(predictions) == 5 and all(isinstance(p, dict) for p in predictions)
    _same_prediction(predictions[0], _native(kserve_server, good[0]))
    _same_prediction(predictions[2], _native(kserve_server, good[1], top_k=2))
    assert len(predictions[2]["predictions"]) == 2
    assert predictions[1]["code"] == 415 and predictions[1]["type"] == "UnsupportedMediaType"
    assert predictions[3] == {"code": 400, "type": "InvalidInput", "message": "image is not valid base64"}
    assert predictions[4]["code"] == 400 and "no-such-method" in predictions[4]["message"]
    assert all(set(predictions[i]) == {"code", "type", "message"} for i in (1, 3, 4))


def test_v1_explain_gives_explanations_and_all_bad_answers_4xx(kserve_server):
    image = _png(3)
    answer = _post(kserve_server, f"v1/models/{MODEL}:explain",
                   json={"instances": [{"data": _b64(image), "targets": ["class_2", 5]}]})  # fmt: skip
    assert answer.status_code == 200, answer.text
    (explained,) = answer.json()["explanations"]
    native = _native(kserve_server, image, explain=True, targets=["class_2", 5])
    assert [e["target"] for e in explained["explanations"]] == [2, 5]
    assert [e["target"] for e in native["explanations"]] == [2, 5]
    assert explained["explanations"][0]["heatmap"]["width"] == 128
    bad = _post(kserve_server, f"v1/models/{MODEL}:predict", json={"instances": [{"data": _b64(b"GIF89a..")}]})
    assert bad.status_code == 415 and bad.json()["predictions"][0]["type"] == "UnsupportedMediaType"
    for envelope in ({"instances": []}, {"instances": "x"}, {"instances": [{"data": "aGk="}] * 40}):
        refused = _post(kserve_server, f"v1/models/{MODEL}:predict", json=envelope)
        assert refused.status_code in (400, 413) and set(refused.json()) == {"code", "type", "message"}, refused.text


def test_v2_infer_with_kserve_client_types(kserve_server):
    images = [_png(4), _png(5, box=(10, 60, 40, 120))]
    request = kserve.InferRequest(
        model_name=MODEL,
        infer_inputs=[kserve.InferInput(name="image", shape=[2], datatype="BYTES", data=[_b64(i) for i in images])],
        request_id="req-42",
        parameters={"top_k": 3},
    )
    body, json_length = request.to_rest()
    assert json_length is None
    answer = _post(kserve_server, f"v2/models/{MODEL}/infer", json=body)
    assert answer.status_code == 200, answer.text
    parsed = kserve.InferResponse.from_rest(answer.json())
    assert parsed.id == "req-42" and parsed.model_name == MODEL
    (output,) = parsed.outputs
    assert output.name == "image" and output.datatype == "BYTES" and output.shape == [2]
    results = [json.loads(x) for x in output.data]
    for image, result in zip(images, results):
        _same_prediction(result, _native(kserve_server, image, top_k=3))
        assert "explanations" not in result


def test_v2_explain_route_parameter_and_raw_bytes(kserve_server):
    image = _png(6)
    plain = {"id": "e1", "inputs": [{"name": "x", "shape": [1], "datatype": "BYTES", "data": [_b64(image)]}]}
    via_route = _post(kserve_server, f"v2/models/{MODEL}/explain", json=plain)
    assert via_route.status_code == 200, via_route.text
    via_parameter = _post(kserve_server, f"v2/models/{MODEL}/infer",
                          json={**plain, "parameters": {"explain": True, "targets": [1]}})  # fmt: skip
    for answer, targets in ((via_route, None), (via_parameter, [1])):
        result = json.loads(answer.json()["outputs"][0]["data"][0])
        assert result["explanations"], result
        if targets:
            assert [e["target"] for e in result["explanations"]] == targets
    # raw image bytes through the v2 binary data extension, as KServe's client encodes them
    tensor = kserve.InferInput(name="raw", shape=[1], datatype="BYTES")
    tensor.set_data_from_numpy(np.array([image], dtype=np.object_), binary_data=True)
    data, json_length = kserve.InferRequest(model_name=MODEL, infer_inputs=[tensor], request_id="bin").to_rest()
    answer = _post(kserve_server, f"v2/models/{MODEL}/infer", data=data,
                   headers={"Content-Type": "application/octet-stream",
                            "Inference-Header-Content-Length": str(json_length)})  # fmt: skip
    assert answer.status_code == 200, answer.text
    parsed = kserve.InferResponse.from_rest(answer.json())
    assert parsed.id == "bin"
    _same_prediction(json.loads(parsed.outputs[0].data[0]), _native(kserve_server, image))
    wrong = {"inputs": [{"name": "x", "shape": [1, 3], "datatype": "FP32", "data": [1.0, 2.0, 3.0]}]}
    refused = _post(kserve_server, f"v2/models/{MODEL}/infer", json=wrong)
    assert refused.status_code == 400 and "BYTES" in refused.json()["message"]


def test_concurrent_clients_of_both_protocols_share_batches_without_interference(kserve_server):
    """Twelve clients at once (batches of up to 8): each gets its own answers, bad ones their own errors."""
    images = [_png(10 + i, box=(5 * i, 8 * i, 5 * i + 30, 8 * i + 40)) for i in range(6)]
    expected = [_native(kserve_server, image) for image in images]

    def call(i: int):
        image = images[i % 6]
        if i % 3 == 0:
            answer = _post(kserve_server, f"v1/models/{MODEL}:predict",
                           json={"instances": [{"data": _b64(image)}, {"data": _b64(b"bad")}]})  # fmt: skip
            return i, answer.status_code, answer.json()["predictions"]
        if i % 3 == 1:
            body = {"id": f"c{i}", "inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": [_b64(image)]}]}
            answer = _post(kserve_server, f"v2/models/{MODEL}/infer", json=body)
            assert answer.json()["id"] == f"c{i}"
            return i, answer.status_code, [json.loads(answer.json()["outputs"][0]["data"][0])]
        answer = _post(kserve_server, f"predictions/{MODEL}", data=image)
        return i, answer.status_code, [answer.json()]

    with ThreadPoolExecutor(12) as pool:
        results = list(pool.map(call, range(12)))
    for i, status, answers in results:
        assert status == 200
        _same_prediction(answers[0], expected[i % 6])
        if i % 3 == 0:
            assert answers[1]["code"] == 415


def test_describe_reports_the_response_limit_read_from_the_served_config(kserve_server):
    answer = requests.get(f"{kserve_server.url('management')}/models/{MODEL}?customized=true",
                          headers=kserve_server.headers("management"), timeout=60)  # fmt: skip
    assert answer.status_code == 200, answer.text
    limit = answer.json()[0]["customizedMetadata"]
    limit = json.loads(limit) if isinstance(limit, str) else limit
    assert limit["max_response_size"]["bytes"] == 6553500
    assert limit["max_response_size"]["source"].startswith("max_response_size in ")

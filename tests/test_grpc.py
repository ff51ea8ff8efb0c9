"""gRPC against the session's real TorchServe, with a client generated from TorchServe's own ``inference.proto``
(tests/helpers/grpc_client.py): ``Predictions`` answers like HTTP (``explain`` and ``options`` input keys
included), ``StreamPredictions`` gets one final message, ``StreamPredictions2`` is refused, and neither streaming
call restarts or loses the worker."""

from __future__ import annotations

import json
import time

import pytest
import requests

from model_store import serve
from tests.helpers.inputs import encode, square_image
from tests.helpers.serving import BATCH_MODEL

grpc = pytest.importorskip("grpc")
pytest.importorskip("grpc_tools")

IMAGE = encode(square_image(96, 128, (20, 30, 60, 90), seed=3))


@pytest.fixture(scope="module")
def client(server):
    from tests.helpers.grpc_client import generate

    pb, pb_grpc = generate()
    port = serve.configured_grpc_ports(server.workdir)["grpc_inference_port"]
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    metadata = (("authorization", f"Bearer {server.keys['inference']}"),)
    yield pb, pb_grpc.InferenceAPIsServiceStub(channel), metadata
    channel.close()


def _worker(server) -> dict:
    answer = requests.get(f"{server.url('management')}/models/{BATCH_MODEL}", headers=server.headers("management"), timeout=30)
    (worker,) = answer.json()[0]["workers"]
    return worker


def _http(server, route: str, **options) -> dict:
    files = {"data": ("image.png", IMAGE, "image/png")}
    if options:
        files["options"] = (None, json.dumps(options), "application/json")
    answer = requests.post(f"{server.url()}/{route}/{BATCH_MODEL}", files=files, headers=server.headers(), timeout=120)
    assert answer.status_code == 200, answer.text
    return answer.json()


def _predict(client, timeout: float = 120, **inputs) -> dict:
    pb, stub, metadata = client
    reply = stub.Predictions(pb.PredictionsRequest(model_name=BATCH_MODEL, input=inputs), metadata=metadata, timeout=timeout)
    return json.loads(reply.prediction)


def test_predictions_answer_like_http_with_the_explain_and_options_input_keys(server, client):
    assert _predict(client, data=IMAGE) == _http(server, "predictions")
    explained = _predict(client, data=IMAGE, explain=b"true", options=json.dumps({"top_k": 1, "targets": [2]}).encode())
    assert explained == _http(server, "explanations", top_k=1, targets=[2])
    assert len(explained["predictions"]) == 1 and explained["explanations"][0]["target"] == 2
    assert explained["explanations"][0]["heatmap"]["width"] == 128
    refused = _predict(client, data=b"not an image")  # errors travel as the JSON error object, status OK
    assert refused["code"] == 415 and refused["type"] == "UnsupportedMediaType"


def test_stream_predictions_gets_one_final_message_and_keeps_the_worker(server, client):
    pb, stub, metadata = client
    before = _worker(server)
    request = pb.PredictionsRequest(model_name=BATCH_MODEL, input={"data": IMAGE})
    replies = list(stub.StreamPredictions(request, metadata=metadata, timeout=60))
    assert [json.loads(r.prediction) for r in replies] == [_http(server, "predictions")]
    after = _worker(server)
    assert (after["pid"], after["startTime"], after["status"]) == (before["pid"], before["startTime"], "READY")


def test_stream_predictions2_is_refused_and_leaves_the_worker_serving(server, client):
    pb, stub, metadata = client
    before = _worker(server)
    request = pb.PredictionsRequest(model_name=BATCH_MODEL, input={"data": IMAGE}, sequence_id="test-sequence")
    start = time.monotonic()
    replies = []
    with pytest.raises(grpc.RpcError):  # TorchServe 0.12 ends the call itself (UNKNOWN) for a model without sequences
        replies.extend(stub.StreamPredictions2(iter([request]), metadata=metadata, timeout=30))
    assert replies == [] and time.monotonic() - start < 10
    time.sleep(1.0)  # the worker has answered the batch by now
    assert _predict(client, 30, data=IMAGE) == _http(server, "predictions")  # TorchServe alone: no worker left
    after = _worker(server)
    assert (after["pid"], after["startTime"], after["status"]) == (before["pid"], before["startTime"], "READY")

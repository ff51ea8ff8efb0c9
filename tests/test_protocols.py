"""handlers.serving.protocols in isolation: how one TorchServe request item becomes images, and how answers are wrapped."""

from __future__ import annotations

import json
import struct

import pytest

from handlers.serving import protocols
from handlers.serving.protocols import RequestError, expand, respond


def _headers(**values):
    return lambda name: values.get(name.lower().replace("-", "_"))


def test_native_items_pass_through_unchanged() -> None:
    item = {"body": bytearray(b"\x89PNG...")}
    envelope, units = expand(3, item, True, _headers())
    assert envelope.protocol == "native" and len(units) == 1
    assert units[0].request == 3 and units[0].item is item and units[0].explain


def test_v1_instances_each_become_one_image_with_their_options() -> None:
    body = {"instances": [{"data": "aGk=", "top_k": 2}, {"b64": "aGk="}, "aGk=", 7, {"data": "x", "b64": "y"}]}
    envelope, units = expand(0, {"body": body}, False, _headers())
    assert envelope.protocol == "v1" and not envelope.explain
    assert units[0].item == {"body": {"image": "aGk=", "top_k": 2}}
    assert units[1].item == {"body": {"image": "aGk="}} and units[2].item == {"body": {"image": "aGk="}}
    assert isinstance(units[3].item["error"], RequestError) and "instances[3]" in units[3].item["error"].message
    assert "exactly one of" in units[4].item["error"].message


def test_v2_json_parameters_and_nested_shapes() -> None:
    body = {"id": 5, "parameters": {"top_k": 1, "content_type": "str"},
            "inputs": [{"name": "a", "shape": [2, 1], "datatype": "BYTES", "data": [["aGk="], ["aGk="]],
                        "parameters": {"top_k": 3, "explain": True}},
                       {"name": "b", "shape": [1], "datatype": "BYTES", "data": ["aGk="]}]}  # fmt: skip
    envelope, units = expand(1, {"body": body}, False, _headers())
    assert envelope.protocol == "v2" and envelope.request_id == "5" and envelope.outputs == [("a", 2), ("b", 1)]
    assert [u.explain for u in units] == [True, True, False]
    assert units[0].item == {"body": {"top_k": 3, "image": "aGk="}} and units[2].item == {"body": {"top_k": 1, "image": "aGk="}}
    answers = [(200, {"n": 1}), (415, protocols.error_body(415, "UnsupportedMediaType", "no")), (200, {"n": 3})]
    code, wrapped = respond(envelope, answers, "m", "1.0")
    assert code == 200 and wrapped["id"] == "5" and wrapped["model_name"] == "m"
    assert [o["name"] for o in wrapped["outputs"]] == ["a", "b"] and wrapped["outputs"][0]["shape"] == [2]
    assert [json.loads(x) for x in wrapped["outputs"][0]["data"]] == [{"n": 1}, answers[1][1]]


def test_v2_binary_extension_and_its_errors() -> None:
    images = [b"\x89PNG one", b"\xff\xd8 two"]
    blob = b"".join(struct.pack("<I", len(i)) + i for i in images)
    header = json.dumps({"inputs": [{"name": "raw", "shape": [2], "datatype": "BYTES",
                                     "parameters": {"binary_data_size": len(blob)}}]}).encode()  # fmt: skip
    headers = _headers(inference_header_content_length=str(len(header)))
    envelope, units = expand(0, {"body": bytearray(header + blob)}, False, headers)
    assert [u.item["data"] for u in units] == images and all(u.item["options"] == {} for u in units)
    with pytest.raises(RequestError, match="runs past the body"):
        expand(0, {"body": bytearray(header + struct.pack("<I", 1000) + blob[4:])}, False,
               _headers(inference_header_content_length=str(len(header))))  # fmt: skip
    with pytest.raises(RequestError, match="does not fit"):
        expand(0, {"body": bytearray(header + blob[:5])}, False, _headers(inference_header_content_length=str(len(header))))


def test_refusals_of_whole_requests() -> None:
    with pytest.raises(RequestError) as form:
        expand(0, {}, False, _headers(content_type="application/x-www-form-urlencoded"))
    assert form.value.code == 415 and "Content-Type" in form.value.message
    with pytest.raises(RequestError, match="datatype must be BYTES"):
        expand(0, {"body": {"inputs": [{"name": "x", "datatype": "FP32", "data": [1.0]}]}}, False, _headers())
    with pytest.raises(RequestError) as many:
        expand(0, {"body": {"instances": ["aGk="] * (protocols.MAX_INSTANCES + 1)}}, False, _headers())
    assert many.value.code == 413
    bad = protocols.Envelope("v1")
    assert respond(bad, [(415, {"code": 415}), (400, {"code": 400})], "m", "1") == (415, {"predictions": [{"code": 415}, {"code": 400}]})

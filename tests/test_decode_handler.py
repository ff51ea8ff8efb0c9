"""Decoding and protocol details through a whole handler in-process: pixel budgets checked from the headers
before anything is decoded, a bounded bit-flip fuzz of every allowed format with good batch-mates, KServe
details (v2 shape, v1 parameters, BOM, missing inputs, bounded echoes), and how gRPC calls are answered."""

from __future__ import annotations

import base64
import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from handlers.serving import grpc_calls
from handlers.serving.errors import MAX_MESSAGE, QUOTE_LIMIT
from handlers.tasks.classifier import ClassifierHandler
from tests.helpers.fake_context import FakeContext
from tests.helpers.images import ALLOWED_SAVES, jpeg_header_only, photo, save

LABELS = [f"class_{i}" for i in range(10)]
FUZZ_PER_FORMAT = 40  # 6 formats x 40 = 240 mutated images


class Context(FakeContext):
    """FakeContext with per-request headers, response headers and TorchServe's request id map."""

    def __init__(self, model_dir: Path, headers: list[dict[str, str]]) -> None:
        super().__init__(model_dir, "tiny")
        self.headers = headers
        self.request_ids = {i: f"id-{i}" for i in range(len(headers))}
        self.response_headers: dict[int, dict[str, str]] = {}

    def get_request_header(self, idx, key):
        return self.headers[idx].get(key)

    def set_response_header(self, idx, key, value):
        self.response_headers.setdefault(idx, {})[key] = value


HTTP = {"explain": "False"}


@pytest.fixture(scope="module")
def handler(tmp_path_factory: pytest.TempPathFactory) -> ClassifierHandler:
    directory = tmp_path_factory.mktemp("decode")
    config = {"batchSize": 8, "handler": {
        "architecture": "timm/test_efficientnet", "target_layers": ["bn2"], "labels": LABELS, "top_k": 3,
        "preprocessing": {"input_size": [64, 64]}, "max_image_pixels": 1_000_000}}  # fmt: skip
    (directory / "model-config.yaml").write_text(yaml.safe_dump(config))
    torch.manual_seed(0)
    instance = ClassifierHandler()
    instance.initialize(FakeContext(directory, "tiny"))
    return instance


def call(handler: ClassifierHandler, bodies: list, headers: list[dict] | None = None) -> tuple[list, Context]:
    context = Context(Path(handler.context.system_properties["model_dir"]), headers or [HTTP] * len(bodies))
    items = [body if isinstance(body, dict) and ("data" in body or "body" in body) else
             {"body": body if isinstance(body, dict) else bytearray(body)} for body in bodies]  # fmt: skip
    responses = [json.loads(r) for r in handler.handle(items, context)]
    return responses, context


def status(context: Context, index: int) -> int:
    return context.status.get(index, (200, ""))[0]


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


# ------------------------------------------------------------------------------------------ pixel budgets
def test_sixteen_fake_6300x6300_headers_are_refused_before_any_decoding(handler, monkeypatch):
    loads = []
    monkeypatch.setattr(Image.Image, "load", lambda self: loads.append(self.size))  # a decode would call it
    monkeypatch.setattr(handler, "config", dataclasses.replace(handler.config, max_image_pixels=40_000_000))
    fake = b64(jpeg_header_only(6300, 6300))
    good = save(photo(), "PNG")
    start = time.perf_counter()
    (refused, mate), context = call(handler, [{"instances": [{"data": fake}] * 16}, good])
    assert time.perf_counter() - start < 2.0
    assert status(context, 0) == 413 and all(p["type"] == "TooManyPixels" for p in refused["predictions"])
    assert "635040000 pixels" in refused["predictions"][0]["message"]
    assert "max_request_pixels of 64000000" in refused["predictions"][0]["message"]
    assert status(context, 1) == 200 and len(mate["predictions"]) == 3
    assert all(size != (6300, 6300) for size in loads)


def test_the_batch_budget_admits_requests_in_order_and_asks_the_rest_to_retry(handler, monkeypatch):
    image = save(photo(200, 300), "PNG")  # 60,000 pixels each
    monkeypatch.setattr(handler, "config", dataclasses.replace(handler.config, max_batch_pixels=130_000))
    answers, context = call(handler, [image, image, {"instances": [b64(image)]}])
    assert [status(context, i) for i in range(3)] == [200, 200, 429]
    assert answers[2]["predictions"][0]["type"] == "BatchPixelBudget" and "retry" in answers[2]["predictions"][0]["message"]
    alone, context = call(handler, [{"instances": [b64(image)]}])  # the same request alone fits
    assert status(context, 0) == 200


# ------------------------------------------------------------------------------------------ bit-flip fuzz
def _mutants(raw: bytes, count: int, rng: np.random.Generator) -> list[bytes]:
    mutants = []
    for i in range(count):
        data = bytearray(raw)
        if i % 5 == 4:  # every fifth: cut short
            mutants.append(bytes(data[: rng.integers(1, len(data))]))
            continue
        for _ in range(rng.integers(1, 9)):
            position = rng.integers(0, min(len(data), 64 if i % 2 else len(data)))  # half hit the header
            data[position] ^= 1 << int(rng.integers(0, 8))
        mutants.append(bytes(data))
    return mutants


def test_bit_flipped_images_of_every_allowed_format_never_fail_their_batch(handler):
    rng = np.random.default_rng(25)
    good = save(photo(seed=1), "PNG")
    counts: dict[int, int] = {}
    for fmt, options in ALLOWED_SAVES.items():
        mutants = _mutants(save(photo(40, 56), fmt, **options), FUZZ_PER_FORMAT, rng)
        for start in range(0, len(mutants), 7):  # 7 mutants and one good batch-mate per batch
            chunk = mutants[start : start + 7]
            answers, context = call(handler, [*chunk, good])
            assert status(context, len(chunk)) == 200 and len(answers[-1]["predictions"]) == 3, fmt
            for index, answer in enumerate(answers[:-1]):
                code = status(context, index)
                counts[code] = counts.get(code, 0) + 1
                assert code in (200, 400, 413, 415), (fmt, answer)
                assert code == 200 or set(answer) == {"code", "type", "message"}
    assert sum(counts.values()) == FUZZ_PER_FORMAT * len(ALLOWED_SAVES)
    print(f"bit-flip fuzz: {sum(counts.values())} mutated images, statuses {dict(sorted(counts.items()))}")


# ------------------------------------------------------------------------------------------ protocol details
def test_v2_shape_must_match_the_data(handler):
    image = b64(save(photo(), "PNG"))
    body = {"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": [image] * 3}]}
    (answer,), context = call(handler, [body])
    assert status(context, 0) == 400 and answer["message"] == 'inputs[0] (image): shape [1] holds 1 element(s), "data" has 3'
    body["inputs"][0]["shape"] = [3, 1]
    (answer,), context = call(handler, [body])
    assert status(context, 0) == 200 and answer["outputs"][0]["shape"] == [3]


def test_v1_top_level_parameters_apply_to_every_instance(handler):
    image = b64(save(photo(), "PNG"))
    body = {"instances": [{"data": image}, {"data": image, "top_k": 2}, image], "parameters": {"top_k": 1}}
    (answer,), context = call(handler, [body])
    assert status(context, 0) == 200
    assert [len(p["predictions"]) for p in answer["predictions"]] == [1, 2, 1]


def test_json_with_a_byte_order_mark_and_a_v2_body_without_inputs(handler):
    image = b64(save(photo(), "PNG"))
    bom = b"\xef\xbb\xbf" + json.dumps({"image": image, "top_k": 1}).encode()
    v2 = b"\xef\xbb\xbf" + json.dumps({"inputs": [{"name": "x", "shape": [1], "datatype": "BYTES", "data": [image]}]}).encode()
    (native, kserve, missing), context = call(handler, [bom, v2, {"id": "7", "parameters": {"top_k": 1}}])
    assert status(context, 0) == 200 and len(native["predictions"]) == 1
    assert status(context, 1) == 200 and kserve["outputs"][0]["name"] == "x"
    assert status(context, 2) == 400 and missing["message"].startswith('KServe v2: the body has no "inputs"')


def test_error_messages_quote_client_input_boundedly(handler):
    image = b64(save(photo(), "PNG"))
    huge = "x" * 1_000_000
    bodies = [
        {"image": image, "method": huge},
        {"image": image, huge: 1},
        {"image": image, "targets": [huge]},
        {"inputs": [{"name": "a", "shape": [1], "datatype": huge, "data": [image]}]},
        {"instances": [{"data": image}], "parameters": {"explain": huge}},
        {"image": huge + "!"},
    ]
    answers, context = call(handler, bodies)
    for index, answer in enumerate(answers):
        message = json.dumps(answer)
        assert status(context, index) == 400 and len(message) < MAX_MESSAGE + 200, (index, len(message))
    assert "x" * (QUOTE_LIMIT + 1) not in json.dumps(answers[3])  # protocols quote at most 200 characters


# ------------------------------------------------------------------------------------------ gRPC calls
def test_grpc_answers_are_final_explain_is_an_input_key_and_sequence_calls_are_refused(handler):
    image = bytearray(save(photo(), "PNG"))
    items = [{"data": image}, {"data": image, "explain": bytearray(b"true")}, {"data": image}, {"data": image}]
    headers = [{}, {}, {grpc_calls.SEQUENCE_HEADER: "seq-1", "ts_request_sequence_start": "true"}, HTTP]
    context = Context(Path(handler.context.system_properties["model_dir"]), headers)
    answers = [json.loads(r) for r in handler.handle(items, context)]
    assert "explanations" not in answers[0] and answers[1]["explanations"][0]["heatmap"]["width"] == 64
    assert context.request_ids == {0: "id-0", 1: "id-1", 3: "id-3"}  # StreamPredictions2: no answer at all
    assert context.response_headers == {0: {"ts_stream_next": "false"}, 1: {"ts_stream_next": "false"}}
    (bad,), context = call(handler, [{"data": image, "explain": bytearray(b"maybe")}], [{}])
    assert status(context, 0) == 400 and bad["message"] == "explain must be true or false, got bytearray(b'maybe')"

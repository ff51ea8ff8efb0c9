"""KServe v1 and v2 (Open Inference Protocol) parsed per request, inside the handler, batch-safe.

TorchServe 0.12 routes ``POST /v1/models/<m>:predict`` / ``:explain`` and ``POST /v2/models/<m>/infer`` /
``/explain`` to the model's worker; without a ``service_envelope`` the handler gets each request's own
JSON body, and the ``explain`` header says which route it came through (``True`` for ``:explain`` and
``/explain``). TorchServe's own envelopes read only ``data[0]`` of a batch, so with batching on they
mix up clients: here every request of the batch is read on its own.

One TorchServe request becomes one or more *units* (one image each):

- native (``/predictions``, ``/explanations``): raw bytes, multipart ``data``, JSON ``{"image": ...}``: one unit;
- v1 ``{"instances": [...]}``: one unit per instance, each ``{"data": "<base64>"}``, ``{"b64": ...}``,
  ``{"image": ...}`` or a bare base64 string, plus options (``method``, ``targets``, ...) beside it;
- v2 ``{"id", "parameters", "inputs": [{"name", "shape", "datatype": "BYTES", "data": [...]}]}``: one unit
  per element of each BYTES input (base64 strings, or raw bytes through the binary data extension);
  options travel as ``parameters`` (the request's, overridden by the input's); ``parameters.explain``
  asks for explanations.

Every unit is answered with the same JSON object ``/predictions`` answers (or ``{code, type, message}``),
and :func:`assemble` wraps a request's units in its protocol's envelope: one response string per request.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any

from handlers.serving.codec import decode_base64
from handlers.serving.errors import RequestError, error_body, quote

__all__ = ["Unit", "Envelope", "RequestError", "ProtocolError", "split_body", "expand", "respond", "envelope_body", "error_body", "MAX_INSTANCES", "reason", "header", "is_management_describe"]

#: the most images one v1/v2 request may carry (each is one row of the batched model run)
MAX_INSTANCES = 32
#: KServe/Triton parameter names that describe the transport, not our options
TRANSPORT_PARAMETERS = frozenset({"content_type", "binary_data_size", "binary_data", "binary_data_output", "headers"})
#: keys that mark a body as KServe v2 even when its "inputs" are missing (so the answer says what is missing)
V2_KEYS = frozenset({"inputs", "outputs", "id", "parameters"})
FORM_URLENCODED = "application/x-www-form-urlencoded"
#: reason phrases Python's http.HTTPStatus words differently from one version to the next
REASONS = {413: "Payload Too Large", 422: "Unprocessable Entity"}


def reason(code: int) -> str:
    """The HTTP reason phrase of ``code`` (TorchServe sends it as the status line's text)."""
    try:
        return REASONS.get(code) or HTTPStatus(code).phrase
    except ValueError:
        return "Error"


def header(context: Any, index: int, key: str) -> str | None:
    """HTTP header ``key`` of request ``index`` of the batch, or None."""
    if context is None or not hasattr(context, "get_request_header"):
        return None
    try:
        return context.get_request_header(index, key)
    except (IndexError, KeyError, AttributeError, TypeError):
        return None


def is_management_describe(data: Sequence[Mapping[str, Any]], context: Any) -> bool:
    """Whether this call is TorchServe's management describe (never an inference request): the ``describe:
    True`` header and no body; an inference request always carries the frontend's ``explain`` header (and a
    body), so a client's own ``describe`` header on the inference API is never taken for a describe."""
    if len(data) != 1 or header(context, 0, "describe") != "True":
        return False
    return header(context, 0, "explain") is None and not any(k in data[0] for k in ("body", "data"))


ProtocolError = RequestError  # a request that cannot be read at all
IMAGE_KEYS = ("data", "b64", "image")  # where a v1 instance holds its image
UTF8_BOM = b"\xef\xbb\xbf"
TRUE_WORDS, FALSE_WORDS = frozenset({"true", "1", "yes"}), frozenset({"false", "0", "no", ""})


def _json_bytes(raw: Any) -> bytes | None:
    """``raw`` without its UTF-8 byte order mark and leading whitespace when it is a JSON object's bytes, else None."""
    if not isinstance(raw, (bytes, bytearray)):
        return None
    text = bytes(raw[:3]).removeprefix(UTF8_BOM) + bytes(raw[3:]) if raw[:3] == UTF8_BOM else bytes(raw)
    text = text.lstrip(b" \t\r\n")
    return text if text[:1] == b"{" else None


def _load_json(raw: bytes) -> Any:
    try:
        return json.loads(raw.decode("utf-8"))
    except (ValueError, UnicodeDecodeError):
        raise ProtocolError("the body starts like JSON but is not valid JSON") from None
    except RecursionError:
        raise ProtocolError("the JSON body is nested too deeply") from None


def _flag(value: Any, key: str) -> bool:
    """A gRPC input-map / multipart flag: ``true``/``1``/``yes`` or ``false``/``0``/``no``/empty (bytes or str)."""
    if isinstance(value, bool):
        return value
    try:
        word = (bytes(value).decode("utf-8") if isinstance(value, (bytes, bytearray)) else str(value)).strip().lower()
    except UnicodeDecodeError:
        word = "?"
    if word in TRUE_WORDS or word in FALSE_WORDS:
        return word in TRUE_WORDS
    raise ProtocolError(f"{key} must be true or false, got {quote(value)}")


@dataclass
class Unit:
    """One image to answer: ``item`` is a TorchServe-style request item (``{"body": ...}`` or
    ``{"data": bytes, "options": {...}}``) that :meth:`CamHandler.parse_request` reads."""

    request: int  # the TorchServe request (index into the batch's ``data``)
    item: Mapping[str, Any]
    explain: bool = False


@dataclass
class Envelope:
    """How one TorchServe request is answered: ``protocol`` native, v1 or v2, and the v2 output layout."""

    protocol: str = "native"  # "native" | "v1" | "v2"
    explain: bool = False
    request_id: str | None = None
    outputs: list[tuple[str, int]] = field(default_factory=list)  # v2: (input name, element count)
    error: ProtocolError | None = None


def split_body(item: Mapping[str, Any]) -> tuple[bytes, dict[str, Any]]:
    """(image bytes, JSON options) from one native request item: raw bytes, multipart ``data`` (+ ``options``)
    or JSON ``{"image": "<base64>", ...}``; raises :class:`RequestError`."""
    if "data" in item and item["data"] is not None:
        raw, options = item["data"], {}
        extra = item.get("options")
        if isinstance(extra, Mapping):  # sent with Content-Type application/json: already parsed
            options = dict(extra)
        elif extra:
            try:
                options = json.loads(bytes(extra).decode("utf-8") if not isinstance(extra, str) else extra)
            except (ValueError, UnicodeDecodeError, TypeError):
                raise RequestError("multipart field 'options' must be a JSON object") from None
            if not isinstance(options, dict):
                raise RequestError("multipart field 'options' must be a JSON object")
    elif "body" in item:
        raw, options = item["body"], {}
    else:
        raise RequestError("no image: send raw bytes, a multipart field 'data' or JSON {\"image\": ...}")
    text = _json_bytes(raw)
    if text is not None:
        raw = _load_json(text)
    if isinstance(raw, str):
        raw = raw.encode("latin-1", errors="ignore")
    if isinstance(raw, Mapping):
        options = dict(raw)
        if "image" not in options:
            raise RequestError(
                'JSON requests need "image": "<base64 image>" (or "instances" for KServe v1, "inputs" for KServe v2)'
            )
        raw = decode_base64(options.pop("image"), "image")
    elif not isinstance(raw, (bytes, bytearray)):
        raise RequestError(f"the JSON body must be an object, got {type(raw).__name__}")
    return bytes(raw), options


def _b64_option(value: Any, where: str) -> str:
    if isinstance(value, Mapping) and "b64" in value:  # {"b64": "..."} (TF-serving style)
        value = value["b64"]
    if not isinstance(value, str):
        raise ProtocolError(f"{where} must be a base64 string, got {type(value).__name__}")
    return value


def _v1_units(index: int, body: Mapping[str, Any], explain: bool) -> tuple[Envelope, list[Unit]]:
    instances = body.get("instances")
    if not isinstance(instances, list) or not instances:
        raise ProtocolError('KServe v1: "instances" must be a non-empty list of {"data": "<base64 image>"}')
    if len(instances) > MAX_INSTANCES:
        raise ProtocolError(f"KServe v1: {len(instances)} instances, at most {MAX_INSTANCES} per request", 413, "TooManyInstances")
    shared = _parameters(body.get("parameters"), "parameters")  # every instance's options; its own win
    shared = {k: v for k, v in shared.items() if k not in IMAGE_KEYS}
    units = []
    for position, instance in enumerate(instances):
        where = f"instances[{position}]"
        try:
            if isinstance(instance, str):
                options: dict[str, Any] = {**shared, "image": instance}
            elif isinstance(instance, Mapping):
                options = {**shared, **instance}
                keys = [k for k in IMAGE_KEYS if k in options]
                if len(keys) != 1:
                    raise ProtocolError(f'{where} needs exactly one of "data", "b64" or "image" (a base64 image)')
                options["image"] = _b64_option(options.pop(keys[0]), f"{where}.{keys[0]}")
            else:
                raise ProtocolError(f"{where} must be an object or a base64 string, got {type(instance).__name__}")
            units.append(Unit(index, {"body": options}, explain))
        except ProtocolError as error:
            units.append(Unit(index, {"error": error}, explain))
    return Envelope("v1", explain), units


def _parameters(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ProtocolError(f"{where} must be an object")
    return {k: v for k, v in value.items() if k not in TRANSPORT_PARAMETERS}


def _binary_split(raw: bytes, header_length: int) -> tuple[dict[str, Any], bytes]:
    """The v2 binary data extension: a JSON header of ``header_length`` bytes, then the tensors' bytes."""
    try:
        header = json.loads(raw[:header_length].decode("utf-8"))
    except (ValueError, UnicodeDecodeError):
        raise ProtocolError("KServe v2: the first Inference-Header-Content-Length bytes are not JSON") from None
    if not isinstance(header, dict):
        raise ProtocolError("KServe v2: the inference header must be a JSON object")
    return header, raw[header_length:]


def _bytes_elements(blob: bytes, where: str) -> list[bytes]:
    """BYTES tensor in binary form: each element a 4-byte little-endian length, then its bytes."""
    elements, offset = [], 0
    while offset < len(blob):
        if offset + 4 > len(blob):
            raise ProtocolError(f"{where}: truncated BYTES element length")
        (length,) = struct.unpack_from("<I", blob, offset)
        offset += 4
        if offset + length > len(blob):
            raise ProtocolError(f"{where}: BYTES element of {length} bytes runs past the body")
        elements.append(blob[offset : offset + length])
        offset += length
    return elements


def _v2_units(index: int, body: Mapping[str, Any], explain: bool, binary: bytes = b"") -> tuple[Envelope, list[Unit]]:
    request_id = body.get("id")
    envelope = Envelope("v2", explain, request_id=str(request_id) if request_id is not None else None)
    shared = _parameters(body.get("parameters"), "parameters")
    units: list[Unit] = []
    offset = 0
    for position, tensor in enumerate(_v2_inputs(body)):
        where = f"inputs[{position}]"
        name, shape, parameters = _v2_tensor(tensor, position)
        options = {**shared, **_parameters(parameters, f"{where}.parameters")}
        wants = options.pop("explain", None)
        if wants is not None and not isinstance(wants, bool):
            raise ProtocolError(f"parameters.explain must be true or false, got {quote(wants)}")
        unit_explain = explain or bool(wants)
        envelope.explain = envelope.explain or unit_explain
        images, offset = _v2_elements(tensor, parameters, where, name, binary, offset)
        if math.prod(shape) != len(images):
            raise ProtocolError(
                f"{where} ({name}): shape {shape} holds {math.prod(shape)} element(s), \"data\" has {len(images)}"
            )
        envelope.outputs.append((name, len(images)))
        if len(units) + len(images) > MAX_INSTANCES:
            raise ProtocolError(f"KServe v2: more than {MAX_INSTANCES} images in one request", 413, "TooManyInstances")
        units.extend(_v2_image_unit(index, element, options, unit_explain, f"{where}.data") for element in images)
    return envelope, units


def _v2_inputs(body: Mapping[str, Any]) -> list[Any]:
    """The body's ``inputs``: a non-empty list, else a :class:`ProtocolError` that shows the expected shape."""
    inputs = body.get("inputs")
    if "inputs" not in body:
        raise ProtocolError(
            'KServe v2: the body has no "inputs"; send "inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", '
            '"data": ["<base64 image>"]}]'
        )
    if not isinstance(inputs, list) or not inputs:
        raise ProtocolError(f'KServe v2: "inputs" must be a non-empty list of BYTES tensors, got {quote(inputs)}')
    return inputs


def _v2_tensor(tensor: Any, position: int) -> tuple[str, list[int], Mapping[str, Any]]:
    """One input tensor's name, shape and parameters, checked: a BYTES tensor of non-negative dimensions."""
    where = f"inputs[{position}]"
    if not isinstance(tensor, Mapping):
        raise ProtocolError(f"{where} must be an object")
    name = str(tensor.get("name", f"input_{position}"))
    if len(name) > 200:
        raise ProtocolError(f"{where}: name longer than 200 characters ({len(name)})")
    if tensor.get("datatype") != "BYTES":
        raise ProtocolError(f"{where} ({name}): datatype must be BYTES (encoded images), got {quote(tensor.get('datatype'))}")
    shape = tensor.get("shape")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise ProtocolError(f"{where} ({name}): \"shape\" must be a list of non-negative integers, got {quote(shape)}")
    parameters = tensor.get("parameters")
    return name, shape, parameters if isinstance(parameters, Mapping) else {}


def _v2_elements(
    tensor: Mapping[str, Any], parameters: Mapping[str, Any], where: str, name: str, binary: bytes, offset: int
) -> tuple[list[Any], int]:
    """The tensor's elements and the binary offset after them: raw bytes at ``offset`` of the body after the
    JSON header when ``binary_data_size`` says so, else its ``data`` list (base64 strings, [N, 1] flattened)."""
    size = parameters.get("binary_data_size")
    if size is not None:
        if not isinstance(size, int) or size < 0 or offset + size > len(binary):
            raise ProtocolError(f"{where}: binary_data_size {quote(size)} does not fit the body")
        return list(_bytes_elements(binary[offset : offset + size], where)), offset + size
    images = tensor.get("data")
    if not isinstance(images, list) or not images:
        raise ProtocolError(f'{where} ({name}): "data" must be a non-empty list of base64 images')
    if isinstance(images[0], list):  # shape [N, 1] sent nested
        images = [x for row in images for x in (row if isinstance(row, list) else [row])]
    return images, offset


def _v2_image_unit(index: int, element: Any, options: Mapping[str, Any], explain: bool, where: str) -> Unit:
    """One image of a v2 tensor as a unit: raw bytes with their options, or a base64 string decoded into a body
    (an undecodable one becomes that unit's error, not the request's)."""
    if isinstance(element, (bytes, bytearray)):
        return Unit(index, {"data": bytes(element), "options": dict(options)}, explain)
    try:
        return Unit(index, {"body": {**options, "image": _b64_option(element, where)}}, explain)
    except ProtocolError as error:
        return Unit(index, {"error": error}, explain)


def expand(
    index: int, item: Mapping[str, Any], explain: bool, header: Any
) -> tuple[Envelope, list[Unit]]:
    """One TorchServe request item -> its envelope and units. Raises :class:`ProtocolError`.

    ``header(name)`` returns that request's HTTP header (or None).
    """
    content_type = str(header("Content-Type") or header("content-type") or "").split(";")[0].strip().lower()
    if content_type == FORM_URLENCODED and "data" not in item:
        raise ProtocolError(
            "the body came as a form (Content-Type application/x-www-form-urlencoded, what curl --data-binary "
            "sends by default): send the image bytes with an image Content-Type, e.g. curl -T photo.jpg or "
            "-H 'Content-Type: image/jpeg' --data-binary @photo.jpg",
            415,
            "UnsupportedMediaType",
        )
    if "explain" in item:  # gRPC input map (or a multipart field) "explain": true
        explain = _flag(item["explain"], "explain") or explain
    body = item.get("body") if "data" not in item else None
    binary_header = header("Inference-Header-Content-Length")
    if isinstance(body, (bytes, bytearray)) and binary_header is not None:
        try:
            length = int(binary_header)
        except ValueError:
            raise ProtocolError("Inference-Header-Content-Length must be an integer") from None
        parsed, rest = _binary_split(bytes(body), length)
        return _v2_units(index, parsed, explain, rest)
    text = _json_bytes(body)
    if text is not None:  # JSON that TorchServe did not parse (a BOM, another Content-Type)
        body = _load_json(text)
        item = {**item, "body": body}
    if isinstance(body, Mapping) and "instances" in body:
        return _v1_units(index, body, explain)
    if isinstance(body, Mapping) and "image" not in body and ("inputs" in body or V2_KEYS & set(body)):
        return _v2_units(index, body, explain)
    return Envelope("native", explain), [Unit(index, item, explain)]


def envelope_body(envelope: Envelope, answers: Sequence[dict[str, Any]], model: str, version: str) -> dict[str, Any]:
    """A request's units' answers (in order) wrapped in its protocol's response."""
    if envelope.protocol == "native":
        return answers[0]
    if envelope.protocol == "v1":
        return {"explanations" if envelope.explain else "predictions": list(answers)}
    outputs, position = [], 0
    for name, count in envelope.outputs:
        chunk = answers[position : position + count]
        position += count
        outputs.append(
            {
                "name": name,
                "shape": [count],
                "datatype": "BYTES",
                "parameters": {"content_type": "application/json"},
                "data": [json.dumps(answer) for answer in chunk],
            }
        )
    body: dict[str, Any] = {"model_name": model, "model_version": version, "outputs": outputs}
    if envelope.request_id is not None:
        body["id"] = envelope.request_id
    return body


def respond(
    envelope: Envelope, answers: Sequence[tuple[int, dict[str, Any]]], model: str, version: str
) -> tuple[int, dict[str, Any]]:
    """``(HTTP status, body)`` of one request from its units' ``(status, answer)``.

    A native request has its unit's status. A v1/v2 request answers 200 when any of its images got an
    answer (failed ones hold their error objects in place), else the first error's status.
    """
    if envelope.error is not None:
        error = envelope.error
        return error.code, error_body(error.code, error.kind, error.message)
    if envelope.protocol == "native":
        return answers[0]
    codes = [code for code, _ in answers]
    code = 200 if 200 in codes else codes[0]
    return code, envelope_body(envelope, [answer for _, answer in answers], model, version)

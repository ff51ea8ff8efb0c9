"""Fuzz families against a real TorchServe, with their counts (issue 25's closing note).

    PYTHONPATH=$PWD .venv/bin/python bench/fuzz_families.py [--seconds 150] [--seed 25] [--per-format 40]

Starts TorchServe on free loopback ports the way the tests do (``model_store.serve.start`` with the test
archive cache, ``tests/helpers/archive_cache.py``), serving the small batching test classifier
(``tests/helpers/serving.py`` ``BATCH_MODEL``: random-init EfficientNet-Lite0, 224x224, batches of 8; here
gathered for 50 ms), and sends three families of hostile requests, each alongside good batch-mates (rounds of
4 hostile and 4 good requests sent at once, so that they share the worker's batches):

- ``protocol``: malformed and odd native / KServe v1 / v2 bodies on every route, headers, base64 forms, deep
  nesting, a BOM, a megabyte echoed, over-long bodies; plus the hostile units of ``tests/test_isolation.py``
  and the bad payloads of ``tests/helpers/inputs.py`` (their in-process fault injections left out);
- ``options``: every request option (``handlers.serving.base.COMMON_OPTIONS`` and the classifier's) with
  boundary, invalid and wrongly typed values, the Captum options also under their methods;
- ``images``: bit-flipped images in every allowed format (``tests/helpers/images.py`` ``ALLOWED_SAVES``).

Prints one row per family: cases, answers by HTTP status, unexpected outcomes (a 5xx other than the documented
503 ``DeadlineExceeded`` / ``AuditUnavailable`` and the frontend's own 500 ``ErrorDataDecoderException`` for a
binary body sent as a form, a 5xx inside a v1/v2 answer, a good batch-mate not answered 200, no answer at all, a
worker restart) and worker restarts (the worker's PID from the management API after every round).
Bounded: ``--seconds`` per family and the case counts above; every address is 127.0.0.1.
"""

from __future__ import annotations

import argparse
import base64
import json
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import requests

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from handlers.serving.base import COMMON_OPTIONS  # noqa: E402
from handlers.tasks.classifier import ClassifierHandler  # noqa: E402
from model_store import serve  # noqa: E402
from tests.helpers.archive_cache import build_cached  # noqa: E402
from tests.helpers.images import ALLOWED_SAVES, jpeg_header_only, photo, save  # noqa: E402
from tests.helpers.inputs import b64, bad_payloads  # noqa: E402
from tests.helpers.serving import BATCH_LABELS, BATCH_MODEL, TEST_ARCHIVES  # noqa: E402

MODEL = BATCH_MODEL
HOSTILE_PER_ROUND = 4
DOCUMENTED_503 = {"DeadlineExceeded", "AuditUnavailable"}
#: TorchServe's frontend answers a binary body sent as a form 500 before any handler runs (docs/serving.md, Limits)
FRONTEND_500 = "ErrorDataDecoderException"
CAPTUM = {"n_steps": "integrated_gradients", "baselines": "integrated_gradients", "internal_batch_size": "integrated_gradients",
          "noise_tunnel": "integrated_gradients", "nt_samples": "integrated_gradients", "nt_stdev": "integrated_gradients",
          "window": "occlusion", "stride": "occlusion"}  # fmt: skip
VALUES: list[Any] = [None, True, False, 0, 1, -1, 2, 3, 16, 64, 65, 1025, 2**63, 0.5, -0.1, float("nan"), float("inf"),
                     "", "true", "gradcam", "x" * 300, [], [0], [1, 2], {}]  # fmt: skip


@dataclass
class Case:
    """One HTTP request: a route under the inference API and ``requests.post`` keyword arguments."""

    name: str
    route: str
    kwargs: dict[str, Any]


@dataclass
class Family:
    name: str
    cases: int = 0
    statuses: Counter = field(default_factory=Counter)
    unexpected: list[str] = field(default_factory=list)
    restarts: int = 0
    cut: int = 0  # cases not sent: the family's time ran out


def route(kind: str, explain: bool = False) -> str:
    return {"native": f"{'explanations' if explain else 'predictions'}/{MODEL}",
            "v1": f"v1/models/{MODEL}:{'explain' if explain else 'predict'}",
            "v2": f"v2/models/{MODEL}/{'explain' if explain else 'infer'}"}[kind]  # fmt: skip


def json_case(name: str, body: Any, kind: str = "native", explain: bool = False, **headers: str) -> Case:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return Case(name, route(kind, explain), {"data": data, "headers": {"Content-Type": "application/json", **headers}})


def nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


# ------------------------------------------------------------------------------------------------ protocol
def item_case(name: str, item: dict) -> Case:
    """A TorchServe request item of the in-process tests as the HTTP request that makes it."""
    if "options" in item:
        return Case(name, route("native"), {"files": {"data": ("image", bytes(item["data"])), "options": ("options", bytes(item["options"]))}})
    body = item["body"]
    if isinstance(body, (bytes, bytearray)):
        kind = "application/json" if bytes(body[:1]) == b"{" else "application/octet-stream"
        return Case(name, route("native"), {"data": bytes(body), "headers": {"Content-Type": kind}})
    kind = "v1" if "instances" in body else "v2" if "inputs" in body else "native"
    return json_case(name, body, kind)


def protocol_cases(rng: np.random.Generator) -> Iterator[Case]:
    from tests.test_isolation import HOSTILE

    png = save(photo(60, 80), "PNG")
    good = b64(png)
    for name, (build, _, _) in sorted(HOSTILE.items()):
        if any(word in name for word in ("fault", "memory_error", "recursion_while")):
            continue  # in-process fault injections: an ordinary image over HTTP
        for _ in range(2):
            yield item_case(f"isolation:{name}", build(rng, good))
    for name, (body, _) in bad_payloads(png, len(BATCH_LABELS)).items():
        yield json_case(f"payload:{name}", body) if isinstance(body, dict) else Case(f"payload:{name}", route("native"), {"data": body})
    raw = png
    forms = {"standard": good, "urlsafe": base64.urlsafe_b64encode(raw).decode(), "unpadded": good.rstrip("="),
             "mime": base64.encodebytes(raw).decode(), "spaces": " ".join(good[i : i + 60] for i in range(0, len(good), 60)),
             "data_uri": "data:image/png;base64," + good, "cut": good[: len(good) // 2], "bad_char": good[:100] + "*" + good[101:],
             "empty": "", "one_char": "A"}  # fmt: skip
    for form, text in forms.items():
        yield json_case(f"base64:{form}:native", {"image": text})
        yield json_case(f"base64:{form}:v1", {"instances": [{"data": text}, {"b64": text}, text]}, "v1")
        yield json_case(f"base64:{form}:v2", {"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": [text]}]}, "v2")
    for depth in (10, 500, 988, 989, 1000, 5000, 100_000):
        yield json_case(f"deep:image:{depth}", b'{"image": ' + nested(depth) + b"}")
        yield json_case(f"deep:v1:{depth}", b'{"instances": ' + nested(depth) + b"}", "v1")
        yield json_case(f"deep:v2:{depth}", b'{"inputs": [{"name": "i", "shape": [1], "datatype": "BYTES", "data": ' + nested(depth) + b"}]}", "v2")
    bom = b"\xef\xbb\xbf"
    yield json_case("bom:native", bom + json.dumps({"image": good}).encode())
    yield json_case("bom:v1", bom + json.dumps({"instances": [good]}).encode(), "v1")
    yield json_case("bom:twice", bom + bom + json.dumps({"image": good}).encode())
    yield json_case("echo:1MB_method", {"image": good, "method": "m" * 1_000_000})
    yield json_case("echo:1MB_key", {"image": good, "k" * 1_000_000: 1})
    yield json_case("echo:1MB_v2_name", {"inputs": [{"name": "n" * 1_000_000, "shape": [1], "datatype": "BYTES", "data": [good]}]}, "v2")
    yield Case("size:7MB_raw", route("native"), {"data": rng.bytes(7_000_000), "headers": {"Content-Type": "image/png"}})
    v1_bodies = {"not_a_list": {"instances": good}, "empty": {"instances": []}, "null": {"instances": None},
                 "33": {"instances": [good] * 33}, "32": {"instances": [good] * 32}, "number": {"instances": [1]},
                 "nested_list": {"instances": [[good]]}, "no_image": {"instances": [{"top_k": 1}]},
                 "two_images": {"instances": [{"data": good, "b64": good}]}, "parameters": {"instances": [good], "parameters": {"top_k": 1}},
                 "bad_parameters": {"instances": [good], "parameters": [1]}, "unknown_parameter": {"instances": [good], "parameters": {"zzz": 1}},
                 "inputs_too": {"instances": [good], "inputs": []}}  # fmt: skip
    for name, body in v1_bodies.items():
        for explain in (False, True):
            yield json_case(f"v1:{name}:{explain}", body, "v1", explain)
    tensor = {"name": "image", "shape": [1], "datatype": "BYTES", "data": [good]}
    v2_bodies = {"ok": {"inputs": [tensor]}, "shape_lie": {"inputs": [dict(tensor, shape=[3])]}, "shape_2d": {"inputs": [dict(tensor, shape=[1, 1])]},
                 "shape_neg": {"inputs": [dict(tensor, shape=[-1])]}, "shape_str": {"inputs": [dict(tensor, shape="1")]},
                 "datatype_fp32": {"inputs": [dict(tensor, datatype="FP32")]}, "datatype_missing": {"inputs": [{"name": "i", "shape": [1], "data": [good]}]},
                 "data_missing": {"inputs": [{"name": "i", "shape": [1], "datatype": "BYTES"}]}, "data_dict": {"inputs": [dict(tensor, data={"a": good})]},
                 "inputs_dict": {"inputs": tensor}, "inputs_empty": {"inputs": []}, "no_inputs": {"id": "x"}, "id_list": {"id": [1], "inputs": [tensor]},
                 "parameters_list": {"inputs": [tensor], "parameters": [1]}, "param_explain": {"inputs": [tensor], "parameters": {"explain": True}},
                 "param_explain_str": {"inputs": [tensor], "parameters": {"explain": "maybe"}},
                 "binary_size_lie": {"inputs": [dict(tensor, data=None, parameters={"binary_data_size": 10**9})]},
                 "outputs_odd": {"inputs": [tensor], "outputs": [{"name": 1}]}}  # fmt: skip
    for name, body in v2_bodies.items():
        yield json_case(f"v2:{name}", body, "v2")
    header = json.dumps({"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "parameters": {"binary_data_size": len(png) + 4}}]}).encode()
    binary = header + len(png).to_bytes(4, "little") + png
    for name, length in (("exact", len(header)), ("short", len(header) - 5), ("long", len(binary) + 10), ("negative", -1), ("word", "x")):
        yield Case(f"v2_binary:{name}", route("v2"), {"data": binary, "headers": {"Inference-Header-Content-Length": str(length),
                                                                                     "Content-Type": "application/octet-stream"}})  # fmt: skip
    for content_type in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data", "image/png", "application/json; charset=latin-1", ""):
        yield Case(f"header:json_as:{content_type or 'none'}", route("native"), {"data": json.dumps({"image": good}).encode(), "headers": {"Content-Type": content_type}})
        yield Case(f"header:png_as:{content_type or 'none'}", route("native"), {"data": png, "headers": {"Content-Type": content_type}})
    for name, body in (("nan", b'{"image": "%s", "alpha": NaN}' % good.encode()), ("dup_key", b'{"image": "x", "image": "%s"}' % good.encode()),
                       ("trailing", json.dumps({"image": good}).encode() + b" garbage"), ("array", b"[1, 2]"), ("string", b'"x"'),
                       ("null", b"null"), ("utf16", json.dumps({"image": good}).encode("utf-16")), ("invalid_utf8", b'{"image": "\xff\xfe"}'),
                       ("huge_number", b'{"image": "%s", "top_k": 1e999}' % good.encode()), ("unicode_key", '{"image": "x", "\u00e9": 1}'.encode())):  # fmt: skip
        yield json_case(f"json:{name}", body)
    yield json_case("header:explain_true", {"image": good}, explain=False, explain_header="true")
    yield Case("multipart:no_data", route("native"), {"files": {"options": ("o", b'{"top_k": 1}')}})
    yield Case("multipart:two_files", route("native"), {"files": [("data", ("a", png)), ("data", ("b", png))]})
    yield Case("multipart:header_only_jpeg", route("native"), {"files": {"data": ("a", jpeg_header_only(6300, 6300))}})


# ------------------------------------------------------------------------------------------------ options
def option_cases(rng: np.random.Generator) -> Iterator[Case]:
    good = b64(save(photo(60, 80, seed=1), "PNG"))
    names = [name for name in dict.fromkeys(COMMON_OPTIONS + ClassifierHandler.task_options) if name != "image"]
    for name in names:
        for value in VALUES:
            yield json_case(f"{name}={str(value)[:20]}", {"image": good, name: value}, explain=True)
            if name in CAPTUM:
                yield json_case(f"{CAPTUM[name]}:{name}={str(value)[:20]}", {"image": good, "method": CAPTUM[name], name: value}, explain=True)
    yield json_case("image=null", {"image": None}, explain=True)
    for value in VALUES[:8]:
        yield json_case(f"v1 parameters {value}", {"instances": [good], "parameters": {"top_k": value}}, "v1", True)


# ------------------------------------------------------------------------------------------------ images
def image_cases(rng: np.random.Generator, per_format: int) -> Iterator[Case]:
    for fmt, options in ALLOWED_SAVES.items():
        original = save(photo(72, 96, seed=int(rng.integers(1000))), fmt, **options)
        for index in range(per_format):
            data = bytearray(original)
            flips = [1, 2, 8, 64][index % 4]
            for position in rng.integers(0, len(data) * 8, flips):
                data[position // 8] ^= 1 << int(position % 8)
            explain = index % 2 == 1
            yield Case(f"{fmt}:{flips}bits", route("native", explain), {"data": bytes(data), "headers": {"Content-Type": f"image/{fmt.lower()}"}})


# ------------------------------------------------------------------------------------------------ sending
def worker_pid(server: serve.Server) -> int | None:
    answer = requests.get(f"{server.url('management')}/models/{MODEL}", headers=server.headers("management"), timeout=30)
    workers = [w for version in answer.json() for w in version.get("workers", []) if w.get("status") == "READY"]
    return int(workers[0]["pid"]) if workers and workers[0].get("pid") else None


def wait_worker(server: serve.Server, timeout: float = 180) -> int:
    serve.wait_ready(server, [MODEL], timeout)
    pid = worker_pid(server)
    if pid is None:
        raise TimeoutError(f"{MODEL} has a READY worker without a pid")
    return pid


def post(server: serve.Server, case: Case) -> tuple[int, Any]:
    kwargs = dict(case.kwargs)
    headers = {**server.headers(), **kwargs.pop("headers", {})}
    try:
        answer = requests.post(f"{server.url()}/{case.route}", headers=headers, timeout=120, **kwargs)
    except requests.RequestException as error:
        return 0, f"{type(error).__name__}: {error}"[:200]
    try:
        return answer.status_code, answer.json()
    except ValueError:
        return answer.status_code, answer.text[:200]


def inner(body: Any) -> list[dict]:
    """The per-image answers of a v1/v2 answer (errors in place)."""
    if not isinstance(body, dict):
        return []
    if "outputs" in body:
        try:
            return [json.loads(text) for output in body["outputs"] for text in output.get("data", [])]
        except (TypeError, ValueError):
            return []
    listed = body.get("predictions", body.get("explanations"))
    return [a for a in listed if isinstance(a, dict)] if isinstance(listed, list) and "model" not in body else []


def judge(case: Case, status: int, body: Any) -> str | None:
    """Why this hostile answer is unexpected, or None."""
    kind = body.get("type") if isinstance(body, dict) else None
    documented = (status == 503 and kind in DOCUMENTED_503) or (status == 500 and kind == FRONTEND_500)
    if status == 0 or (status >= 500 and not documented):
        return f"{case.name}: {status} {str(body)[:160]}"
    for answer in inner(body):
        code = answer.get("code", 200)
        if isinstance(code, int) and code >= 500 and not (code == 503 and answer.get("type") in DOCUMENTED_503):
            return f"{case.name}: inner {code} {str(answer)[:160]}"
    return None


def good_mates(count: int) -> list[Case]:
    png = save(photo(64, 64, seed=7), "PNG")
    return [Case(f"good{i}", route("native", i % 2 == 1), {"data": png, "headers": {"Content-Type": "image/png"}}) for i in range(count)]


def run_family(server: serve.Server, family: Family, cases: list[Case], seconds: float, pool: ThreadPoolExecutor) -> None:
    end = time.monotonic() + seconds
    pid = wait_worker(server)
    for start in range(0, len(cases), HOSTILE_PER_ROUND):
        if time.monotonic() > end:
            family.cut = len(cases) - start
            break
        hostile = cases[start : start + HOSTILE_PER_ROUND]
        mates = good_mates(len(hostile))
        answers = list(pool.map(lambda case: post(server, case), [c for pair in zip(hostile, mates) for c in pair]))
        for case, (status, body) in zip(hostile, answers[0::2]):
            family.cases += 1
            family.statuses[status] += 1
            reason = judge(case, status, body)
            if reason:
                family.unexpected.append(reason)
        for status, body in answers[1::2]:
            if status != 200 or not isinstance(body, dict) or "predictions" not in body:
                family.unexpected.append(f"batch-mate of {[c.name for c in hostile]}: {status} {str(body)[:160]}")
        now = worker_pid(server) or wait_worker(server)
        if now != pid:
            family.restarts += 1
            family.unexpected.append(f"worker restart ({pid} -> {now}) after {[c.name for c in hostile]}")
            pid = now


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=150, help="time bound of each family")
    parser.add_argument("--seed", type=int, default=25)
    parser.add_argument("--per-format", type=int, default=40, help="bit-flipped images per allowed format")
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    spec = next(s for s in TEST_ARCHIVES if getattr(s, "archive_name", None) == MODEL)
    spec = replace(spec, overrides={**spec.overrides, "maxBatchDelay": 50, "minWorkers": 1, "maxWorkers": 1})
    families = {"protocol": list(protocol_cases(rng)), "options": list(option_cases(rng)),
                "images": list(image_cases(rng, args.per_format))}  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="fuzz-families-") as directory:
        workdir = Path(directory)
        store = workdir / "model_store"
        names = build_cached([spec], store, log=print)
        ports = {api: serve.free_port() for api in serve.PORT_VARIABLES}
        server = serve.start(workdir, store, names, ports=ports, timeout=300)
        results = []
        try:
            with ThreadPoolExecutor(2 * HOSTILE_PER_ROUND) as pool:
                for name, cases in families.items():
                    family = Family(name)
                    started = time.monotonic()
                    run_family(server, family, cases, args.seconds, pool)
                    print(f"{name}: {family.cases} cases in {time.monotonic() - started:.0f} s", flush=True)
                    results.append(family)
        finally:
            serve.stop(workdir, grace=0)
    print(f"\n{'family':<9} {'cases':>6} {'not sent':>8}  {'answers by status':<44} {'unexpected':>10} {'restarts':>8}")
    for family in results:
        statuses = ", ".join(f"{code}: {count}" for code, count in sorted(family.statuses.items()))
        print(f"{family.name:<9} {family.cases:>6} {family.cut:>8}  {statuses:<44} {len(family.unexpected):>10} {family.restarts:>8}")
    for family in results:
        for reason in family.unexpected[:20]:
            print(f"  {family.name}: {reason}")


if __name__ == "__main__":
    main()

"""Locust scenarios for a TorchServe serving our CAM handlers.

    locust -f load_tests/locustfile.py --host http://127.0.0.1:8080 --tags mix          # web UI on :8089
    locust -f load_tests/locustfile.py --host http://127.0.0.1:8080 --tags explanations \
        --headless -u 8 -r 8 -t 30s --csv out/locust --html out/report.html             # what make loadtest runs

Scenarios are chosen by tag (``--tags predictions``, ``explanations`` or ``mix``); each tag belongs to
one user class (PredictionUser, ExplanationUser, MixUser). Every request sends one of the scikit-image
photos (chelsea, coffee, astronaut, rocket) at one of ``--sizes``, as raw bytes, a multipart field or
JSON (``--encodings``). Every answer is checked (status, schema, heatmap PNG of the submitted image's
width and height, see ``payloads.check_answer``): a wrong body is a failure, not only a wrong status.
Any task's model can be loaded: classifiers, CLIP, detectors, segmenters, embedding models (these need
``--request-options '{"concept": "cat"}'``: ``--request-options`` is merged into every request).

The inference token comes from ``--key-file`` (TorchServe's ``key_file.json``) and is renewed through
the management API before it expires, so a run longer than ``token_expiration_min`` keeps working; a
deployed server behind a gateway takes a fixed ``--token`` instead. Non-loopback hosts are refused
unless ``--allow-remote`` is given. At the end the SLO file (``--slo``, default ``load_tests/slo.yaml``)
is checked: the process exits 1 when the failure ratio or a p95 breaches it (and on any failure).

Before Locust starts its users (and its ``--run-time`` clock), ``--warmup`` requests of each kind the
scenario sends go out unmeasured, so the worker's lazy initialisation does not land in the p95; a wrong
warm-up answer (say an embedding model asked without a concept) ends the run at once with the reason.
"""

from __future__ import annotations

import ipaddress
import json
import random
import socket
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

import gevent
import yaml
from locust import HttpUser, between, events, tag, task
from locust.env import Environment
from locust.stats import CSV_STATS_INTERVAL_SEC

sys.path.insert(0, str(Path(__file__).resolve().parent))

from payloads import (  # noqa: E402
    ENCODINGS,
    Photo,
    TokenKeeper,
    answer_kind,
    check_answer,
    is_token_rejection,
    parse_sizes,
    photos,
    request_kwargs,
)

HERE = Path(__file__).resolve().parent
STATE: dict[str, object] = {}  # filled once per process at test start: photos, token keeper, options


@events.init_command_line_parser.add_listener
def _options(parser) -> None:
    group = parser.add_argument_group("torchserve-cam")
    group.add_argument(
        "--model", default="efficientnet_lite0", env_var="LOAD_MODEL", help="model name in the URL"
    )
    group.add_argument(
        "--mix",
        default="predictions=2,explanations=2,explain_flag=1,method=1",
        env_var="LOAD_MIX",
        help="MixUser task weights: predictions, explanations, explain_flag (/predictions with explain: true), "
        "method (/explanations with a second method)",
    )
    group.add_argument("--sizes", default="224x224,451x300,300x400,native", env_var="LOAD_SIZES")
    group.add_argument("--encodings", default=",".join(ENCODINGS), env_var="LOAD_ENCODINGS")
    group.add_argument("--second-method", default="eigencam", env_var="LOAD_SECOND_METHOD")
    group.add_argument(
        "--request-options", default="", env_var="LOAD_REQUEST_OPTIONS",
        help='JSON object merged into every request, for tasks that need it: \'{"concept": "cat"}\' for an '
        'embedding model, \'{"score_threshold": 0.3}\' for a detector (sent as multipart or JSON, never raw)',
    )  # fmt: skip
    group.add_argument("--key-file", default="key_file.json", env_var="LOAD_KEY_FILE")
    group.add_argument("--management-url", default="", env_var="LOAD_MANAGEMENT_URL",
                       help="default: the host with port 8081")  # fmt: skip
    group.add_argument("--token", default="", env_var="LOAD_TOKEN", help="fixed bearer token (no key file)")
    group.add_argument(
        "--slo", default=str(HERE / "slo.yaml"), env_var="LOAD_SLO", help="'' to skip the check"
    )
    group.add_argument(
        "--token-margin", type=float, default=60.0, env_var="LOAD_TOKEN_MARGIN",
        help="renew the inference token this many seconds before it expires (below token_expiration_min)",
    )  # fmt: skip
    group.add_argument("--allow-remote", action="store_true", env_var="LOAD_ALLOW_REMOTE")
    group.add_argument(
        "--max-requests", type=int, default=0, env_var="LOAD_MAX_REQUESTS",
        help="stop after this many measured requests (0: no limit); --run-time stays the bound in time",
    )  # fmt: skip
    group.add_argument(
        "--warmup", type=int, default=2, env_var="LOAD_WARMUP",
        help="requests per request kind of the scenario sent before measuring (not counted; 0: none); a "
        "warm-up answer that is wrong stops the run at once with the reason",
    )  # fmt: skip


def _is_loopback(host: str) -> bool:
    try:
        return all(ipaddress.ip_address(info[4][0]).is_loopback for info in socket.getaddrinfo(host, None))
    except (socket.gaierror, ValueError):
        return False


SCENARIO_KINDS = {
    "predictions": ("predictions",),
    "explanations": ("explanations",),
    "mix": ("predictions", "explanations", "explain_flag", "method"),
}


def request_plan(kind: str, second_method: str = "eigencam") -> tuple[str, bool, dict | None, int | None]:
    """``(endpoint, explained, options, targets)`` of one request of ``kind`` (a ``--mix`` key)."""
    if kind == "predictions":
        return "predictions", False, None, 1
    if kind == "explanations":
        return "explanations", True, None, 1
    if kind == "explain_flag":
        return "predictions", True, {"explain": True}, 1
    if STATE.get("kind") == "predictions":  # a classifier or CLIP: two classes / prompts
        return "explanations", True, {"method": second_method, "targets": [0, 1]}, 2
    return "explanations", True, {"method": second_method}, None  # other tasks: their default subjects


@events.init.add_listener
def _prepare(environment: Environment, **_) -> None:
    """Check the options, keep the user classes of the chosen scenario (``--tags``) and warm the server up.

    Runs once, before Locust starts its users and its run-time clock: the warm-up is not measured, and a
    wrong warm-up answer ends the run before it starts, with the reason.
    """
    options = environment.parsed_options
    if options is None:  # Locust used as a library: nothing to prepare
        return
    host = urlsplit(environment.host or "")
    if not host.hostname:
        raise SystemExit("give --host http://127.0.0.1:8080 (the inference address)")
    if not options.allow_remote and not _is_loopback(host.hostname):
        raise SystemExit(
            f"{host.hostname} is not a loopback address; pass --allow-remote to load a remote server"
        )
    encodings = [item.strip() for item in options.encodings.split(",") if item.strip()]
    unknown = set(encodings) - set(ENCODINGS)
    if unknown or not encodings:
        raise SystemExit(f"--encodings: unknown {sorted(unknown)}; choose from {ENCODINGS}")
    management = options.management_url or f"{host.scheme}://{host.hostname}:8081"
    try:
        extra = json.loads(options.request_options) if options.request_options.strip() else {}
    except ValueError as error:
        raise SystemExit(f"--request-options: not JSON: {error}") from None
    if not isinstance(extra, dict):
        raise SystemExit("--request-options: give a JSON object")
    if extra and encodings == ["raw"]:
        raise SystemExit("--request-options need the multipart or json encoding (raw bytes carry no options)")
    # Tags filter tasks; a user class left without one makes Locust warn (and fail if spawned): keep only the
    # classes of the chosen scenario, before Locust filters.
    tags = set(options.tags or [])
    chosen = [user for user in environment.user_classes
              if not tags or any(tags & getattr(t, "locust_tag_set", set()) for t in user.tasks)]  # fmt: skip
    if not chosen:
        raise SystemExit(f"no scenario matches --tags {options.tags}; use predictions, explanations or mix")
    environment.user_classes[:] = chosen
    STATE["photos"] = photos(parse_sizes(options.sizes))
    STATE["encodings"] = encodings
    STATE["tokens"] = TokenKeeper(
        options.key_file, management, margin_s=options.token_margin, static_token=options.token or None
    )
    STATE["model"] = options.model
    STATE["request_options"] = extra
    STATE["mix"] = _mix_weights(options.mix)
    STATE["environment"] = environment
    if options.max_requests < 0:
        raise SystemExit("--max-requests: give 0 (no limit) or a count")
    if options.warmup > 0:
        kinds = [k for tag_name in (tags or SCENARIO_KINDS) for k in SCENARIO_KINDS.get(tag_name, ())]
        if "mix" in (tags or SCENARIO_KINDS):
            kinds = [k for k in kinds if k not in SCENARIO_KINDS["mix"] or STATE["mix"][k] > 0]
        warm_up(environment.host, list(dict.fromkeys(kinds)), options.warmup, options.second_method)


def warm_up(host: str, kinds: list[str], count: int, second_method: str) -> None:
    """``count`` requests of each kind, not measured; the first wrong answer raises SystemExit with the reason
    (for an embedding model without ``--request-options '{"concept": ...}'``: the server's own message)."""
    import requests

    tokens: TokenKeeper = STATE["tokens"]  # type: ignore[assignment]
    model = STATE["model"]
    started = time.perf_counter()
    for kind in kinds:
        for number in range(count):
            endpoint, explained, options, targets = request_plan(kind, second_method)
            options = {**STATE["request_options"], **(options or {})}  # type: ignore[dict-item]
            photo: Photo = STATE["photos"][number % len(STATE["photos"])]  # type: ignore[index]
            encoding = next(e for e in (*STATE["encodings"], "json") if e != "raw" or not options)  # type: ignore[misc]
            kwargs = request_kwargs(photo, encoding, options)
            kwargs["headers"] = {**kwargs.get("headers", {}), "Authorization": f"Bearer {tokens.token()}"}
            try:
                answer = requests.post(f"{host.rstrip('/')}/{endpoint}/{model}", timeout=120, **kwargs)
            except requests.RequestException as error:
                raise SystemExit(f"warm-up: /{endpoint}/{model} unreachable: {error}") from None
            problem = check_answer(answer.status_code, answer.content or b"", photo, model, explained, targets)
            if problem:
                hint = ""
                if b"concept" in (answer.content or b"") and not STATE["request_options"]:
                    hint = ("\n  this model needs a concept in every request: "
                            "make loadtest LOAD_REQUEST_OPTIONS='{\"concept\": \"cat\"}' (locust: --request-options)")  # fmt: skip
                raise SystemExit(f"warm-up: {kind} request to /{endpoint}/{model} ({encoding}) failed, so the "
                                 f"load test did not start: {problem}{hint}")  # fmt: skip
            if "kind" not in STATE:
                STATE["kind"] = answer_kind(answer.json())
    print(f"warm-up: {count} request(s) each of {', '.join(kinds)} in {time.perf_counter() - started:.1f}s "
          "(not counted)")  # fmt: skip


class CamUser(HttpUser):
    """Sends one photo per request and fails any answer that is not right in status, schema and heatmap."""

    abstract = True
    wait_time = between(0.0, 0.05)

    def _post(self, endpoint: str, explained: bool, options: dict | None = None, targets: int | None = 1) -> None:
        photo: Photo = random.choice(STATE["photos"])  # type: ignore[arg-type]
        options = {**STATE["request_options"], **(options or {})}  # type: ignore[dict-item]
        encodings: list[str] = STATE["encodings"]  # type: ignore[assignment]
        choices = [e for e in encodings if e != "raw"] if options else encodings
        encoding = random.choice(choices or ["json"])
        tokens: TokenKeeper = STATE["tokens"]  # type: ignore[assignment]
        model = STATE["model"]
        name = f"/{endpoint}/{model}" + (f" {sorted(options)}" if options else "")
        kwargs = request_kwargs(photo, encoding, options)
        key = tokens.token()
        for attempt in range(2):
            headers = {**kwargs.pop("headers", {}), "Authorization": f"Bearer {key}"}
            kwargs["headers"] = headers
            with self.client.post(f"/{endpoint}/{model}", name=name, catch_response=True, timeout=120,
                                  **kwargs) as answer:  # fmt: skip
                if attempt == 0 and is_token_rejection(answer.status_code, answer.content or b""):
                    # Another process (or this one's renewal) replaced the token while the request was in
                    # flight: report it on its own row, not as this endpoint's latency, and retry once.
                    answer.request_meta["name"] = "[token] rejected, renewed and retried"
                    answer.success()
                    key = tokens.rejected(key)
                    continue
                problem = check_answer(
                    answer.status_code, answer.content or b"", photo, model, explained, targets
                )
                if problem:
                    answer.failure(f"{encoding} {photo.width}x{photo.height}: {problem}")
                else:
                    answer.success()
                    if "kind" not in STATE:  # which task answers: the mix's "method" scenario adapts to it
                        STATE["kind"] = answer_kind(answer.json())
                return


class PredictionUser(CamUser):
    """``/predictions`` only (no explanations expected)."""

    @tag("predictions")
    @task
    def predict(self) -> None:
        self._post("predictions", explained=False)


class ExplanationUser(CamUser):
    """``/explanations`` with the model's default method and the top-1 target."""

    @tag("explanations")
    @task
    def explain(self) -> None:
        self._post("explanations", explained=True)


def _mix_weights(text: str) -> dict[str, int]:
    weights = {"predictions": 0, "explanations": 0, "explain_flag": 0, "method": 0}
    for item in (part.strip() for part in text.split(",") if part.strip()):
        key, _, value = item.partition("=")
        if key not in weights:
            raise SystemExit(f"--mix: unknown task {key!r}; choose from {sorted(weights)}")
        weights[key] = int(value)
    if sum(weights.values()) <= 0:
        raise SystemExit("--mix: every weight is 0")
    return weights


class MixUser(CamUser):
    """A configurable mix (``--mix``): predictions, explanations, ``explain: true`` on /predictions and
    explanations with a second method (``--second-method``), for two targets where the model is a
    classifier or CLIP (learned from its first answer), else for the task's default subjects."""

    @tag("mix")
    @task
    def mixed(self) -> None:
        weights: dict[str, int] = STATE["mix"]  # type: ignore[assignment]
        kind = random.choices(list(weights), weights=list(weights.values()))[0]
        endpoint, explained, options, targets = request_plan(kind, self.environment.parsed_options.second_method)
        self._post(endpoint, explained, options=options, targets=targets)


def check_slo(environment: Environment, slo_path: str) -> list[str]:
    """Breaches of the SLO file: ``max_failure_ratio`` overall, ``p95_ms`` per endpoint prefix."""
    slo = yaml.safe_load(Path(slo_path).read_text()) or {}
    breaches = []
    total = environment.stats.total
    if total.num_requests == 0:
        breaches.append("no request completed")
    ratio_limit = float(slo.get("max_failure_ratio", 0.0))
    if total.fail_ratio > ratio_limit:
        breaches.append(f"failure ratio {total.fail_ratio:.4f} > {ratio_limit}")
    for prefix, limit in (slo.get("p95_ms") or {}).items():
        for entry in environment.stats.entries.values():
            if entry.name.startswith(f"/{prefix}/") and entry.num_requests:
                p95 = entry.get_response_time_percentile(0.95)
                if p95 > float(limit):
                    breaches.append(f"p95 of {entry.name} = {p95:.0f} ms > {limit} ms")
    return breaches


@events.request.add_listener
def _count(**_) -> None:
    """Ends the run once ``--max-requests`` measured requests are done (the users stop where they are)."""
    environment = STATE.get("environment")
    if not isinstance(environment, Environment) or environment.runner is None or not environment.parsed_options:
        return
    limit = environment.parsed_options.max_requests
    if limit and environment.stats.total.num_requests >= limit and not STATE.get("stopping"):
        STATE["stopping"] = True
        gevent.spawn(_stop_then_quit, environment)  # not from this user's own greenlet, which stop() kills


def _stop_then_quit(environment: Environment) -> None:
    """Stops the users, then quits once Locust's CSV writer has written the final figures: it writes every
    ``CSV_STATS_INTERVAL_SEC`` and only then, so a run shorter than that, quit at once, left ``--csv`` files
    with no requests in them."""
    runner = environment.runner
    assert runner is not None
    runner.stop()
    gevent.sleep(CSV_STATS_INTERVAL_SEC + 0.5)
    runner.quit()


@events.quitting.add_listener
def _enforce_slo(environment: Environment, **_) -> None:
    slo_path = environment.parsed_options.slo if environment.parsed_options else ""
    tokens = STATE.get("tokens")
    if isinstance(tokens, TokenKeeper) and tokens.renewals:
        print(f"inference token renewed {tokens.renewals} time(s) during the run")
    if not slo_path:
        return
    breaches = check_slo(environment, slo_path)
    if breaches:
        print("SLO breached (" + slo_path + "):\n  " + "\n  ".join(breaches), file=sys.stderr)
        environment.process_exit_code = 1
    else:
        print(f"SLO met ({slo_path}): {environment.stats.total.num_requests} requests, "
              f"{environment.stats.total.num_failures} failures")  # fmt: skip

"""The pod's front (nginx rendered and watched by deploy/docker/front.py) in front of the session's TorchServe.

A real nginx (Debian's, installed by `make nginx` (tests/ensure_debian.sh) when missing) runs with the config the container
renders, on loopback. Each attack on the former hand-written gate is pinned here: auth cases, route tricks,
request smuggling (Content-Length / Transfer-Encoding), bad lengths, short bodies, slow connections; then
rotations under load, readiness and the drain.

``NGINX_SLOW_SECONDS`` (default 10) sets how long the slow-connection attack lasts; the issue's full
variant is ``NGINX_SLOW_SECONDS=60``.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from skimage import data

from tests.helpers.front import CLIENT_TOKENS, nginx_binary, raw_exchange, start_front, statuses
from tests.helpers.inputs import encode
from tests.helpers.serving import BATCH_MODEL, DEFAULT_MODEL

if nginx_binary() is None:
    pytest.fail("nginx is missing: run `make nginx` (tests/ensure_debian.sh; make test does)", pytrace=False)

PREDICT = f"/predictions/{DEFAULT_MODEL}"
SLOW_SECONDS = float(os.environ.get("NGINX_SLOW_SECONDS", "10"))
CAT = encode(data.chelsea()[::4, ::4], "JPEG", quality=85)  # 75x113: a cheap, real prediction


@pytest.fixture(scope="module")
def front(server, tmp_path_factory):
    folder = tmp_path_factory.mktemp("front")
    running = start_front(folder, server.workdir / "key_file.json", server.url(), server.url("management"),
                          models=f"{DEFAULT_MODEL},{BATCH_MODEL}",
                          extra_env={"GATE_BODY_TIMEOUT": "2", "GATE_HEADER_TIMEOUT": "3", "GATE_CONN_PER_CLIENT": "64"})
    running.wait_until(lambda: running.readyz() == 200, 60, "/readyz 200")
    yield running
    running.stop()


def _json_error(body: bytes, code: int) -> dict:
    payload = json.loads(body)
    assert payload["code"] == code and payload["type"] and payload["message"], payload
    return payload


def _predict(front, token=CLIENT_TOKENS[0], timeout=60):
    return front.request("POST", PREDICT, token, CAT, {"Content-Type": "image/jpeg"}, timeout=timeout)


def test_an_authorised_prediction_passes_with_either_rotation_token(front, server):
    for token in CLIENT_TOKENS:
        status, headers, body = _predict(front, token)
        assert status == 200, body
        assert json.loads(body)["predictions"][0]["index"] in range(281, 286)  # a cat
    status, _, body = front.request("POST", f"/v1/models/{DEFAULT_MODEL}:predict",
                                    body=json.dumps({"instances": [{"b64": __import__("base64").b64encode(CAT).decode()}]}).encode(),
                                    headers={"Content-Type": "application/json"})  # fmt: skip
    assert status == 200 and json.loads(body)["predictions"][0]["predictions"], body


@pytest.mark.parametrize("case", ["none", "wrong", "torchserve_own", "query", "lowercase_scheme", "uppercased_token",
                                  "basic", "token_twice_in_header"])  # fmt: skip
def test_every_auth_case_is_401_json(front, server, case):
    good = CLIENT_TOKENS[0]
    headers = {"Content-Type": "image/jpeg"}
    path = PREDICT
    authorization = {
        "none": None, "wrong": "Bearer " + "0" * 40, "torchserve_own": f"Bearer {server.keys['inference']}",
        "query": None, "lowercase_scheme": f"bearer {good}", "uppercased_token": f"Bearer {good.upper()}",
        "basic": f"Basic {good}", "token_twice_in_header": f"Bearer {good} {good}",
    }[case]  # fmt: skip
    if case == "query":
        path = f"{PREDICT}?token={good}&access_token={good}"
    if authorization is not None:
        headers["Authorization"] = authorization
    status, answer_headers, body = front.request("POST", path, token=None, body=CAT, headers=headers)
    assert status == 401
    assert _json_error(body, 401)["type"] == "Unauthorized"
    assert answer_headers["content-type"] == "application/json" and answer_headers["www-authenticate"] == "Bearer"


def test_two_authorization_headers_are_refused_before_auth(front):
    """nginx refuses a second Authorization header as a malformed request (400 JSON), valid tokens or not."""
    head = (f"POST {PREDICT} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {CLIENT_TOKENS[0]}\r\n"
            f"Authorization: Bearer {CLIENT_TOKENS[1]}\r\nContent-Type: image/jpeg\r\nContent-Length: {len(CAT)}\r\n\r\n")
    received, closed, _ = raw_exchange(front.port, head.encode() + CAT)
    assert statuses(received) == [400] and closed
    _json_error(received.split(b"\r\n\r\n", 1)[1], 400)


@pytest.mark.parametrize("target", [
    "/models", "//models", "/models/efficientnet_lite0", "/predictions/../models", "/predictions/./..",
    "/predictions/%2e%2e/models", "/predictions/x/%2e%2e/%2e%2e/models", "/v1/models/..:predict",
    "/token?type=inference", "/ping", "/metrics", "/api-description", "/v2/models/efficientnet_lite0/ready",
    "http://127.0.0.1:8081/models", "/predictions/efficientnet_lite0/1.0/extra/segments", "/_front/401",
])  # fmt: skip
def test_every_route_trick_is_404_json(front, target):
    _refused_as_json(front, target, 404)


def _refused_as_json(front, target: str, status: int) -> None:
    """An authorised POST to ``target`` is answered ``status`` alone, with our JSON error body."""
    request = (f"POST {target} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {CLIENT_TOKENS[0]}\r\n"
               "Content-Length: 2\r\nConnection: close\r\n\r\n{}").encode()  # fmt: skip
    received, _, _ = raw_exchange(front.port, request)
    assert statuses(received) == [status], received[:300]
    _json_error(received.split(b"\r\n\r\n", 1)[1], status)


@pytest.mark.parametrize("target", ["/%2e%2e/models", "/predictions/%2e%2e/%2e%2e/models", "/predictions%2f..%2f..%2fmodels"])
def test_dot_segments_above_the_root_are_400_json(front, target):
    """nginx refuses a path that climbs above the root as malformed (400), before any route is matched."""
    _refused_as_json(front, target, 400)


def _smuggle(front, headers: str, body: bytes) -> tuple[list[int], bool, bytes]:
    second = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"  # what a desynchronised proxy would run as request 2
    head = f"POST {PREDICT} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {CLIENT_TOKENS[0]}\r\n{headers}\r\n"
    received, closed, _ = raw_exchange(front.port, head.encode() + body + second, timeout=10)
    return statuses(received), closed, received


def test_duplicate_conflicting_content_length_is_400_and_one_answer(front):
    codes, closed, received = _smuggle(front, f"Content-Length: 0\r\nContent-Length: {len(CAT)}\r\n", CAT)
    assert codes == [400] and closed
    _json_error(received.split(b"\r\n\r\n", 1)[1], 400)


@pytest.mark.parametrize("headers", [
    "Transfer-Encoding: identity\r\nTransfer-Encoding: chunked\r\n",
    "Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n",
    "Transfer-Encoding : chunked\r\n",
    "Content-Length: 5\r\nTransfer-Encoding: chunked\r\n",
])  # fmt: skip
def test_duplicate_or_malformed_transfer_encoding_is_400(front, headers):
    codes, closed, received = _smuggle(front, headers, b"5\r\nhello\r\n0\r\n\r\n")
    assert codes == [400] and closed, received[:400]
    _json_error(received.split(b"\r\n\r\n", 1)[1], 400)


@pytest.mark.parametrize("headers", ["Transfer-Encoding: identity\r\n", "Transfer-Encoding: chunked, identity\r\n",
                                     "Transfer-Encoding: gzip\r\n",
                                     "Transfer-Encoding:\tchunked\r\nContent-Length: 5\r\n"])  # fmt: skip
def test_transfer_codings_other_than_chunked_are_501_json(front, headers):
    codes, closed, received = _smuggle(front, headers, b"5\r\nhello\r\n0\r\n\r\n")
    assert codes == [501] and closed, received[:400]
    _json_error(received.split(b"\r\n\r\n", 1)[1], 501)


@pytest.mark.parametrize("length", ["-1", "abc", "1e3", "0x10", "5, 5", "99999999999999999999999"])
def test_invalid_content_length_is_400(front, length):
    codes, closed, received = _smuggle(front, f"Content-Length: {length}\r\n", b"hello")
    assert codes == [400] and closed, received[:400]
    _json_error(received.split(b"\r\n\r\n", 1)[1], 400)


def test_short_body_is_closed_after_the_body_timeout(front):
    head = f"POST {PREDICT} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {CLIENT_TOKENS[0]}\r\nContent-Length: 1000\r\n\r\n"
    received, closed, elapsed = raw_exchange(front.port, head.encode() + b"x" * 10, timeout=15)
    assert closed and 1.5 <= elapsed <= 6, (closed, elapsed)  # GATE_BODY_TIMEOUT=2 here
    assert statuses(received) in ([], [408])


def test_body_over_torchserve_limit_is_413_json_before_upload(front):
    head = (f"POST {PREDICT} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {CLIENT_TOKENS[0]}\r\n"
            f"Content-Length: {6553500 + 1}\r\n\r\n")  # fmt: skip
    received, _, _ = raw_exchange(front.port, head.encode(), timeout=2)  # the body is never sent
    assert statuses(received) == [413]
    _json_error(received.split(b"\r\n\r\n", 1)[1], 413)


def test_nginx_own_errors_are_json(front):
    received, _, _ = raw_exchange(front.port, b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n")
    assert statuses(received) == [414]
    _json_error(received.split(b"\r\n\r\n", 1)[1], 414)
    received, _, _ = raw_exchange(front.port, b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"b" * 9000 + b"\r\n\r\n")
    assert statuses(received) == [431]
    _json_error(received.split(b"\r\n\r\n", 1)[1], 431)
    received, _, _ = raw_exchange(front.port, b"NOT-HTTP\r\n\r\n")
    assert statuses(received) == [400]
    assert front.request("GET", "/healthz", token=None)[::2] == (200, b'{"status": "ok"}')


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE", "OPTIONS"])
def test_inference_routes_take_post_only(front, method):
    status, headers, body = front.request(method, PREDICT, body=CAT if method == "PUT" else None)
    assert status == 405 and headers["allow"] == "POST"
    _json_error(body, 405)


def test_describe_header_never_reaches_torchserve(front):
    """Only whitelisted headers are forwarded: ``describe: True`` would turn a prediction into a describe call."""
    status, _, body = front.request("POST", PREDICT, body=CAT, headers={"Content-Type": "image/jpeg", "describe": "True"})
    assert status == 200 and "predictions" in json.loads(body)


def test_limit_conn_per_client_address_is_429_json(front):
    """Connections past GATE_CONN_PER_CLIENT (64 here) from one address, each with a request in progress."""
    head = f"POST {PREDICT} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {CLIENT_TOKENS[0]}\r\nContent-Length: 100\r\n\r\n"
    held = []
    try:
        for _ in range(64):
            sock = socket.create_connection(("127.0.0.1", front.port), timeout=10)
            sock.sendall(head.encode() + b"x")  # headers complete, body pending: counted by limit_conn
            held.append(sock)
        time.sleep(0.3)
        received, _, _ = raw_exchange(front.port, head.encode() + b"x" * 100, timeout=2)
        assert statuses(received) == [429]
        _json_error(received.split(b"\r\n\r\n", 1)[1], 429)
    finally:
        for sock in held:
            sock.close()


def _slow_connection(port: int, stop: threading.Event, kind: str, counters: dict, lock: threading.Lock) -> None:
    """Keep one slow connection open (slow headers or a slow body), reconnecting whenever nginx closes it."""
    while not stop.is_set():
        try:
            sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        except OSError:
            time.sleep(0.2)
            continue
        with sock:
            try:
                if kind == "body":
                    sock.sendall(f"POST {PREDICT} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {CLIENT_TOKENS[0]}\r\n"
                                 "Content-Length: 100000\r\n\r\n".encode())  # fmt: skip
                else:
                    sock.sendall(b"POST /predictions/x HTTP/1.1\r\n")
                while not stop.wait(1.0):
                    sock.sendall(b"x" if kind == "body" else b"X-Slow: 1\r\n")
            except OSError:
                with lock:
                    counters[kind] += 1  # nginx closed it


def _latencies(port: int, count: int) -> tuple[list[float], list]:
    """``count`` sequential predictions from another loopback address (127.0.0.2: not the attacker's)."""
    times: list[float] = []
    failures: list = []
    for _ in range(count):
        started = time.perf_counter()
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30, source_address=("127.0.0.2", 0))
        try:
            conn.request("POST", PREDICT, body=CAT, headers={"Authorization": f"Bearer {CLIENT_TOKENS[1]}",
                                                             "Content-Type": "image/jpeg"})  # fmt: skip
            answer = conn.getresponse()
            answer.read()
            if answer.status != 200:
                failures.append(answer.status)
        except OSError as error:
            failures.append(repr(error))
        finally:
            conn.close()
        times.append(time.perf_counter() - started)
    return times, failures


def _p95(values: list[float]) -> float:
    return statistics.quantiles(values, n=20)[-1]


def test_slow_connections_do_not_slow_legitimate_requests(front):
    """200 slow connections (100 trickling headers, 100 trickling a body, reconnecting when closed) for
    NGINX_SLOW_SECONDS: legitimate requests keep a p95 within 2x of the quiet figure, with no failure."""
    _latencies(front.port, 5)
    quiet, failures = _latencies(front.port, 30)
    assert failures == []
    stop, lock, counters = threading.Event(), threading.Lock(), {"header": 0, "body": 0}
    threads = [threading.Thread(target=_slow_connection, args=(front.port, stop, "header" if i % 2 else "body", counters, lock),
                                daemon=True) for i in range(200)]  # fmt: skip
    for thread in threads:
        thread.start()
    attacked, failures, deadline = [], [], time.monotonic() + SLOW_SECONDS
    time.sleep(1.0)
    try:
        while time.monotonic() < deadline:
            times, failed = _latencies(front.port, 5)
            attacked += times
            failures += failed
    finally:
        stop.set()
        for thread in threads:
            thread.join(10)
    assert failures == []
    print(f"p95 quiet {_p95(quiet) * 1000:.0f} ms, under 200 slow connections {_p95(attacked) * 1000:.0f} ms "
          f"({len(attacked)} requests; closed by nginx: {counters})")  # fmt: skip
    assert _p95(attacked) <= 2 * _p95(quiet), (f"p95 quiet {_p95(quiet) * 1000:.0f} ms, "
                                               f"under attack {_p95(attacked) * 1000:.0f} ms")  # fmt: skip
    assert counters["header"] >= 50, counters  # header timeout (3 s here) closed the slow-header ones


#: what a reused keep-alive connection raises when nginx closed it as idle just before the request went out
#: (an nginx reload's old workers close their idle connections): standard HTTP clients send again on a new
#: connection, as urllib3 and browsers do; nginx had not read the request.
STALE_CONNECTION = (BrokenPipeError, ConnectionResetError, http.client.RemoteDisconnected)


def _load(port: int, seconds: float, token: list[str], users: int = 8) -> tuple[list[object], int]:
    """``users`` clients on keep-alive connections sending predictions for ``seconds``, each with ``token[0]``
    as it is at the time of the request: the statuses (or exceptions) of every request, and how many requests
    were sent again on a new connection because a reused one had been closed (:data:`STALE_CONNECTION`; once
    per request, and a second failure is an outcome)."""
    outcomes: list[object] = []
    resent = [0]
    deadline = time.monotonic() + seconds

    def user() -> None:
        conn, used = http.client.HTTPConnection("127.0.0.1", port, timeout=60), False
        while time.monotonic() < deadline:
            for attempt in (0, 1):
                try:
                    conn.request("POST", PREDICT, body=CAT, headers={"Authorization": f"Bearer {token[0]}",
                                                                     "Content-Type": "image/jpeg"})  # fmt: skip
                    answer = conn.getresponse()
                    answer.read()
                    outcomes.append(answer.status)
                    used = not answer.will_close
                    if answer.will_close:
                        conn.close()
                    break
                except STALE_CONNECTION as error:
                    conn.close()
                    if not used or attempt:
                        outcomes.append(error)
                        break
                    resent[0] += 1
                    used = False
                except (OSError, http.client.HTTPException) as error:
                    outcomes.append(error)
                    conn.close()
                    used = False
                    break
        conn.close()

    with ThreadPoolExecutor(users) as pool:
        for _ in range(users):
            pool.submit(user)
    return outcomes, resent[0]


def test_rotations_under_load_lose_nothing(front, server, tmp_path):
    """Under 8 users: the client Secret rotates (new token added, clients switch, old token removed: nginx
    reloads twice) and TorchServe's key is rotated by the watcher (here whenever it is 3 s old) several times.
    Every request is answered 200; a request whose reused keep-alive connection an nginx reload had just closed
    is sent again on a new one, as HTTP clients do (at most once per user and reload)."""
    rotating = start_front(tmp_path / "rotating", server.workdir / "key_file.json", server.url(), server.url("management"),
                           models=DEFAULT_MODEL, extra_env={"GATE_ROTATE_MARGIN_S": "3597"})  # fmt: skip
    new_token = "5ca1ab1e" * 5
    token = [CLIENT_TOKENS[0]]
    try:
        def rotate_secret() -> None:
            time.sleep(2)
            rotating.tokens_file.write_text("\n".join([*CLIENT_TOKENS, new_token]) + "\n")
            rotating.wait_until(lambda: rotating.request("POST", PREDICT, new_token, CAT,
                                                         {"Content-Type": "image/jpeg"})[0] == 200, 10, "new token")  # fmt: skip
            token[0] = new_token
            time.sleep(1)
            rotating.tokens_file.write_text(new_token + "\n")

        secret = threading.Thread(target=rotate_secret)
        secret.start()
        outcomes, resent = _load(rotating.port, 10, token)
        secret.join()
        rotating.wait_until(lambda: rotating.request("POST", PREDICT, CLIENT_TOKENS[0], CAT,
                                                     {"Content-Type": "image/jpeg"})[0] == 401, 10, "old token refused")  # fmt: skip
    finally:
        rotating.stop()
    log = (tmp_path / "rotating" / "front.log").read_text()
    rotations = log.count("rotated TorchServe's inference key")
    failures = [o for o in outcomes if o != 200]
    assert len(outcomes) >= 50 and failures == [], (len(outcomes), failures[:5])
    assert resent <= 2 * 8, resent  # two reloads, each closing at most every user's idle connection once
    assert rotations >= 2, log[-2000:]
    assert outcomes.count(200) == len(outcomes)


def _readyz(front) -> tuple[int, dict]:
    status, _, body = front.request("GET", "/readyz", token=None, timeout=10)
    return status, json.loads(body)


def test_readyz_follows_the_audit_and_drain_markers(front):
    assert _readyz(front)[0] == 200
    marker = front.run_dir / "audit-unavailable-audit_strict"
    marker.write_text("database is locked\n")
    try:
        front.wait_until(lambda: _readyz(front)[0] == 503, 5, "/readyz 503 while the audit cannot write")
        assert "database is locked" in _readyz(front)[1]["message"]
    finally:
        marker.unlink()
    front.wait_until(lambda: _readyz(front)[0] == 200, 5, "/readyz 200 again")
    drain = front.run_dir / "draining"
    drain.write_text("draining\n")
    try:
        assert _readyz(front) == (503, {"status": "draining"})  # at once: nginx checks the marker itself
    finally:
        drain.unlink()
    front.wait_until(lambda: _readyz(front)[0] == 200, 5, "/readyz 200 after the drain marker")


def _worker_pids(server, model: str) -> list[int]:
    described = requests_json(server, f"/models/{model}")
    return [w["pid"] for version in described for w in version["workers"] if w.get("status") == "READY"]


def requests_json(server, path: str):
    conn = http.client.HTTPConnection("127.0.0.1", server.ports["management"], timeout=10)
    try:
        conn.request("GET", path, headers=server.headers("management"))
        return json.loads(conn.getresponse().read())
    finally:
        conn.close()


def test_readiness_is_false_within_10s_of_a_worker_death_and_true_after_recovery(front, server):
    (pid,) = _worker_pids(server, BATCH_MODEL)
    assert _readyz(front)[0] == 200
    os.kill(pid, signal.SIGKILL)
    took = front.wait_until(lambda: _readyz(front)[0] == 503, 10, "/readyz 503 after the worker died")
    assert took <= 10
    back = front.wait_until(lambda: _readyz(front)[0] == 200, 120, "/readyz 200 after TorchServe restarted the worker")
    print(f"/readyz 503 {took:.1f} s after the worker's death, 200 again {back:.1f} s later")
    assert _worker_pids(server, BATCH_MODEL) != [pid]

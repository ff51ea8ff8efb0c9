"""The pod's front door: nginx in front of TorchServe, and the control-plane watcher that feeds it.

nginx (Debian's package) is the only client-facing port of a pod or InferenceService; nothing Python sits on
the data path. This module renders nginx's configuration from the environment, starts nginx, and then only
watches (once a second) and reloads nginx when something changed:

- client auth: the Secret's tokens (``GATE_CLIENT_TOKENS_FILE``, one per line, several during a rotation)
  become a ``map`` over the ``Authorization`` header (``clients.conf``); a changed Secret is re-rendered and
  nginx reloaded (graceful: requests in flight finish on the old workers);
- TorchServe's per-process inference token (``key_file.json``) is injected upstream. nginx reads it per
  request, without a reload, from the symlink ``ts-key`` -> ``ts-keys/k-<key>`` (``$realpath_root``): the
  watcher swaps the link (an atomic rename). TorchServe 0.12 has one inference key at a time, so its
  rotation (through the management API with the API key, ``GATE_ROTATE_MARGIN_S`` before expiry; see
  ts_tokens.py) is a cut-over: the watcher first creates the ``rotating`` marker, while which nginx retries a
  request that TorchServe answers 400 (twice at most, each time with the key read anew), rotates, swaps the
  link, and removes the marker a second later. No client sees the cut-over;
- readiness: every ``GATE_READY_PERIOD_S`` the watcher runs the same check as ``probe.py ready`` (a live
  worker per model, a bounded real prediction, no ``audit-unavailable-*`` file, no drain marker) and writes
  ``ready.json`` or ``not-ready.json``, which nginx serves as ``/readyz`` (200 / 503);
- SIGTERM: nginx is told to quit gracefully (``SIGQUIT``: in-flight requests are answered, idle keep-alive
  connections closed), and the watcher exits with nginx.

What nginx enforces (see ``render_nginx_conf``): only inference routes (``/predictions``, ``/explanations``,
KServe v1 and v2), a Bearer token of the Secret (case-exact ``Bearer`` scheme; tokens are lowercase), one
``Authorization`` header, nginx's strict HTTP/1.1 parsing (duplicate ``Content-Length``, ``Transfer-Encoding``
other than ``chunked``, bad lengths: 400/501), ``client_max_body_size`` = TorchServe's ``max_request_size``,
header/body/keep-alive/send timeouts, ``limit_conn`` per client address, upstream keep-alive, and a JSON body
``{code, type, message}`` for every error nginx answers itself. Only a whitelist of request headers reaches
TorchServe (never the client's ``Authorization``, never ``describe``).

    python front.py run                      # render, start nginx, watch (the container command)
    python front.py render --out DIR         # render into DIR only (make deploy-check runs nginx -t on it)

Environment (defaults in brackets): GATE_LISTEN [0.0.0.0:8090], TS_INFERENCE_URL [http://127.0.0.1:8080],
TS_MANAGEMENT_URL [http://127.0.0.1:8081], TS_KEY_FILE, GATE_CLIENT_TOKENS_FILE, GATE_MAX_BODY [6553500],
GATE_TIMEOUT [120] (seconds for TorchServe's answer), GATE_HEADER_TIMEOUT [10], GATE_BODY_TIMEOUT [10],
GATE_KEEPALIVE_TIMEOUT [30], GATE_SEND_TIMEOUT [30], GATE_CONN_PER_CLIENT [128], GATE_WORKERS [1],
GATE_STATE_DIR [/tmp/torchserve-cam-front], GATE_READY_PERIOD_S [5], GATE_NGINX [nginx], GATE_NGINX_USER
[none: nginx runs as the container's user], TS_MODELS, TS_PID_CHECK, TS_PROBE_PREDICT_TIMEOUT_S (see probe.py).
Stdlib only.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import probe
from ts_tokens import (
    DEFAULT_INFERENCE_URL,
    DEFAULT_KEY_FILE,
    DEFAULT_MANAGEMENT_URL,
    TokenError,
    TokenSource,
    read_tokens,
)

# A client token: 16-512 characters, no upper case (nginx's map compares case-insensitively, so a token with
# capitals would also be accepted in other cases), nothing that needs quoting in nginx's config.
CLIENT_TOKEN = re.compile(r"[a-z0-9._~+/=-]{16,512}")
MODEL_NAME = r"[A-Za-z0-9][A-Za-z0-9_.\-]*"
# The routes nginx forwards (matched against nginx's normalised URI: %-decoded, dot segments resolved,
# slashes merged), the same as the former token gate's.
ROUTES = (
    rf"^/(predictions|explanations)/{MODEL_NAME}(/{MODEL_NAME})?/?$",
    rf"^/v1/models/{MODEL_NAME}(:predict|:explain)?$",
    rf"^/v2/models/{MODEL_NAME}/(infer|explain)$",
)
# Request headers passed on to TorchServe; everything else (Authorization, describe, hop-by-hop) is dropped.
FORWARDED_REQUEST_HEADERS = ("Content-Type", "Accept", "explain", "X-Request-Id", "traceparent",
                             "Inference-Header-Content-Length")  # fmt: skip
# While TorchServe's key is rotated, a request TorchServe answers 400 is sent again, up to this many times, each
# time with the key read anew (a handler's own 400 is answered again the same way: the client gets that one).
RETRIES = 8  # nginx allows 10 internal redirects per request: the rewrite to /_rotating/ and these
# The errors nginx may answer itself: status -> (type, message). Upstream answers pass through unchanged.
ERRORS = {
    400: ("BadRequest", "malformed request"),
    401: ("Unauthorized", "missing or invalid bearer token"),
    403: ("Forbidden", "forbidden"),
    404: ("NotFound", "only inference routes are served here"),
    405: ("MethodNotAllowed", "method not allowed"),
    408: ("RequestTimeout", "the request was not received in time"),
    411: ("LengthRequired", "a Content-Length is required"),
    413: ("RequestTooLarge", "request body too large"),
    414: ("URITooLong", "request URI too long"),
    429: ("TooManyConnections", "too many connections from this address"),
    431: ("HeadersTooLarge", "request headers too large"),
    500: ("InternalError", "internal error in the front proxy"),
    501: ("NotImplemented", "unsupported Transfer-Encoding or method"),
    502: ("BadGateway", "the model server is not reachable"),
    503: ("ServiceUnavailable", "the model server is not ready"),
    504: ("GatewayTimeout", "the model server did not answer in time"),
    505: ("HTTPVersionNotSupported", "HTTP version not supported"),
}


class ConfigError(ValueError):
    """The environment or the Secret cannot be rendered into a safe nginx config."""


def _seconds(env: dict, name: str, default: float) -> float:
    value = float(env.get(name, default))
    if value <= 0:
        raise ConfigError(f"{name} must be positive, not {value}")
    return value


@dataclass(frozen=True)
class Settings:
    """Everything the rendered config depends on (besides the tokens)."""

    listen: str = "0.0.0.0:8090"
    inference_url: str = DEFAULT_INFERENCE_URL
    management_url: str = DEFAULT_MANAGEMENT_URL
    key_file: Path = Path(DEFAULT_KEY_FILE)
    client_tokens_file: Path = Path("/var/run/secrets/torchserve-cam/client-tokens")
    state_dir: Path = Path("/tmp/torchserve-cam-front")
    max_body: int = 6553500
    upstream_timeout: float = 120.0
    header_timeout: float = 10.0
    body_timeout: float = 10.0
    keepalive_timeout: float = 30.0
    send_timeout: float = 30.0
    conn_per_client: int = 128
    workers: int = 1
    nginx: str = "nginx"
    nginx_user: str | None = None
    ready_period: float = 5.0
    rotate_margin: dt.timedelta = dt.timedelta(minutes=5)
    models: tuple[str, ...] = field(default_factory=tuple)

    @classmethod
    def from_env(cls, env: dict | None = None) -> Settings:
        env = dict(os.environ if env is None else env)
        settings = cls(
            listen=env.get("GATE_LISTEN", cls.listen),
            inference_url=env.get("TS_INFERENCE_URL", DEFAULT_INFERENCE_URL),
            management_url=env.get("TS_MANAGEMENT_URL", DEFAULT_MANAGEMENT_URL),
            key_file=Path(env.get("TS_KEY_FILE", DEFAULT_KEY_FILE)),
            client_tokens_file=Path(env.get("GATE_CLIENT_TOKENS_FILE", str(cls.client_tokens_file))),
            state_dir=Path(env.get("GATE_STATE_DIR", str(cls.state_dir))),
            max_body=int(env.get("GATE_MAX_BODY", cls.max_body)),
            upstream_timeout=_seconds(env, "GATE_TIMEOUT", cls.upstream_timeout),
            header_timeout=_seconds(env, "GATE_HEADER_TIMEOUT", cls.header_timeout),
            body_timeout=_seconds(env, "GATE_BODY_TIMEOUT", cls.body_timeout),
            keepalive_timeout=_seconds(env, "GATE_KEEPALIVE_TIMEOUT", cls.keepalive_timeout),
            send_timeout=_seconds(env, "GATE_SEND_TIMEOUT", cls.send_timeout),
            conn_per_client=int(env.get("GATE_CONN_PER_CLIENT", cls.conn_per_client)),
            workers=int(env.get("GATE_WORKERS", cls.workers)),
            nginx=env.get("GATE_NGINX", cls.nginx),
            nginx_user=env.get("GATE_NGINX_USER") or None,
            ready_period=_seconds(env, "GATE_READY_PERIOD_S", cls.ready_period),
            rotate_margin=dt.timedelta(seconds=_seconds(env, "GATE_ROTATE_MARGIN_S", 300)),
            models=tuple(m for m in env.get("TS_MODELS", "").split(",") if m),
        )
        settings.upstream()  # validates TS_INFERENCE_URL
        if not re.fullmatch(r"(\[[0-9a-fA-F:]+\]|[0-9.]+|\*)?:?\d{1,5}", settings.listen):
            raise ConfigError(f"GATE_LISTEN {settings.listen!r}: give host:port (or a port)")
        if settings.max_body <= 0 or settings.conn_per_client <= 0 or settings.workers <= 0:
            raise ConfigError("GATE_MAX_BODY, GATE_CONN_PER_CLIENT and GATE_WORKERS must be positive")
        return settings

    def upstream(self) -> str:
        """``host:port`` of TorchServe's inference API (loopback, in the pod)."""
        parts = urlsplit(self.inference_url)
        if parts.scheme != "http" or not parts.hostname or not parts.port:
            raise ConfigError(f"TS_INFERENCE_URL {self.inference_url!r}: give http://host:port")
        return f"{parts.hostname}:{parts.port}"

    @property
    def drain_marker(self) -> Path:
        return self.key_file.parent / "draining"  # probe.drain_marker(): the shared run directory


def load_client_tokens(path: str | Path) -> list[str]:
    """Accepted client tokens: one per non-empty, non-comment line. A missing file gives no token."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError:
        return []
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def render_clients(tokens: list[str]) -> str:
    """``clients.conf``: ``$gate_client`` is 1 for ``Authorization: Bearer <one of tokens>``, else 0.

    nginx's ``map`` looks a string up in a hash (no per-character early exit) but compares
    case-insensitively, hence lower-case tokens only and a case-exact check of the ``Bearer`` scheme."""
    bad = [t for t in tokens if not CLIENT_TOKEN.fullmatch(t)]
    if bad:
        raise ConfigError(f"{len(bad)} client token(s) are not 16-512 characters of [a-z0-9._~+/=-] "
                          "(lower case: nginx compares tokens case-insensitively); use openssl rand -hex 32")  # fmt: skip
    lines = ["# Rendered by front.py from the client-token Secret: do not edit.",
             "map $http_authorization $gate_token_known {", "    default 0;"]  # fmt: skip
    lines += [f'    "Bearer {token}" 1;' for token in dict.fromkeys(tokens)]
    lines += ["}", "map $http_authorization $gate_bearer_exact {", "    default 0;",
              '    "~^Bearer [^A-Z\\s]+$" 1;', "}",
              'map "$gate_bearer_exact$gate_token_known" $gate_client {', "    default 0;", '    "11" 1;', "}"]  # fmt: skip
    return "\n".join(lines) + "\n"


def key_link_target(token: str | None) -> str:
    """Where ``ts-key`` points for TorchServe's inference key ``token`` (``ts-keys/none`` before there is one)."""
    if token is None:
        return "ts-keys/none"
    if not re.fullmatch(r"[A-Za-z0-9_=+-]{1,256}", token):
        raise ConfigError("TorchServe's inference key has unexpected characters")
    return f"ts-keys/k-{token}"


def _key_maps() -> str:
    """``$ts_authorization`` (and two copies, evaluated afresh by the retries): ``Bearer <key>`` from the
    location's root, the ``ts-key`` symlink resolved per request; "" while there is no key."""
    return "\n".join(
        f'    map $realpath_root $ts_authorization{suffix} {{\n        default "";\n'
        f'        "~/ts-keys/k-(?<key{suffix}>[A-Za-z0-9_=+-]+)$" "Bearer $key{suffix}";\n    }}'
        for suffix in ("", *(f"_{attempt}" for attempt in range(1, RETRIES + 1))))


def _error_locations() -> str:
    blocks = []
    for code, (kind, message) in ERRORS.items():
        body = json.dumps({"code": code, "type": kind, "message": message}).replace("'", "\\'")
        extra = "        add_header WWW-Authenticate 'Bearer' always;\n" if code == 401 else ""
        blocks.append(f"    location = /_front/{code} {{\n        internal;\n{extra}        return {code} '{body}';\n    }}")
    return "\n".join(blocks)


def _proxy(auth: str) -> str:
    headers = "\n".join(f"        proxy_set_header {name} $http_{name.lower().replace('-', '_')};"
                        for name in FORWARDED_REQUEST_HEADERS if name != "Content-Type")  # fmt: skip
    return f"""        proxy_pass http://torchserve$uri$is_args$args;
        proxy_pass_request_headers off;
        proxy_set_header Host $proxy_host;
        proxy_set_header Connection "";
        proxy_set_header Authorization ${auth};
        proxy_set_header Content-Type $content_type;
{headers}"""


def _routes(state: Path) -> str:
    """The inference locations, and the retrying ones used while ``rotating`` exists."""
    guard = f"""        root {state}/ts-key;
        if ($gate_client = 0) {{
            return 401;
        }}
        if ($ts_authorization = "") {{
            return 503;
        }}
        if (-f {state}/rotating) {{
            rewrite ^ /_rotating$uri last;
        }}
"""
    blocks = [f"    location ~ {route} {{\n{guard}{_proxy('ts_authorization')}\n    }}" for route in ROUTES]
    retry = ("        proxy_intercept_errors on;\n        recursive_error_pages on;\n"
             "        error_page 502 /_front/502;\n        error_page 504 /_front/504;\n")
    blocks.append(f"""    location ^~ /_rotating/ {{
        internal;
        root {state}/ts-key;
        rewrite ^/_rotating(/.*)$ $1 break;
{retry}        error_page 400 = @retry_1;
{_proxy('ts_authorization')}
    }}""")
    for attempt in range(1, RETRIES + 1):
        chain = f"{retry}        error_page 400 = @retry_{attempt + 1};\n" if attempt < RETRIES else ""
        blocks.append(f"""    location @retry_{attempt} {{
        root {state}/ts-key;
{chain}{_proxy(f'ts_authorization_{attempt}')}
    }}""")
    return "\n".join(blocks)


def render_nginx_conf(settings: Settings) -> str:
    """The main ``nginx.conf`` (includes ``clients.conf`` from the same folder)."""
    state = settings.state_dir.resolve()
    error_pages = "\n".join(f"    error_page {code} /_front/{code};" for code in ERRORS if code != 431)
    user = f"user {settings.nginx_user};\n" if settings.nginx_user else ""
    marker = str(settings.drain_marker).replace('"', "")
    return f"""# Rendered by deploy/docker/front.py from the environment: do not edit (it is rewritten at start).
{user}worker_processes {settings.workers};
daemon off;
pid {state}/nginx.pid;
error_log stderr warn;
events {{
    worker_connections 4096;
}}
http {{
    server_tokens off;
    default_type application/json;
    log_format front '$remote_addr "$request_method $uri" $status $body_bytes_sent $request_time $upstream_status $upstream_response_time';
    access_log {state}/access.log front buffer=16k flush=2s;
    client_body_temp_path {state}/tmp/client_body;
    proxy_temp_path {state}/tmp/proxy;
    fastcgi_temp_path {state}/tmp/fastcgi;
    uwsgi_temp_path {state}/tmp/uwsgi;
    scgi_temp_path {state}/tmp/scgi;

    # Requests: TorchServe's own size limit, and every phase bounded in time.
    client_max_body_size {settings.max_body};
    client_body_buffer_size 1m;
    client_header_buffer_size 1k;
    large_client_header_buffers 4 8k;
    client_header_timeout {settings.header_timeout:g}s;
    client_body_timeout {settings.body_timeout:g}s;
    keepalive_timeout {settings.keepalive_timeout:g}s;
    keepalive_requests 1000;
    send_timeout {settings.send_timeout:g}s;
    reset_timedout_connection on;
    ignore_invalid_headers on;
    underscores_in_headers off;
    merge_slashes on;
    limit_conn_zone $binary_remote_addr zone=per_client:10m;
    limit_conn_status 429;
    limit_conn_log_level warn;

    map_hash_bucket_size 1024;  # a key holds a whole header: "Bearer " + a token of up to 512 characters
    include {state}/clients.conf;
{_key_maps()}

    upstream torchserve {{
        server {settings.upstream()} max_fails=0;
        keepalive 64;
        keepalive_timeout 60s;
    }}
    proxy_http_version 1.1;
    proxy_connect_timeout 5s;
    proxy_send_timeout {settings.upstream_timeout:g}s;
    proxy_read_timeout {settings.upstream_timeout:g}s;
    proxy_request_buffering on;
    proxy_buffering on;
    proxy_buffers 16 64k;
    proxy_max_temp_file_size 0;
    proxy_next_upstream off;

    server {{
        listen {settings.listen} backlog=4096;
        limit_conn per_client {settings.conn_per_client};
{error_pages}
    error_page 494 =431 /_front/431;

    location = /healthz {{
        access_log off;
        return 200 '{{"status": "ok"}}';
    }}
    location = /readyz {{
        access_log off;
        if (-f "{marker}") {{
            return 503 '{{"status": "draining"}}';
        }}
        root {state}/status;
        try_files /ready.json =503;
        error_page 503 /not-ready.json;
    }}
    location = /not-ready.json {{
        internal;
        root {state}/status;
        try_files /not-ready.json /_front/503;
    }}
{_routes(state)}
    location / {{
        return 404;
    }}
{_error_locations()}
    }}
}}
"""


def write_atomic(path: Path, text: str) -> bool:
    """Write ``text`` to ``path`` (rename, so that nginx never reads half a file). Returns whether it changed."""
    try:
        if path.read_text() == text:
            return False
    except OSError:
        pass
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.chmod(0o644)
    os.replace(tmp, path)
    return True


def render_all(settings: Settings) -> dict[str, bool]:
    """Write nginx.conf and clients.conf into the state folder (and ``ts-key`` -> ``ts-keys/none`` if there is
    no link yet); which ones changed."""
    state = settings.state_dir
    for sub in ("tmp", "status", "ts-keys/none"):
        (state / sub).mkdir(parents=True, exist_ok=True)
    if not (state / "ts-key").is_symlink():
        point_key_link(settings, None)
    return {
        "nginx.conf": write_atomic(state / "nginx.conf", render_nginx_conf(settings)),
        "clients.conf": write_atomic(state / "clients.conf", render_clients(load_client_tokens(settings.client_tokens_file))),
    }  # fmt: skip


def point_key_link(settings: Settings, token: str | None) -> bool:
    """Point ``ts-key`` at TorchServe's key ``token`` (an atomic rename; nginx reads it on the next request)
    and remove the folders of older keys. Returns whether the link changed."""
    state = settings.state_dir
    link, target = state / "ts-key", key_link_target(token)
    if link.is_symlink() and os.readlink(link) == target:
        return False
    (state / target).mkdir(parents=True, exist_ok=True)
    tmp = state / ".ts-key.tmp"
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(target)
    os.replace(tmp, link)
    for old in (state / "ts-keys").glob("k-*"):
        if old.name != Path(target).name:
            old.rmdir()
    return True


def nginx_command(settings: Settings, *extra: str) -> list[str]:
    state = settings.state_dir.resolve()
    return [settings.nginx, "-p", str(state), "-c", str(state / "nginx.conf"), "-e", "stderr", *extra]


def check_config(settings: Settings) -> tuple[bool, str]:
    """``nginx -t`` on the rendered config: (passed, nginx's output)."""
    done = subprocess.run(nginx_command(settings, "-t"), capture_output=True, text=True, timeout=60)
    return done.returncode == 0, done.stdout + done.stderr


def write_readiness(settings: Settings, ready: bool, message: str) -> None:
    """``status/ready.json`` (nginx's /readyz answers 200 with it) or ``status/not-ready.json`` (503)."""
    status = settings.state_dir / "status"
    status.mkdir(parents=True, exist_ok=True)
    keep, drop = ("ready.json", "not-ready.json") if ready else ("not-ready.json", "ready.json")
    body = {"status": "ready", "message": message} if ready else {
        "code": 503, "type": "NotReady", "status": "not ready", "message": message}  # fmt: skip
    write_atomic(status / keep, json.dumps(body) + "\n")
    (status / drop).unlink(missing_ok=True)


class Watcher:
    """Runs nginx and keeps its tokens and readiness current (see the module docstring)."""

    def __init__(self, settings: Settings, poll: float = 0.25, settle: float = 1.0) -> None:
        self.settings = settings
        self.poll = poll
        self.settle = settle  # seconds the rotating marker stands before and after a rotation
        # The watcher rotates TorchServe's key itself, well before the probes would (ts_tokens.ROTATE_MARGIN).
        self.tokens = TokenSource(settings.key_file, settings.management_url, margin=settings.rotate_margin)
        self.nginx: subprocess.Popen | None = None
        self.stopping = False
        self.reloads = 0
        self.rotations = 0
        self._next_ready = 0.0

    def start(self) -> None:
        write_readiness(self.settings, False, "starting")
        (self.settings.state_dir / "rotating").unlink(missing_ok=True)
        self.refresh(reload=False)
        self.update_key()
        passed, output = check_config(self.settings)
        if not passed:
            raise ConfigError(f"nginx -t failed:\n{output}")
        self.nginx = subprocess.Popen(nginx_command(self.settings))

    def refresh(self, reload: bool = True) -> bool:
        """Re-render nginx.conf and clients.conf; reload nginx (SIGHUP, graceful) when one changed."""
        changed = any(render_all(self.settings).values())
        if changed and reload and self.nginx is not None and self.nginx.poll() is None:
            self.nginx.send_signal(signal.SIGHUP)
            self.reloads += 1
        return changed

    def update_key(self) -> None:
        """Point nginx at TorchServe's current inference key; rotate it first when it is about to expire."""
        try:
            token = read_tokens(self.settings.key_file)["inference"]
        except TokenError:
            return  # not written yet, or caught while TorchServe rewrites it: keep the last key
        if not token.expiring(dt.datetime.now(dt.timezone.utc), self.settings.rotate_margin):
            point_key_link(self.settings, token.key)
            return
        marker = self.settings.state_dir / "rotating"
        marker.write_text("TorchServe's inference key is being rotated: nginx retries a 400\n")
        try:
            time.sleep(self.settle)  # requests routed before the marker existed reach TorchServe meanwhile
            self._rotate_and_follow(token.key)
            self.rotations += 1
            print(f"front: rotated TorchServe's inference key ({self.rotations} so far)", file=sys.stderr)
            time.sleep(self.settle)  # requests sent with the old key come back and are retried
        except (TokenError, OSError) as error:
            print(f"front: rotating TorchServe's inference key failed: {error}", file=sys.stderr)
        finally:
            marker.unlink(missing_ok=True)

    def _rotate_and_follow(self, old_key: str) -> None:
        """Rotate through TorchServe and point nginx at the new key the moment TorchServe writes it (it writes
        the file before it answers the rotation call): the fewer milliseconds between TorchServe's switch and
        nginx's, the fewer retries a request needs."""
        done = threading.Event()

        def follow() -> None:
            while not done.is_set():
                try:
                    key = read_tokens(self.settings.key_file)["inference"].key
                except TokenError:
                    key = old_key  # caught mid-write
                if key != old_key:
                    point_key_link(self.settings, key)
                    return
                time.sleep(0.0002)

        follower = threading.Thread(target=follow, daemon=True)
        follower.start()
        try:
            new_key = self.tokens.rotate("inference", only_if_expiring=True)
        finally:
            done.set()
            follower.join()
        point_key_link(self.settings, new_key)

    def update_readiness(self) -> None:
        if self.settings.drain_marker.exists():
            write_readiness(self.settings, False, "draining: this pod is shutting down")
            return
        try:
            ok, message = probe.check_ready(self.tokens, list(self.settings.models), inference_url=self.settings.inference_url)
        except (TokenError, OSError, ValueError) as error:
            ok, message = False, f"{type(error).__name__}: {error}"
        write_readiness(self.settings, ok, message)

    def step(self) -> None:
        try:
            self.refresh()
            self.update_key()
        except ConfigError as error:  # keep serving with the last good config
            print(f"front: not reloading: {error}", file=sys.stderr)
        if time.monotonic() >= self._next_ready:
            self.update_readiness()
            self._next_ready = time.monotonic() + self.settings.ready_period

    def quit(self, *_args) -> None:
        """SIGTERM: nginx quits gracefully (answers what it holds, closes idle connections)."""
        self.stopping = True
        if self.nginx is not None and self.nginx.poll() is None:
            self.nginx.send_signal(signal.SIGQUIT)

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self.quit)
        signal.signal(signal.SIGINT, self.quit)
        self.start()
        assert self.nginx is not None
        while self.nginx.poll() is None:
            if not self.stopping:
                self.step()
            time.sleep(self.poll)
        return 0 if self.stopping else (self.nginx.returncode or 1)


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in {"run", "render"}:
        print("usage: front.py run | render --out DIR", file=sys.stderr)
        return 2
    env = dict(os.environ)
    if argv[0] == "render" and len(argv) == 3 and argv[1] == "--out":
        env["GATE_STATE_DIR"] = argv[2]
    try:
        settings = Settings.from_env(env)
        if argv[0] == "render":
            render_all(settings)
            print(settings.state_dir / "nginx.conf")
            return 0
        if not load_client_tokens(settings.client_tokens_file):
            print(f"front: no client token in {settings.client_tokens_file}; refusing to start", file=sys.stderr)
            return 1
        return Watcher(settings).run()
    except ConfigError as error:
        print(f"front: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

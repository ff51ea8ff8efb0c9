"""nginx's configuration for the pod's front (see front.py): rendered from the environment and the Secret.

Everything here is pure text rendering; front.py writes the files, runs nginx and watches. Stdlib only.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from ts_tokens import DEFAULT_INFERENCE_URL, DEFAULT_KEY_FILE, DEFAULT_MANAGEMENT_URL

__all__ = ["CLIENT_TOKEN", "ROUTES", "FORWARDED_REQUEST_HEADERS", "RETRIES", "ERRORS", "ConfigError", "Settings",
           "load_client_tokens", "render_clients", "key_link_target", "render_nginx_conf"]

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
    405: ("MethodNotAllowed", "inference routes take POST"),
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
        extra = {401: "        add_header WWW-Authenticate 'Bearer' always;\n",
                 405: "        add_header Allow 'POST' always;\n"}.get(code, "")  # fmt: skip
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
        if ($request_method != POST) {{
            return 405;
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

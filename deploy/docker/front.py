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

What nginx enforces (see ``front_conf.render_nginx_conf``): only inference routes (``/predictions``, ``/explanations``,
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
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import probe
from front_conf import (  # noqa: F401 (ROUTES, ERRORS: re-exported for the tests and deploy_check)
    ERRORS,
    ROUTES,
    ConfigError,
    Settings,
    key_link_target,
    load_client_tokens,
    render_clients,
    render_nginx_conf,
)
from ts_tokens import TokenError, TokenSource, read_tokens


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

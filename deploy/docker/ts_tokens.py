"""Read TorchServe's per-process tokens from key_file.json and rotate them before they expire.

TorchServe 0.12 writes ``key_file.json`` (mode 0600) into its working directory at start:

    {"management": {"key": ..., "expiration time": ISO-8601},
     "inference":  {"key": ..., "expiration time": ISO-8601},
     "API":        {"key": ...}}

The inference and management keys expire after ``token_expiration_min``; the API key does not, and
``GET <management>/token?type=inference|management`` with ``Authorization: Bearer <API key>`` issues a
fresh key and rewrites the file. Nothing outside the pod ever sees these keys: the in-container probe and
the front's watcher (same user, shared working directory) read them here.

Rotation takes an exclusive ``flock`` on a lock file next to the key file and re-reads the file inside
the lock, so concurrent probes and the watcher rotate a key at most once.

Stdlib only.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import http.client
import json
import os
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

DEFAULT_KEY_FILE = "/home/model-server/run/key_file.json"
DEFAULT_MANAGEMENT_URL = "http://127.0.0.1:8081"
DEFAULT_INFERENCE_URL = "http://127.0.0.1:8080"
# Rotate this long before the recorded expiry, so that a key is never used in its last seconds.
ROTATE_MARGIN = dt.timedelta(seconds=60)


class TokenError(RuntimeError):
    """The key file is missing, unreadable or malformed, or a rotation failed."""


@dataclass(frozen=True)
class Token:
    key: str
    expires: dt.datetime | None  # None: never expires (the API key)

    def expiring(self, now: dt.datetime, margin: dt.timedelta = ROTATE_MARGIN) -> bool:
        return self.expires is not None and self.expires - margin <= now


def _parse_time(value: str) -> dt.datetime:
    # Java's Instant.toString gives nanoseconds ("...12.980089273Z"); fromisoformat takes microseconds.
    value = value.strip().replace("Z", "+00:00")
    head, dot, rest = value.partition(".")
    if dot:
        digits = "".join(ch for ch in rest if ch.isdigit())
        zone = rest[len(digits):]
        value = f"{head}.{digits[:6].ljust(6, '0')}{zone}"
    parsed = dt.datetime.fromisoformat(value)
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.timezone.utc)


def read_tokens(key_file: str | Path) -> dict[str, Token]:
    """Return ``{"inference": Token, "management": Token, "API": Token}`` from a TorchServe key file."""
    try:
        raw = json.loads(Path(key_file).read_text())
        tokens = {}
        for kind in ("inference", "management", "API"):
            entry = raw[kind]
            expires = entry.get("expiration time")
            tokens[kind] = Token(str(entry["key"]), _parse_time(expires) if expires else None)
        return tokens
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise TokenError(f"cannot read TorchServe key file {key_file}: {exc}") from exc


def http_request(
    url: str, path: str, token: str | None, *, method: str = "GET", body: bytes | None = None,
    headers: dict[str, str] | None = None, timeout: float = 5.0,
) -> tuple[int, bytes]:
    """One HTTP request to a local TorchServe port; returns (status, body)."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    try:
        all_headers = dict(headers or {})
        if token is not None:
            all_headers["Authorization"] = f"Bearer {token}"
        conn.request(method, path, body=body, headers=all_headers)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


class TokenSource:
    """Hands out a valid inference or management token, rotating it through TorchServe when it expires."""

    def __init__(self, key_file: str | Path = DEFAULT_KEY_FILE, management_url: str = DEFAULT_MANAGEMENT_URL,
                 *, now=lambda: dt.datetime.now(dt.timezone.utc), margin: dt.timedelta = ROTATE_MARGIN) -> None:
        self.key_file = Path(key_file)
        self.management_url = management_url
        self.margin = margin
        self._now = now

    def get(self, kind: str) -> str:
        """A key of ``kind`` ("inference" or "management") that is not within ROTATE_MARGIN of expiry."""
        token = read_tokens(self.key_file)[kind]
        if not token.expiring(self._now(), self.margin):
            return token.key
        return self.rotate(kind, only_if_expiring=True)

    def rotate(self, kind: str, *, only_if_expiring: bool = False) -> str:
        """Ask TorchServe for a new ``kind`` key (authorised by the API key) and return it."""
        lock_path = self.key_file.with_name(".key_file.lock")
        with open(lock_path, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            tokens = read_tokens(self.key_file)  # another process may have rotated while we waited
            if only_if_expiring and not tokens[kind].expiring(self._now(), self.margin):
                return tokens[kind].key
            status, body = http_request(self.management_url, f"/token?type={kind}", tokens["API"].key)
            if status != 200:
                raise TokenError(f"token rotation for {kind} failed: HTTP {status} {body[:200]!r}")
            return read_tokens(self.key_file)[kind].key


def token_source_from_env() -> TokenSource:
    return TokenSource(os.environ.get("TS_KEY_FILE", DEFAULT_KEY_FILE),
                       os.environ.get("TS_MANAGEMENT_URL", DEFAULT_MANAGEMENT_URL))

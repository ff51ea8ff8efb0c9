"""HTTP client for a torchserve-cam TorchServe: tokens, concurrent requests, server errors as messages.

Deliberately free of torch: ``torchserve-cam predict`` / ``explain`` start in a fraction of a second.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests

__all__ = [
    "CliError",
    "ServerError",
    "Client",
    "Outcome",
    "resolve_token",
    "parse_target",
    "TOKEN_ENV",
    "KEY_FILE_ENV",
    "URL_ENV",
    "DEFAULT_URL",
    "PORT_ENV",
    "default_url",
]

TOKEN_ENV = "TORCHSERVE_CAM_TOKEN"
KEY_FILE_ENV = "TORCHSERVE_CAM_KEY_FILE"
URL_ENV = "TORCHSERVE_CAM_URL"
DEFAULT_URL = "http://127.0.0.1:8080"
PORT_ENV = "INFERENCE_PORT"  # the port `make serve` (model_store.serve) binds the inference API to


def default_url() -> str:
    """``$TORCHSERVE_CAM_URL``, else ``http://127.0.0.1:$INFERENCE_PORT`` when that is set, else :data:`DEFAULT_URL`."""
    if os.environ.get(URL_ENV):
        return os.environ[URL_ENV]
    port = os.environ.get(PORT_ENV, "").strip()
    return f"http://127.0.0.1:{port}" if port.isdigit() else DEFAULT_URL
DEFAULT_KEY_FILE = "key_file.json"


class CliError(Exception):
    """A problem the user can fix (missing token, unreachable server): printed as one line, exit code 2."""


class ServerError(Exception):
    """The server answered with an error status; ``message`` is the server's own message."""

    def __init__(self, status: int, message: str, kind: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.kind = kind

    def __str__(self) -> str:
        kind = f" {self.kind}" if self.kind else ""
        return f"{self.message} (HTTP {self.status}{kind})"


def resolve_token(token: str | None, key_file: str | None, no_token: bool = False) -> str | None:
    """The inference token: ``--token``, else ``$TORCHSERVE_CAM_TOKEN``, else the key file's ``inference`` key.

    The key file is ``--key-file``, else ``$TORCHSERVE_CAM_KEY_FILE``, else ``./key_file.json`` (where
    TorchServe writes it when started from this directory). Raises :class:`CliError` with what to do
    when no token can be found; ``no_token`` skips all of this (a server with token auth off).
    """
    if no_token:
        return None
    if token:
        return token
    if os.environ.get(TOKEN_ENV):
        return os.environ[TOKEN_ENV]
    path = Path(key_file or os.environ.get(KEY_FILE_ENV) or DEFAULT_KEY_FILE).expanduser()
    if not path.is_file():
        raise CliError(
            f"no token: key file {str(path)!r} not found. TorchServe writes key_file.json into the directory "
            f"it was started in (make serve); pass --key-file PATH, --token TOKEN or set {TOKEN_ENV} "
            "(--no-token for a server with token auth off)"
        )
    try:
        data = json.loads(path.read_text())
        entry = data["inference"]
        key = entry["key"] if isinstance(entry, dict) else entry
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise CliError(f"key file {str(path)!r} has no inference key ({type(error).__name__}: {error})") from None
    if not isinstance(key, str) or not key:
        raise CliError(f"key file {str(path)!r} has an empty inference key")
    return key


def parse_target(text: str) -> int | str:
    """``"285"`` -> 285 (a class index); anything else is a label name for the server to resolve."""
    stripped = text.strip()
    return int(stripped) if stripped.lstrip("-").isdigit() else stripped


@dataclass
class Outcome:
    """One image's result: the parsed JSON response, or the error that stopped it."""

    index: int
    image: Path
    response: dict[str, Any] | None = None
    error: Exception | None = None
    seconds: float = 0.0
    written: list[tuple[str, Path]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.error is None


class Client:
    """Posts images to ``/predictions/<model>`` or ``/explanations/<model>``, several at a time.

    Each request is multipart: the image bytes in field ``data`` and the JSON options in ``options``
    (the handler's format, see ``handlers/serving/base.py``). One ``requests.Session`` per worker thread.
    """

    def __init__(self, url: str, token: str | None, timeout: float = 120.0) -> None:
        self.url = url.rstrip("/")
        self.token = token
        self.timeout = timeout
        self._local = threading.local()

    def _session(self) -> requests.Session:
        session = getattr(self._local, "session", None)
        if session is None:
            session = self._local.session = requests.Session()
            if self.token:
                session.headers["Authorization"] = f"Bearer {self.token}"
        return session

    def post(self, endpoint: str, model: str, image: bytes, filename: str, options: dict[str, Any]) -> dict[str, Any]:
        """One request; returns the JSON body or raises :class:`ServerError` / :class:`CliError`."""
        files = {
            "data": (filename, image, "application/octet-stream"),
            # A plain form field: with a JSON content type TorchServe hands the handler a parsed dict,
            # which handlers/serving/base.py does not expect for multipart options (a 503 for the whole batch).
            "options": (None, json.dumps(options)),
        }
        address = f"{self.url}/{endpoint}/{model}"
        try:
            answer = self._session().post(address, files=files, timeout=self.timeout)
        except requests.exceptions.ConnectionError as error:
            raise CliError(
                f"cannot reach TorchServe at {self.url} ({_reason(error)}); start it with `make serve` or pass --url"
            ) from None
        except requests.exceptions.Timeout:
            raise CliError(f"no answer from {address} within {self.timeout:.0f}s (--timeout)") from None
        if answer.status_code != 200:
            raise _server_error(answer)
        try:
            body = answer.json()
        except ValueError:
            raise ServerError(answer.status_code, f"the answer is not JSON: {answer.text[:200]!r}") from None
        if not isinstance(body, dict):
            raise ServerError(answer.status_code, f"unexpected answer: {answer.text[:200]!r}")
        return body

    def map(
        self,
        images: Sequence[Path],
        work: Callable[[int, Path], Outcome],
        concurrency: int,
        on_done: Callable[[Outcome], None] | None = None,
    ) -> Iterator[Outcome]:
        """Run ``work`` for every image with up to ``concurrency`` requests in flight; yield in input order.

        ``on_done`` is called as each image finishes (progress). A :class:`CliError` (the server is
        unreachable) stops everything and is raised.
        """
        with ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
            futures = []
            for index, image in enumerate(images):
                future = pool.submit(work, index, image)
                if on_done is not None:
                    future.add_done_callback(lambda f: f.exception() is None and on_done(f.result()))
                futures.append(future)
            try:
                for future in futures:
                    yield future.result()
            finally:
                for future in futures:
                    future.cancel()


def _reason(error: Exception) -> str:
    text = str(error)
    for marker in ("Connection refused", "Name or service not known", "timed out", "No route to host"):
        if marker in text:
            return marker.lower()
    return type(error).__name__


def _server_error(answer: requests.Response) -> ServerError:
    """TorchServe's and our handler's error bodies are ``{"code", "type", "message"}``."""
    try:
        body = answer.json()
    except ValueError:
        body = None
    if isinstance(body, dict) and body.get("message"):
        return ServerError(answer.status_code, str(body["message"]), body.get("type"))
    text = answer.text.strip() or answer.reason or "no message"
    return ServerError(answer.status_code, text[:500])

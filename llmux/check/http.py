"""A small HTTP client for the checks, on the standard library alone: `llmux check` runs from the
operator's `llmux` command, installed on the host with nothing but pydantic and PyYAML.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

# Far above one model load plus one CPU benchmark run; the server's own limit is 900 s.
TIMEOUT_S = 1800.0


class HttpError(Exception):
    """The server answered with an error status; `message` is its envelope's message."""

    def __init__(self, status: int, message: str, code: str | None = None) -> None:
        super().__init__(f"{status}: {message}")
        self.status = status
        self.message = message
        self.code = code


class Unreachable(Exception):
    """Nothing answered at the URL."""


@dataclass(frozen=True)
class Answer:
    status: int
    body: bytes
    content_type: str

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass(frozen=True)
class Server:
    url: str
    key: str | None
    timeout_s: float = TIMEOUT_S

    def request(
        self,
        method: str,
        path: str,
        *,
        body: bytes | None = None,
        content_type: str | None = None,
        key: str | bool | None = True,
    ) -> Answer:
        """One request; `key` True sends the server's key, a string sends that one, False or None
        sends none. Any status comes back as an `Answer` (no exception for 4xx/5xx)."""
        request = urllib.request.Request(self.url.rstrip("/") + path, method=method, data=body)
        token = self.key if key is True else (key or None)
        if token:
            request.add_header("Authorization", f"Bearer {token}")
        if content_type:
            request.add_header("Content-Type", content_type)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as answer:
                return Answer(answer.status, answer.read(), answer.headers.get_content_type())
        except urllib.error.HTTPError as exc:
            return Answer(exc.code, exc.read(), exc.headers.get_content_type())
        except (urllib.error.URLError, OSError) as exc:
            raise Unreachable(
                f"nothing answers at {self.url} ({getattr(exc, 'reason', exc)})"
            ) from None

    def get(self, path: str, *, key: str | bool | None = True) -> Any:
        return _ok(self.request("GET", path, key=key)).json()

    def post(self, path: str, payload: dict[str, Any] | None = None) -> Any:
        body = json.dumps(payload).encode() if payload is not None else None
        answer = self.request("POST", path, body=body, content_type="application/json")
        return _ok(answer).json()

    def post_raw(self, path: str, payload: dict[str, Any]) -> bytes:
        answer = self.request(
            "POST", path, body=json.dumps(payload).encode(), content_type="application/json"
        )
        return _ok(answer).body

    def post_file(self, path: str, fields: dict[str, str], filename: str, data: bytes) -> Any:
        """A multipart form with `fields` and one file (the transcription API's shape)."""
        boundary = uuid.uuid4().hex
        head = f"--{boundary}\r\nContent-Disposition: form-data; name="
        parts = [f'{head}"{name}"\r\n\r\n{value}\r\n'.encode() for name, value in fields.items()]
        parts.append(
            f'{head}"file"; filename="{filename}"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n".encode()
            + data
            + b"\r\n"
        )
        body = b"".join(parts) + f"--{boundary}--\r\n".encode()
        answer = self.request(
            "POST", path, body=body, content_type=f"multipart/form-data; boundary={boundary}"
        )
        return _ok(answer).json()

    def stream(self, path: str, payload: dict[str, Any]) -> Iterator[tuple[float, Any]]:
        """Server-sent events of a POST, as (seconds since the request, parsed data) in the order
        they arrive; ends at [DONE]."""
        request = urllib.request.Request(
            self.url.rstrip("/") + path, method="POST", data=json.dumps(payload).encode()
        )
        request.add_header("Content-Type", "application/json")
        if self.key:
            request.add_header("Authorization", f"Bearer {self.key}")
        started = time.perf_counter()
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as answer:
                for raw in answer:
                    line = raw.decode().strip()
                    if not line.startswith("data:"):
                        continue
                    data = line[len("data:") :].strip()
                    if data == "[DONE]":
                        return
                    yield time.perf_counter() - started, json.loads(data)
        except urllib.error.HTTPError as exc:
            _ok(Answer(exc.code, exc.read(), exc.headers.get_content_type()))
        except (urllib.error.URLError, OSError) as exc:
            raise Unreachable(
                f"nothing answers at {self.url} ({getattr(exc, 'reason', exc)})"
            ) from None


def _ok(answer: Answer) -> Answer:
    if answer.status < 400:
        return answer
    try:
        error = answer.json()["error"]
        message, code = str(error["message"]), error.get("code")
    except (ValueError, KeyError, TypeError):
        message, code = answer.body[:200].decode(errors="replace"), None
    raise HttpError(answer.status, message, code)

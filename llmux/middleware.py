"""ASGI middleware that every request passes: request id, access log, body cap, API-key check.

Plain ASGI rather than BaseHTTPMiddleware, so streaming responses and client disconnects pass
through untouched.
"""

from __future__ import annotations

import contextlib
import logging
import re
import time
import uuid
from collections.abc import Callable
from typing import Any

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from llmux.core.errors import ApiError, Unauthorized, envelope
from llmux.keys import KeyRing, create_keys_hint
from llmux.logs import request_id_var

log = logging.getLogger("llmux.http")
_REQUEST_ID_OK = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


def error_response(error: ApiError, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error.to_envelope(), status_code=error.status, headers=headers)


class BodyTooLarge(ApiError):
    status = 413
    code = "request_too_large"

    def __init__(self, limit: int) -> None:
        super().__init__(
            f"The request body is larger than the server's limit of {limit // (1024 * 1024)} MB "
            "(LLMUX_MAX_BODY_MB)."
        )


class RequestContextMiddleware:
    """Takes `X-Request-ID` from the request (or makes one), echoes it, logs one access line."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = _header(scope, b"x-request-id")
        request_id = incoming if incoming and _REQUEST_ID_OK.match(incoming) else uuid.uuid4().hex
        token = request_id_var.set(request_id)
        scope.setdefault("state", {})["request_id"] = request_id
        started = time.perf_counter()
        status = 0

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message.setdefault("headers", [])
                message["headers"] = [
                    *message["headers"],
                    (b"x-request-id", request_id.encode("ascii")),
                ]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            # The one place an unexpected error becomes a response: logged with its traceback,
            # answered with the request id and nothing of the internals.
            log.exception("unhandled error")
            if not status:
                await JSONResponse(
                    envelope(
                        500,
                        f"Internal server error (request id {request_id}); the server "
                        "log has the details.",
                    ),
                    status_code=500,
                )(scope, receive, send_with_id)
        finally:
            client = scope["state"].get("client_name", "-")
            log.info(
                "%s %s %s %.0fms client=%s",
                scope["method"],
                scope["path"],
                status or "-",
                (time.perf_counter() - started) * 1000,
                client,
            )
            request_id_var.reset(token)


class BodyLimitMiddleware:
    """Refuses bodies over `limit` bytes: at once by Content-Length, else while they stream in."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _header(scope, b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await error_response(BodyTooLarge(self.limit))(scope, receive, send)
            return
        received = 0
        exceeded = False
        started = False

        async def counting_receive() -> Message:
            nonlocal received, exceeded
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    exceeded = True
                    raise BodyTooLarge(self.limit)
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if exceeded:
                return  # whatever the app made of the aborted read, the answer is 413
            started = started or message["type"] == "http.response.start"
            await send(message)

        with contextlib.suppress(BodyTooLarge):
            await self.app(scope, counting_receive, guarded_send)
        if exceeded and not started:
            await error_response(BodyTooLarge(self.limit))(scope, receive, send)


class ApiKeyMiddleware:
    """Every `/v1/*` path, unknown ones included, needs a known Bearer key (401 before 404);
    every `/admin/*` path an admin key (403 for an ordinary one).

    `open_paths` lists exact `/v1/...` paths deliberately served without a key. CORS preflights
    never reach here: the CORS middleware outside this one answers them.
    """

    def __init__(self, app: ASGIApp, keys: KeyRing, open_paths: frozenset[str] = frozenset()):
        self.app = app
        self.keys = keys
        self.open_paths = open_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope.get("path", "")
        admin = path == "/admin" or path.startswith("/admin/")
        guarded = admin or path == "/v1" or path.startswith("/v1/")
        if scope["type"] != "http" or not guarded or path in self.open_paths:
            await self.app(scope, receive, send)
            return
        client = self._authenticate(_header(scope, b"authorization"))
        if isinstance(client, ApiError):
            headers = {"WWW-Authenticate": "Bearer"}
            await error_response(client, headers)(scope, receive, send)
            return
        if admin and client not in self.keys.admins:
            refused = ApiError(
                "This key is not an admin key; /admin/ needs one (role: admin in api_keys.yaml, "
                "or python -m llmux.keys --admin NAME).",
                status=403,
                code="admin_key_required",
            )
            await error_response(refused)(scope, receive, send)
            return
        scope.setdefault("state", {})["client_name"] = client
        await self.app(scope, receive, send)

    def _authenticate(self, header: str | None) -> str | ApiError:
        if self.keys.empty:
            return Unauthorized(
                f"No API keys are configured on this server: {create_keys_hint(self.keys.path)}."
            )
        scheme, _, token = (header or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return Unauthorized("Missing API key: send it as `Authorization: Bearer <key>`.")
        client = self.keys.client_for(token.strip())
        if client is None:
            return Unauthorized("Invalid API key.")
        return client


def _header(scope: Scope, name: bytes) -> str | None:
    headers: list[tuple[bytes, bytes]] = scope.get("headers", [])
    for key, value in headers:
        if key == name:
            return value.decode("latin-1")
    return None


def client_name(scope_state: dict[str, Any]) -> str:
    return str(scope_state.get("client_name", "-"))


class CheapRoutes:
    """Answers the endpoints that clients and health checks poll (GET /health, GET /v1/models)
    without FastAPI's routing and dependency solving, which cost more than the answers: `routes`
    maps a path to a function of the connection's app state returning the JSON body's bytes.
    It sits inside the key check, so these paths are guarded exactly as through the router, and
    the FastAPI routes of the same paths stay for the schema (and for other methods)."""

    def __init__(self, app: ASGIApp, routes: dict[str, Callable[[], bytes]]) -> None:
        self.app = app
        self.routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        answer = self.routes.get(scope["path"]) if scope["type"] == "http" else None
        if answer is None or scope["method"] != "GET":
            await self.app(scope, receive, send)
            return
        body = answer()
        headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})


class FrontDoor:
    """Outside the mounted app, in BentoML's own middleware stack: a plain GET of a polled path
    (no Origin, no body) goes straight to `polled`, llmux's own middleware around `CheapRoutes`
    without the body cap, skipping BentoML's request context and routing and Starlette's
    exception layers, none of which such a request needs. The answer is the one the mounted app
    gives (the same middleware makes it); everything else passes on.
    """

    def __init__(self, app: ASGIApp, polled: ASGIApp, paths: frozenset[str]) -> None:
        self.app = app
        self.polled = polled
        self.paths = paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] == "http"
            and scope["method"] == "GET"
            and scope["path"] in self.paths
            and _plain(scope)
        ):
            await self.polled(scope, receive, send)
        else:
            await self.app(scope, receive, send)


_NOT_PLAIN = frozenset({b"origin", b"transfer-encoding"})


def _plain(scope: Scope) -> bool:
    """No Origin (no CORS answer to give) and no request body to cap."""
    for key, value in scope.get("headers", []):
        if key in _NOT_PLAIN or (key == b"content-length" and value != b"0"):
            return False
    return True

"""The FastAPI app: middleware, the one place errors become OpenAI envelopes, and the routes.

`create_app` does no heavy work (no torch, no model loads): BentoML imports the service module in
its parent process too, and a bad config should stop start-up there, early and clearly.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import JSONResponse, Response
from starlette.routing import Match

from llmux import logs, termination
from llmux.core.config import load_registry
from llmux.core.errors import ApiError, BadRequest
from llmux.core.gpu import NvmlMemoryProbe
from llmux.keys import KeyRing, create_keys_hint
from llmux.middleware import (
    ApiKeyMiddleware,
    BodyLimitMiddleware,
    CheapRoutes,
    RequestContextMiddleware,
    error_response,
)
from llmux.routes import admin, chat, embeddings, health, models, speech, transcriptions
from llmux.services.chat import ChatService
from llmux.settings import Settings
from llmux.state import AppState
from llmux.voices import load_voices
from llmux_policy.executor import Residency
from llmux_policy.memory import (
    GIB,
    MemoryProbe,
    default_budget_bytes,
    default_host_budget_bytes,
)
from llmux_policy.metrics import ResidencyMetricsSink
from runners.base import (
    Runner,
    host_available_bytes,
    host_total_bytes,
    pin_malloc_thresholds,
)
from runners.factory import make_runner

log = logging.getLogger("llmux.app")

# BentoML's own pages we answer ourselves: its Swagger index pulls a third-party tracking script,
# and its docs/schema describe BentoML APIs this service does not have.
HTTP_METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]
BENTOML_PAGES = ("/docs.json", "/schema.json", "/static_content/{rest:path}", "/assets/{rest:path}")


def build_state(
    settings: Settings,
    *,
    metrics: ResidencyMetricsSink | None = None,
    probe: MemoryProbe | None = None,
) -> AppState:
    """Read and validate the config files (ConfigError names the file and field) and set up
    residency. Loads nothing: models load when a request first needs them."""
    registry = load_registry(settings.models_file)
    keys = KeyRing.load(settings.api_keys_file)
    if keys.empty:
        log.warning(
            "no API keys at %s: every /v1 call gets 401; %s",
            settings.api_keys_file,
            create_keys_hint(settings.api_keys_file),
        )
    probe = probe if probe is not None else NvmlMemoryProbe()
    budget = default_budget_bytes(
        registry.gpu_budget_gb, probe.total_bytes(), int(registry.gpu_margin_gb * GIB)
    )

    def runner_for(physical_id: str) -> Runner:
        return make_runner(physical_id, registry.physical_models[physical_id], settings.models_dir)

    host_budget = default_host_budget_bytes(
        registry.host_budget_gb,
        host_total_bytes(),
        host_available_bytes(),
        device_in_host_bytes=budget if probe.total_bytes() is None else 0,
    )
    residency = Residency(
        registry, runner_for, budget, probe=probe, metrics=metrics, host_budget_bytes=host_budget
    )
    return AppState(
        settings=settings,
        registry=registry,
        keys=keys,
        residency=residency,
        chat=ChatService(registry, residency),
        voices=load_voices(settings.voices_file, settings.models_dir),
    )


def create_app(settings: Settings, state: AppState | None = None) -> FastAPI:
    logs.add_request_id_to_records()
    state = state or build_state(settings)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        pin_malloc_thresholds()  # before any model's buffers: the worker's RSS stays flat
        background = []
        if state.registry.preload:
            background.append(
                asyncio.create_task(
                    state.residency.preload(state.registry.preload), name="llmux-preload"
                )
            )
        ttls = [state.registry.idle_ttl(pid) for pid in state.registry.physical_models]
        shortest = min((ttl for ttl in ttls if ttl is not None), default=None)
        if shortest is not None:
            background.append(
                asyncio.create_task(
                    state.residency.unload_idle(every_s=max(0.05, shortest / 4)), name="llmux-idle"
                )
            )
        # SIGTERM starts the bounded stop at once, while the server still drains connections.
        grace_s = state.settings.shutdown_grace_s
        stopping: list[asyncio.Task[None]] = []
        restore_signals = termination.on_termination(
            asyncio.get_running_loop(),
            lambda: stopping.append(asyncio.create_task(state.chat.stop(grace_s=grace_s))),
        )
        try:
            yield
        finally:
            restore_signals()
        for task in background:
            task.cancel()
        await asyncio.gather(*background, return_exceptions=True)
        # Bounded: generations get LLMUX_SHUTDOWN_GRACE_S, then are cancelled; then every model
        # is unloaded once its requests have let go.
        await asyncio.gather(*stopping)
        await state.chat.stop(grace_s=grace_s)
        await state.residency.close()

    app = FastAPI(
        title="llmux",
        docs_url=None,
        redoc_url=None,
        openapi_url="/openapi.json",
        lifespan=lifespan,
        # FastAPI's own OpenTelemetry hooks: BentoML installs a tracer provider, so FastAPI would
        # ask on every request whether to trace it; llmux exports no traces.
        telemetry={"tracing": False, "metrics": False, "logs": False},
    )
    app.state.llmux = state
    _install_error_handlers(app)
    app.include_router(health.router)
    app.include_router(models.router)
    app.include_router(chat.router)
    app.include_router(transcriptions.router)
    app.include_router(speech.router)
    app.include_router(embeddings.router)
    app.include_router(admin.router)
    _install_fallback_routes(app)

    # Added innermost first: CORS answers preflights before auth; the request id wraps everything.
    open_paths = speech.DISCOVERY_PATHS if settings.open_audio_discovery else frozenset()
    polled: dict[str, Callable[[], bytes]] = {
        "/health": lambda: _json(health.health_body(state)),
        "/v1/models": lambda: state.model_list_json,
    }
    app.add_middleware(CheapRoutes, routes=polled)
    app.add_middleware(ApiKeyMiddleware, keys=state.keys, open_paths=open_paths)
    app.add_middleware(BodyLimitMiddleware, limit=settings.max_body_bytes)
    cors: dict[str, Any] = {
        "allow_origins": list(settings.cors_origins),
        "allow_methods": ["*"],
        "allow_headers": ["*"],
        "expose_headers": ["X-Request-ID"],
    }
    app.add_middleware(CORSMiddleware, **cors)
    app.add_middleware(RequestContextMiddleware)
    # The same answers for FrontDoor, outside BentoML's routing (service.py installs it).
    keyed = ApiKeyMiddleware(
        CheapRoutes(app, routes=polled), keys=state.keys, open_paths=open_paths
    )
    app.state.front_door = {
        "polled": RequestContextMiddleware(CORSMiddleware(keyed, **cors)),
        "paths": frozenset(polled),
    }
    return app


def _json(content: object) -> bytes:
    """What Starlette's JSONResponse would send for `content`."""
    return json.dumps(content, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode()


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(_: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(_validation_error(exc))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else "HTTP error"
        return error_response(ApiError(message, status=exc.status_code), dict(exc.headers or {}))


def _validation_error(exc: RequestValidationError) -> BadRequest:
    first = exc.errors()[0] if exc.errors() else {}
    location = [str(part) for part in first.get("loc", ()) if part != "body"]
    if first.get("type") == "json_invalid":
        detail = first.get("ctx", {}).get("error", "")
        return BadRequest(
            f"The request body is not valid JSON: {detail}"
            if detail
            else "The request body is not valid JSON."
        )
    param = ".".join(location) or None
    message = first.get("msg", "Invalid request")
    return BadRequest(f"{message}: {param}" if param else message, param=param)


def _install_fallback_routes(app: FastAPI) -> None:
    """404 and 405 in OpenAI's envelope for any /v1 path (after auth) and BentoML's pages."""

    async def not_routed(request: Request) -> Response:
        allowed = _methods_routed_elsewhere(app, request, not_routed)
        if allowed:
            raise ApiError(
                f"Method {request.method} is not allowed on {request.url.path}; use "
                f"{', '.join(allowed)}.",
                status=405,
                code="method_not_allowed",
            )
        raise ApiError(
            f"No such endpoint: {request.method} {request.url.path}.",
            status=404,
            code="unknown_url",
        )

    app.add_api_route("/v1/{rest:path}", not_routed, methods=HTTP_METHODS, include_in_schema=False)
    app.add_api_route(
        "/admin/{rest:path}", not_routed, methods=HTTP_METHODS, include_in_schema=False
    )
    for path in BENTOML_PAGES:
        app.add_api_route(path, not_routed, methods=HTTP_METHODS, include_in_schema=False)


def _methods_routed_elsewhere(app: FastAPI, request: Request, fallback: object) -> list[str]:
    """The methods for which a real route (not the fallback) serves this path."""
    allowed = []
    for method in HTTP_METHODS:
        probe = {**request.scope, "method": method}
        for route in app.router.routes:
            if route.matches(probe)[0] is Match.FULL:
                if getattr(route, "endpoint", None) is not fallback:
                    allowed.append(method)
                break
    return allowed

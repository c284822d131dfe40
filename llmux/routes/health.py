"""GET /health (no key): liveness plus what is resident; GET / points people at it."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from llmux.state import AppState

router = APIRouter()


@router.get("/health")
async def health(request: Request) -> dict[str, Any]:
    return health_body(AppState.of(request))


def health_body(state: AppState) -> dict[str, Any]:
    snapshot = state.residency.snapshot()
    loaded = {model.pop("physical_id"): model for model in snapshot.pop("models")}  # type: ignore[misc]
    warm = {model.pop("physical_id"): model for model in snapshot.pop("warm_models")}  # type: ignore[misc]
    return {
        "status": "ok",
        "loaded_models": loaded,
        "warm_models": warm,
        **snapshot,
        "models_configured": len(state.registry.virtual_models),
        "api_keys_configured": not state.keys.empty,
    }


@router.get("/", include_in_schema=False)
async def index() -> dict[str, Any]:
    return {
        "service": "llmux",
        "endpoints": ["/health", "/v1/models", "/openapi.json", "/metrics"],
        "auth": "every /v1 call needs `Authorization: Bearer <key>`",
    }

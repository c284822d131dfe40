"""/admin/*: the operator's handles (admin keys only; the middleware refuses the others)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from llmux.middleware import client_name
from llmux.services import admin, bench
from llmux.state import AppState
from llmux.wire.bench import BenchResult

router = APIRouter(prefix="/admin", include_in_schema=False)


@router.get("/models")
async def list_models(request: Request) -> dict[str, Any]:
    return {"models": admin.models(AppState.of(request))}


@router.post("/models/{name:path}/load")
async def load_model(name: str, request: Request) -> dict[str, Any]:
    client = client_name(request.scope.get("state", {}))
    return {"model": await admin.load(AppState.of(request), name, client)}


@router.post("/models/{name:path}/unload")
async def unload_model(name: str, request: Request) -> dict[str, Any]:
    client = client_name(request.scope.get("state", {}))
    return {"unloaded": await admin.unload(AppState.of(request), name, client)}


@router.post("/unload-all")
async def unload_all(request: Request) -> dict[str, Any]:
    client = client_name(request.scope.get("state", {}))
    return {"unloaded": await admin.unload(AppState.of(request), None, client)}


@router.post("/models/{name:path}/bench")
async def bench_model(name: str, request: Request) -> BenchResult:
    """The model's fixed workload timed on the CPU and on the GPU (llmux.services.bench)."""
    client = client_name(request.scope.get("state", {}))
    return await bench.run(AppState.of(request), name, client)

"""GET /v1/models and GET /v1/models/{id}."""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.responses import Response

from llmux.core.errors import ModelNotFound
from llmux.state import AppState
from llmux.wire.models import ModelCard, ModelList, model_card

router = APIRouter()


@router.get("/v1/models", response_model=ModelList)
async def list_models(request: Request) -> Response:
    # The cheapest endpoint clients poll: its body is rendered once, not validated per request.
    return Response(AppState.of(request).model_list_json, media_type="application/json")


@router.get("/v1/models/{model_id:path}", response_model=ModelCard)
async def retrieve_model(model_id: str, request: Request) -> ModelCard:
    state = AppState.of(request)
    if model_id not in state.registry.virtual_models:
        raise ModelNotFound(model_id, param=None)
    return model_card(state.registry, model_id, state.started_at)

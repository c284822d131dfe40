"""POST /v1/embeddings: text embeddings in OpenAI's shape."""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.responses import JSONResponse

from llmux.disconnects import unless_disconnected
from llmux.services.embeddings import embed
from llmux.state import AppState
from llmux.wire.embeddings import EmbeddingRequest

router = APIRouter()


@router.post("/v1/embeddings")
async def create_embeddings(body: EmbeddingRequest, request: Request) -> JSONResponse:
    result = await unless_disconnected(request.receive, embed(AppState.of(request), body))
    return JSONResponse(result.model_dump())

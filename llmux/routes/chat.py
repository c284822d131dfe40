"""POST /v1/chat/completions."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request
from starlette.responses import JSONResponse, Response

from llmux.disconnects import HeldStreamingResponse, set_on_disconnect, unless_disconnected
from llmux.services.chat import ChatSession
from llmux.state import AppState
from llmux.wire.chat import ChatCompletionRequest, completion_json

router = APIRouter()


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
    state = AppState.of(request)
    session = await unless_disconnected(
        request.receive, state.chat.start(body), abandon=ChatSession.close
    )
    if body.stream:
        return HeldStreamingResponse(
            session.stream(), on_close=session.close, stall_s=state.settings.stream_stall_s
        )
    watcher = asyncio.create_task(set_on_disconnect(request.receive, session.cancel))
    try:
        completion = await session.complete()
    finally:
        watcher.cancel()
        await session.close()
    return JSONResponse(completion_json(completion))

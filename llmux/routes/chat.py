"""POST /v1/chat/completions."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

from fastapi import APIRouter, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from llmux.services.chat import watch_disconnect
from llmux.state import AppState
from llmux.wire.chat import ChatCompletionRequest

router = APIRouter()


class HeldStreamingResponse(StreamingResponse):
    """A stream that runs `on_close` however it ends: finished, failed or client gone."""

    def __init__(self, body: AsyncIterator[str], on_close: Callable[[], Awaitable[None]]) -> None:
        super().__init__(
            body,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._on_close()


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
    session = await AppState.of(request).chat.start(body)
    if body.stream:
        return HeldStreamingResponse(session.sse(), on_close=session.close)
    watcher = asyncio.create_task(watch_disconnect(request.receive, session.cancel))
    try:
        completion = await session.complete()
    finally:
        watcher.cancel()
        await session.close()
    return JSONResponse(completion.model_dump())

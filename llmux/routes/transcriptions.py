"""POST /v1/audio/transcriptions: speech-to-text in OpenAI's Whisper API shape."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Form, Request
from starlette.responses import Response

from llmux.disconnects import unless_disconnected
from llmux.services.transcription import transcribe
from llmux.state import AppState
from llmux.wire.transcriptions import TranscriptionRequest, render_transcript

router = APIRouter()


@router.post("/v1/audio/transcriptions")
async def create_transcription(
    form: Annotated[TranscriptionRequest, Form()], request: Request
) -> Response:
    transcript = await unless_disconnected(request.receive, transcribe(AppState.of(request), form))
    return render_transcript(transcript, form.response_format)

"""POST /v1/audio/speech, and GET /v1/audio/voices and /v1/audio/models (Open WebUI's lists)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.responses import Response

from llmux.disconnects import unless_disconnected
from llmux.services.speech import speak
from llmux.state import AppState
from llmux.voices import speech_abilities
from llmux.wire.speech import (
    SpeechModelCard,
    SpeechModelList,
    SpeechRequest,
    VoiceCard,
    VoiceList,
)

router = APIRouter()

# Served without a key when LLMUX_OPEN_AUDIO_DISCOVERY is on: Open WebUI asks for them without one.
DISCOVERY_PATHS = frozenset({"/v1/audio/voices", "/v1/audio/models"})


@router.post("/v1/audio/speech")
async def create_speech(body: SpeechRequest, request: Request) -> Response:
    audio = await unless_disconnected(request.receive, speak(AppState.of(request), body))
    return Response(audio.data, media_type=audio.content_type)


@router.get("/v1/audio/voices", response_model=VoiceList)
async def list_voices(request: Request, model: str | None = None) -> VoiceList:
    """Every voice name a client may send; with `?model=`, those that model can speak with."""
    state = AppState.of(request)
    clips = model is None or speech_abilities(state.registry.require(model, "tts")[1]).clones
    rows = state.voices.listed(clips=clips)
    return VoiceList(voices=[VoiceCard(id=id_, name=name) for id_, name in rows])


@router.get("/v1/audio/models", response_model=SpeechModelList)
async def list_speech_models(request: Request) -> SpeechModelList:
    """The virtual text-to-speech models."""
    registry = AppState.of(request).registry
    return SpeechModelList(
        models=[
            SpeechModelCard(id=name)
            for name, virtual in registry.virtual_models.items()
            if registry.physical_models[virtual.physical].type == "tts"
        ]
    )

"""Speech to text, from a checked upload to a transcript: the work behind
POST /v1/audio/transcriptions.

The upload is read up to the size cap and decoded by content (PyAV) off the event loop before the
model is asked for, so a bad or oversized file never causes a load. Nothing here imports a backend.
"""

from __future__ import annotations

import asyncio
import threading
from typing import cast

from fastapi import UploadFile

from llmux.audio.decode import AudioTooLarge, decode_audio
from llmux.core.concurrency import run_to_end
from llmux.state import AppState
from llmux.wire.transcriptions import TranscriptionRequest
from runners.transcription import TranscribeRunner, Transcript


async def transcribe(state: AppState, form: TranscriptionRequest) -> Transcript:
    """The request's transcript. Raises ApiError (400/404/413/503) for what a client or the
    server's state can fix."""
    physical_id, physical, _ = state.registry.require(form.model, "asr")
    data = await read_upload(form.file, state.settings.max_audio_bytes)
    audio = await asyncio.to_thread(
        decode_audio, data, max_seconds=state.settings.max_audio_seconds
    )
    del data
    language = form.language or physical.default_language
    cancel = threading.Event()  # set by run_to_end when the request is cancelled (client gone)
    async with state.residency.use(physical_id) as held:
        runner = cast(TranscribeRunner, held)
        return await run_to_end(
            lambda: runner.transcribe(
                audio,
                language=language,
                prompt=form.prompt,
                temperature=form.temperature,
                cancel=cancel,
            ),
            cancel,
            executor=state.residency.inference_threads(physical_id),
        )


async def read_upload(upload: UploadFile, max_bytes: int) -> bytes:
    """The uploaded file's bytes; 413 over `max_bytes` (read no further than one byte past it)."""
    if upload.size is not None and upload.size > max_bytes:
        raise AudioTooLarge(max_bytes)
    data = await upload.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise AudioTooLarge(max_bytes)
    return data

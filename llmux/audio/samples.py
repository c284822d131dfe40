"""Two short spoken sentences shipped with llmux, for checks that need speech to transcribe.

`llmux check` sends them to each speech-to-text model (English and German dictation, TST-011 and
TST-012) and the admin benchmark transcribes the English one on the CPU and on the GPU. They were
spoken by espeak-ng (140 words a minute) and stored as 16 kHz mono MP3, the format dictation
clients upload; shipping them means the box needs no speech synthesizer to be checked.
"""

from __future__ import annotations

from pathlib import Path

SENTENCES = {
    "en": "The weather today is sunny and warm with a light breeze from the west.",
    "de": "Ich möchte morgen mit dem Zug nach Hamburg fahren.",
}
CLIPS = Path(__file__).with_name("sample_clips")


def sample(language: str) -> bytes:
    """The MP3 of `SENTENCES[language]`."""
    return (CLIPS / f"{language}.mp3").read_bytes()

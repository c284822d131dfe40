"""Text to speech through the official openai SDK against the app in process: the real Piper
voice of the embedded default, and all three Chatterbox classes loaded with `from_local` from
random-weight checkpoints this session writes (tests/tts_checkpoints.py), through residency.

Every answer is decoded back with PyAV and measured. Random weights say nothing intelligible;
what is checked is the path: classes, files, conditionals, watermark, 24 kHz, stitching, formats.
"""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import openai
import pytest
from starlette.testclient import TestClient

from llmux.audio.encode import RESPONSE_FORMATS, encode_audio
from llmux.core.config import PhysicalModel
from llmux.services.speech import split_text
from runners.base import NotLoaded
from tests.conftest import TEST_KEY
from tests.test_audio_encode import decode
from tests.test_voices import PIPER_DIR, write_config
from tests.tts_checkpoints import VARIANTS, build_checkpoint, chatterbox_configs, reference_clip

pytestmark = pytest.mark.slow

SENTENCE = "Hello there, this is a test."


@pytest.fixture(scope="session")
def chatterbox_dirs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Path]]:
    """One random-weight checkpoint per variant (~1.5 GB each), written once per session and
    deleted after it (pytest keeps the temporary folders of the last three runs)."""
    root = tmp_path_factory.mktemp("chatterbox")
    try:
        with pytest.MonkeyPatch.context() as monkeypatch:
            chatterbox_configs(monkeypatch)
            clip = reference_clip(root / "reference.wav")
            yield {"clip": clip, **{v: build_checkpoint(v, root / v, clip) for v in VARIANTS}}
    finally:
        shutil.rmtree(root, ignore_errors=True)


def models_yaml(dirs: dict[str, Path]) -> str:
    """Piper, plus the Chatterbox checkpoints in `dirs` (none when empty)."""
    names = {
        "original": "Chatterbox",
        "turbo": "Chatterbox-Turbo",
        "multilingual": "Chatterbox-Multilingual",
    }
    present = [v for v in VARIANTS if v in dirs]
    physical = "".join(
        f"  cb-{v}:\n    type: tts\n    backend: chatterbox\n    variant: {v}\n"
        f"    path: {dirs[v]}\n    estimated_vram_gb: 2\n"
        for v in present
    )
    virtual = "".join(f"  {names[v]}: {{physical: cb-{v}}}\n" for v in present)
    return (
        "gpu_budget_gb: 16\nphysical_models:\n"
        f"  piper-joe:\n    type: tts\n    backend: piper\n    path: {PIPER_DIR}\n"
        "    model_file: en_US-joe-medium.onnx\n    estimated_vram_gb: 0.1\n"
        f"{physical}virtual_models:\n  piper-joe: {{physical: piper-joe}}\n{virtual}"
    )


@pytest.fixture(scope="session")
def sdk(
    chatterbox_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[openai.OpenAI]:
    """One app for the session: residency keeps a model loaded between tests of one model."""
    voices = (
        f"voices:\n  clip:\n    reference: {chatterbox_dirs['clip']}\n    language: de\n"
        "openai_voices:\n  nova: clip\n"
    )
    yield from app_client(models_yaml(chatterbox_dirs), voices, tmp_path_factory)


@pytest.fixture(scope="module")
def piper_sdk(tmp_path_factory: pytest.TempPathFactory) -> Iterator[openai.OpenAI]:
    """The app with only the Piper voice: no Chatterbox checkpoints needed."""
    yield from app_client(models_yaml({}), "", tmp_path_factory)


def app_client(
    models: str, voices: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[openai.OpenAI]:
    from llmux.app import create_app
    from llmux.settings import Settings

    config = write_config(tmp_path_factory.mktemp("config"), models, voices)
    app = create_app(Settings(config_dir=config, models_dir=tmp_path_factory.mktemp("models")))
    with TestClient(app, base_url="http://llmux.test") as http:
        yield openai.OpenAI(api_key=TEST_KEY, base_url="http://llmux.test/v1", http_client=http)


def speak(
    sdk: openai.OpenAI, response_format: str = "wav", **body: object
) -> tuple[np.ndarray, int]:
    extra = {"language": body.pop("language")} if "language" in body else None
    request = {"input": SENTENCE, "voice": "alloy", "response_format": response_format, **body}
    answer = sdk.audio.speech.create(**request, extra_body=extra)  # type: ignore[arg-type]
    assert (
        answer.response.headers["content-type"]
        == encode_audio(np.zeros(1, np.float32), 24000, response_format).content_type
    )  # type: ignore[arg-type]
    samples, rate, _ = decode(answer.content, response_format)
    return samples, rate


def seconds(samples: np.ndarray, rate: int) -> float:
    return samples.size / rate


# --- Piper: the embedded default's real voice -------------------------------------------------


@pytest.mark.parametrize("response_format", RESPONSE_FORMATS)
def test_piper_speaks_every_format(piper_sdk: openai.OpenAI, response_format: str) -> None:
    samples, rate = speak(piper_sdk, response_format, model="piper-joe")
    assert 1.0 < seconds(samples, rate) < 4.0  # five words
    assert np.sqrt(np.mean(samples**2)) > 0.02  # speech, not silence


def test_open_webui_read_aloud_gets_mp3(piper_sdk: openai.OpenAI) -> None:
    """Open WebUI sends {input, voice: "alloy", model} and nothing else."""
    response = piper_sdk._client.post(
        "http://llmux.test/v1/audio/speech",
        json={"input": "Read this aloud.", "voice": "alloy", "model": "piper-joe"},
        headers={"Authorization": f"Bearer {TEST_KEY}"},
    )
    assert response.status_code == 200
    assert response.headers["content-type"] == "audio/mpeg"
    samples, rate, container = decode(response.content, "mp3")
    assert container == "mp3" and seconds(samples, rate) > 0.5


def test_piper_speed_scales_duration(piper_sdk: openai.OpenAI) -> None:
    slow = seconds(*speak(piper_sdk, model="piper-joe", speed=0.5))
    fast = seconds(*speak(piper_sdk, model="piper-joe", speed=2.0))
    assert fast < slow / 2


@pytest.mark.parametrize("variation,identical", [(None, False), (0.0, True)])
def test_piper_voice_variation_zero_says_a_text_the_same_way_every_time(
    variation: float | None, identical: bool
) -> None:
    """A voice speaks as trained (with random variation) unless `voice_variation` turns it off,
    which is what a round trip through ASR needs to be reproducible."""
    from runners.piper import PiperRunner

    spec = PhysicalModel(
        type="tts",
        backend="piper",
        model_file="en_US-joe-medium.onnx",
        estimated_vram_gb=0.1,
        voice_variation=variation,
    )
    runner = PiperRunner("piper-joe", spec, PIPER_DIR)
    runner.load()
    takes = [runner.speak(SENTENCE, voice=None, language="en", speed=1.0) for _ in range(3)]
    same = all(np.array_equal(takes[0], take) for take in takes[1:])
    assert same is identical


def test_long_input_is_spoken_piece_by_piece_and_joined(piper_sdk: openai.OpenAI) -> None:
    sentence = "The quick brown fox jumps over the lazy dog. "
    one = seconds(*speak(piper_sdk, model="piper-joe", input=sentence))
    text = sentence * 20
    assert len(split_text(text)) == 4  # six sentences (269 characters) fit in a piece
    many = seconds(*speak(piper_sdk, model="piper-joe", input=text))
    assert 15 * one < many < 25 * one


@pytest.mark.parametrize(
    "text,pieces",
    [
        ("One. Two! Three?", ["One. Two!", "Three?"]),
        ("a" * 10 + ". " + "b" * 10 + ".", ["a" * 10 + ".", "b" * 10 + "."]),
        ("word " * 10, ["word word", "word word", "word word", "word word", "word word"]),
        ("x" * 25, ["x" * 12, "x" * 12, "x"]),
        ("first,  second, third.", ["first,", "second,", "third."]),
        ("  \n ", []),
        ("Line one\n\nLine two", ["Line one", "Line two"]),
    ],
)
def test_split_text_keeps_sentences_whole_up_to_the_limit(text: str, pieces: list[str]) -> None:
    limit = 12
    assert split_text(text, limit) == pieces
    assert all(len(p) <= limit for p in split_text(text, limit))


# --- Chatterbox: the three real classes ------------------------------------------------------


@pytest.mark.parametrize("model", ["Chatterbox", "Chatterbox-Turbo", "Chatterbox-Multilingual"])
def test_chatterbox_speaks_24khz_that_encodes_to_every_format(
    sdk: openai.OpenAI, model: str
) -> None:
    samples, rate = speak(sdk, model=model)
    assert rate == 24_000
    assert 0.5 < seconds(samples, rate) < 10  # the checkpoints stop after ~1-5 s of tokens
    assert np.isfinite(samples).all() and np.abs(samples).max() > 0
    for response_format in RESPONSE_FORMATS:
        encoded = encode_audio(samples, rate, response_format)  # type: ignore[arg-type]
        back, back_rate, _ = decode(encoded.data, response_format)
        assert abs(seconds(back, back_rate) - seconds(samples, rate)) < 0.15


def test_multilingual_clones_a_clip_in_its_language(sdk: openai.OpenAI) -> None:
    """A clip voice through the API. (Each checkpoint's conds.pt was made by its class's own
    prepare_conditionals from a clip, so cloning has run for all three variants already.)"""
    samples, rate = speak(
        sdk,
        model="Chatterbox-Multilingual",
        voice="nova",
        language="de",
        input="Guten Morgen, wie geht es dir?",
    )
    assert rate == 24_000 and seconds(samples, rate) > 0.5


# --- the runner's contract, with a recording stand-in for the model ---------------------------


class RecordingModel:
    """Stands in for a Chatterbox class: records overlap and which conditionals each call saw."""

    def __init__(self) -> None:
        self.conds: object = "builtin"
        self.active = 0
        self.most_active = 0
        self.prepared: list[str] = []
        self.seen: list[object] = []

    @classmethod
    def from_local(cls, folder: Path, device: str) -> RecordingModel:
        return cls()

    def prepare_conditionals(self, path: str) -> None:
        self.prepared.append(path)
        self.conds = f"clip:{Path(path).name}"

    def generate(self, text: str, **_: object):  # type: ignore[no-untyped-def]
        import torch

        self.active += 1
        self.most_active = max(self.most_active, self.active)
        self.seen.append(self.conds)
        time.sleep(0.05)
        self.active -= 1
        return torch.zeros(1, 2400)


def test_runner_generates_one_at_a_time_and_keeps_each_voice(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from runners import chatterbox

    monkeypatch.setitem(chatterbox.CHATTERBOX_CLASSES, "original", lambda: RecordingModel)
    for name in chatterbox.REQUIRED_FILES["original"]:
        (tmp_path / name).write_bytes(b"stand-in weights")  # not empty: preflight checks
    clip = tmp_path / "anna.wav"
    clip.write_bytes(b"")
    spec = PhysicalModel(type="tts", backend="chatterbox", variant="original", estimated_vram_gb=2)
    runner = chatterbox.ChatterboxRunner("cb", spec, tmp_path)
    runner.load()
    voices = [None, clip, None, clip] * 2
    threads = [
        threading.Thread(
            target=runner.speak, args=("Hi.",), kwargs={"voice": v, "language": "en", "speed": 1.0}
        )
        for v in voices
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    model = runner._model
    assert model.most_active == 1
    assert model.prepared == [str(clip)]  # a clip's conditionals are computed once
    assert sorted(map(str, model.seen)) == ["builtin"] * 4 + ["clip:anna.wav"] * 4
    normal = runner.speak("Hi.", voice=None, language="en", speed=1.0)
    fast = runner.speak("Hi.", voice=None, language="en", speed=2.0)  # time-stretched
    assert normal.size == 2400 and fast.size == pytest.approx(1200, abs=64)
    with pytest.raises(ValueError, match="English only"):
        runner.speak("Hallo.", voice=None, language="de", speed=1.0)
    runner.unload()
    with pytest.raises(NotLoaded, match="not loaded"):
        runner.speak("Hi.", voice=None, language="en", speed=1.0)


def test_runner_refuses_missing_files_naming_them(tmp_path: Path) -> None:
    from runners.base import WeightsMissing
    from runners.chatterbox import ChatterboxRunner

    spec = PhysicalModel(type="tts", backend="chatterbox", variant="turbo", estimated_vram_gb=2)
    with pytest.raises(WeightsMissing, match=r"ve\.safetensors"):
        ChatterboxRunner("t", spec, tmp_path).load()

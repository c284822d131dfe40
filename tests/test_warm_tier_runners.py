"""The warm tier with real runners, over HTTP with the openai SDK: a model evicted warm is served
again after its weights are deleted from disk, with the same seeded answer as before.

Two copies of each model (one physical model each) take turns: two tiny random-weight Qwen3.5
LLMs that the test builds (one LLM at a time, so each replaces the other), and two copies of the
real MiniLM (`make setup`) on a GPU budget with room for one. Deleting the first copy's folder
after it loads is what makes the test mean something: a cold model would fail its preflight
(`model_weights_missing`), a warm one never reads its folder again. Here, on the CPU, parking a
torch model keeps the loaded model in host memory and counts it against the host budget; on a GPU
the same calls move its modules to the host and back (test_warm_tier_gpu.py).
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from starlette.testclient import TestClient

from llmux.settings import Settings
from tests.conftest import TEST_KEY, real_models, write_config
from tests.tiny_models import build_tiny_qwen35_vl

MINILM = Settings.from_env().models_dir / "minilm-l6-v2"
pytestmark = real_models(MINILM)

HELLO = [{"role": "user", "content": "Say hello."}]


def models_yaml(root: Path, host_budget_gb: float) -> str:
    llm = (
        "    type: llm\n    backend: transformers\n    estimated_vram_gb: 0.05\n"
        "    supports_vision: true\n    parser: qwen3.5\n"
    )
    embedding = "    type: embedding\n    backend: transformers\n    estimated_vram_gb: 0.2\n"
    return (
        f"gpu_budget_gb: 0.3\nhost_budget_gb: {host_budget_gb}\nphysical_models:\n"
        + "".join(f"  {name}:\n    path: {root / name}\n{llm}" for name in ("tiny-a", "tiny-b"))
        + "".join(
            f"  {name}:\n    path: {root / name}\n{embedding}" for name in ("mini-a", "mini-b")
        )
        + "virtual_models:\n"
        + "".join(f"  {name}: {{physical: {name}}}\n" for name in ("tiny-a", "tiny-b"))
        + "".join(f"  {name}: {{physical: {name}}}\n" for name in ("mini-a", "mini-b"))
    )


@pytest.fixture(scope="module")
def tiny_qwen(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tiny-qwen3.5")
    build_tiny_qwen35_vl(out)
    return out


def serve(tmp_path: Path, tiny_qwen: Path, host_budget_gb: float) -> Iterator[TestClient]:
    from llmux.app import create_app

    root = tmp_path / "models"
    for name in ("tiny-a", "tiny-b"):
        shutil.copytree(tiny_qwen, root / name)
    for name in ("mini-a", "mini-b"):
        shutil.copytree(MINILM, root / name)
    config = write_config(tmp_path / "config", models_yaml(root, host_budget_gb))
    settings = Settings(config_dir=config, models_dir=root)
    with TestClient(create_app(settings), base_url="http://llmux.test") as http:
        yield http


@pytest.fixture
def warm_http(tmp_path: Path, tiny_qwen: Path) -> Iterator[TestClient]:
    yield from serve(tmp_path, tiny_qwen, host_budget_gb=2)


@pytest.fixture
def cold_http(tmp_path: Path, tiny_qwen: Path) -> Iterator[TestClient]:
    yield from serve(tmp_path, tiny_qwen, host_budget_gb=0)


def sdk(http: TestClient) -> openai.OpenAI:
    return openai.OpenAI(
        api_key=TEST_KEY, base_url="http://llmux.test/v1", http_client=http, max_retries=0
    )


def answers(client: openai.OpenAI, model: str) -> list[Any]:
    """A greedy and a seeded sampled answer, as token-exact as the API shows them."""
    greedy = client.chat.completions.create(
        model=model, messages=HELLO, max_tokens=8, temperature=0
    )
    sampled = client.chat.completions.create(
        model=model, messages=HELLO, max_tokens=8, temperature=1.0, seed=7
    )
    return [
        (c.choices[0].message.model_dump(), c.choices[0].finish_reason, c.usage.completion_tokens)
        for c in (greedy, sampled)
        if c.usage is not None
    ]


def vector(client: openai.OpenAI, model: str) -> list[float]:
    return client.embeddings.create(model=model, input="A man plays a guitar.").data[0].embedding


def test_an_llm_evicted_warm_answers_without_its_weights_and_exactly_as_before(
    warm_http: TestClient, tmp_path: Path
) -> None:
    client = sdk(warm_http)
    before = answers(client, "tiny-a")
    assert len(before) == 2
    answers(client, "tiny-b")  # one LLM at a time: tiny-a is parked
    health = warm_http.get("/health").json()
    assert set(health["warm_models"]) == {"tiny-a"}
    assert health["warm_models"]["tiny-a"]["host_bytes"] > 0
    assert health["host_budget_bytes"] == 2 * 1024**3
    assert health["host_used_bytes"] == health["warm_models"]["tiny-a"]["host_bytes"]

    shutil.rmtree(tmp_path / "models" / "tiny-a")

    assert answers(client, "tiny-a") == before
    health = warm_http.get("/health").json()
    assert health["loaded_models"]["tiny-a"]["unparks"] == 1
    assert set(health["warm_models"]) == {"tiny-b"}


def test_an_embedding_model_evicted_warm_embeds_without_its_weights_and_exactly_as_before(
    warm_http: TestClient, tmp_path: Path
) -> None:
    client = sdk(warm_http)
    before = vector(client, "mini-a")
    vector(client, "mini-b")  # 0.2 + 0.2 GB over the 0.3 GB budget: mini-a makes room
    assert set(warm_http.get("/health").json()["warm_models"]) == {"mini-a"}

    shutil.rmtree(tmp_path / "models" / "mini-a")

    assert vector(client, "mini-a") == before


def test_without_a_warm_tier_the_same_switch_needs_the_weights(
    cold_http: TestClient, tmp_path: Path
) -> None:
    """The control: what the two tests above would see from a model that went cold."""
    client = sdk(cold_http)
    answers(client, "tiny-a")
    answers(client, "tiny-b")
    assert cold_http.get("/health").json()["warm_models"] == {}
    shutil.rmtree(tmp_path / "models" / "tiny-a")

    with pytest.raises(openai.APIStatusError) as caught:
        answers(client, "tiny-a")
    assert caught.value.code == "model_weights_missing"


# --- the other torch runners, on their own (no HTTP) ----------------------------------------------


def test_a_transformers_asr_model_parks_and_transcribes_the_same_without_its_weights(
    tmp_path: Path,
) -> None:
    import numpy as np

    from llmux.core.config import PhysicalModel
    from runners.base import Parkable
    from runners.transformers_asr import TransformersAsrRunner
    from tests.audio_fixtures import build_tiny_whisper

    weights = build_tiny_whisper(tmp_path / "tiny-whisper")
    spec = PhysicalModel(
        type="asr", backend="transformers", estimated_vram_gb=0.1, default_language="en"
    )
    runner = TransformersAsrRunner("tiny-whisper", spec, weights)
    assert isinstance(runner, Parkable)
    runner.load()
    audio = np.random.default_rng(7).uniform(-0.1, 0.1, 16_000).astype(np.float32)

    def transcribe() -> object:
        return runner.transcribe(audio, language="en", prompt=None, temperature=0.0)

    before = transcribe()
    assert runner.host_bytes() > 0
    runner.park()
    shutil.rmtree(weights)
    runner.unpark()
    assert transcribe() == before
    runner.unload()


def test_a_chatterbox_model_counts_its_three_networks_as_host_bytes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch

    from llmux.core.config import PhysicalModel
    from runners import chatterbox
    from runners.base import NotLoaded, Parkable

    class Networks:
        """A Chatterbox class's three torch networks, and nothing else."""

        def __init__(self) -> None:
            self.conds = None
            self.t3, self.s3gen, self.ve = (torch.nn.Linear(4, 4) for _ in range(3))

        @classmethod
        def from_local(cls, folder: Path, device: str) -> Networks:
            return cls()

    monkeypatch.setitem(chatterbox.CHATTERBOX_CLASSES, "original", lambda: Networks)
    for name in chatterbox.REQUIRED_FILES["original"]:
        (tmp_path / name).write_bytes(b"stand-in weights")
    spec = PhysicalModel(type="tts", backend="chatterbox", variant="original", estimated_vram_gb=2)
    runner = chatterbox.ChatterboxRunner("cb", spec, tmp_path)
    assert isinstance(runner, Parkable)
    with pytest.raises(NotLoaded):
        runner.park()
    runner.load()
    model = runner._model
    assert runner.host_bytes() == 3 * (4 * 4 + 4) * 4  # three Linear(4, 4) in float32
    runner.park()
    runner.unpark()
    assert runner._model is model, "on the CPU the loaded model itself stays"
    runner.unload()
    assert runner.host_bytes() == 0

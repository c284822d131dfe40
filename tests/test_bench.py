"""The admin benchmark (POST /admin/models/{name}/bench) and the runners' CPU-only device.

The service is driven with fake runners of every kind: the GPU half must go through residency,
the CPU half must build its own runner and leave residency alone, and without a GPU only the CPU
half runs. The CPU-only device is checked on the real backends: llama.cpp gets no layer and no
batch on the GPU, CTranslate2 and torch pick the CPU even when a GPU is there.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from starlette.testclient import TestClient

from llmux.core.config import Registry
from llmux.core.errors import ApiError
from llmux.keys import KeyRing
from llmux.services import bench
from llmux.services.bench import Benchmark, host_bytes_needed
from llmux.services.chat import ChatService
from llmux.settings import Settings
from llmux.state import AppState
from llmux_policy.executor import Residency
from runners.chat import GenerationChunk, GenerationRequest
from runners.embeddings import Embeddings
from runners.transcription import SAMPLE_RATE, Transcript
from tests.conftest import MODELS_DIR, TEST_KEY, real_models, write_config
from tests.runner_fakes import RecordingRunner

GIB = 1024**3
ADMIN_KEY = "sk-llmux-admin-key-for-the-bench-tests"
REGISTRY = Registry.model_validate(
    {
        "physical_models": {
            "chat": {
                "type": "llm",
                "backend": "llamacpp",
                "model_file": "c.gguf",
                "estimated_vram_gb": 2,
            },
            "ears": {"type": "asr", "backend": "faster_whisper", "estimated_vram_gb": 1},
            "voice": {
                "type": "tts",
                "backend": "piper",
                "model_file": "v.onnx",
                "estimated_vram_gb": 1,
                "default_language": "en",
            },
            "vectors": {"type": "embedding", "backend": "transformers", "estimated_vram_gb": 1},
        },
        "virtual_models": {
            "Chat": {"physical": "chat"},
            "Ears": {"physical": "ears"},
            "Voice": {"physical": "voice"},
            "Vectors": {"physical": "vectors"},
        },
    }
)


class FakeModel(RecordingRunner):
    """Every capability at once; `pause_s` per unit of work stands in for a slower device, and
    `gate` (when given) holds the timed run until it is set."""

    sample_rate = 16000
    context_length = 4096
    dimensions = 8
    max_input_tokens = 512

    def __init__(
        self,
        physical_id: str,
        log: list[tuple[str, str]],
        *,
        pause_s: float = 0.0,
        gate: threading.Event | None = None,
    ) -> None:
        super().__init__(physical_id, lambda what, pid: log.append((what, pid)))
        self.pause_s = pause_s
        self.gate = gate
        self.requests: list[GenerationRequest] = []

    def _work(self, units: int) -> None:
        if self.gate is not None:
            assert self.gate.wait(10)
        time.sleep(self.pause_s * units)

    def render_prompt(self, request: GenerationRequest) -> str:
        return str(request.messages)

    def check(self, request: GenerationRequest) -> None:
        pass

    def harmony_encoding(self) -> None:
        return None

    def generate(
        self, request: GenerationRequest, cancel: threading.Event
    ) -> Iterator[GenerationChunk]:
        self.requests.append(request)
        tokens = request.max_tokens or 1
        for _ in range(tokens):
            self._work(1)
            yield GenerationChunk(text="x", token_ids=(1,))
        yield GenerationChunk(finish_reason="length", prompt_tokens=5, completion_tokens=tokens)

    def transcribe(self, audio: np.ndarray, **_: Any) -> Transcript:
        self._work(1)
        return Transcript(
            text="heard", language="en", duration=len(audio) / SAMPLE_RATE, segments=()
        )

    def speak(self, text: str, **_: Any) -> np.ndarray:
        self._work(1)
        return np.zeros(len(text) * 800, dtype=np.float32)  # 0.05 s of audio per character

    def embed(self, inputs: list[str] | list[list[int]]) -> Embeddings:
        self._work(1)
        return Embeddings(np.zeros((len(inputs), 8), np.float32), tuple(3 for _ in inputs))


class FakeGpu:
    """A memory probe that sees a device (the server then has a GPU to bench on)."""

    def used_bytes(self) -> int:
        return 0

    def total_bytes(self) -> int:
        return 16 * GIB


def make_state(
    tmp_path: Path,
    *,
    gpu: bool,
    gate: threading.Event | None = None,
    gpu_pause_s: float = 0.0,
    registry: Registry = REGISTRY,
) -> AppState:
    """An app state on fake runners: the CPU ones pause 2 ms per unit of work, the served ones
    `gpu_pause_s`; `gpu` gives residency a memory probe that sees a device."""
    config = write_config(tmp_path / "config", "physical_models: {}\nvirtual_models: {}\n")
    (config / "api_keys.yaml").write_text(
        f"api_keys:\n  - {{key: {TEST_KEY}, name: test-client}}\n"
        f"  - {{key: {ADMIN_KEY}, name: operator, role: admin}}\n"
    )
    settings = Settings(config_dir=config, models_dir=tmp_path / "models")
    log: list[tuple[str, str]] = []
    served: list[FakeModel] = []
    on_cpu: list[FakeModel] = []

    def serving_runner(pid: str) -> FakeModel:
        served.append(FakeModel(pid, log, pause_s=gpu_pause_s))
        return served[-1]

    def cpu_runner(pid: str, spec: Any, models_dir: Path) -> FakeModel:
        on_cpu.append(FakeModel(f"{pid}", log, pause_s=0.002, gate=gate))
        return on_cpu[-1]

    budget = int((registry.gpu_budget_gb or 16) * GIB)
    residency = Residency(registry, serving_runner, budget, probe=FakeGpu() if gpu else None)
    state = AppState(
        settings=settings,
        registry=registry,
        keys=KeyRing.load(settings.api_keys_file),
        residency=residency,
        chat=ChatService(registry, residency),
        bench=Benchmark(cpu_runner=cpu_runner),
    )
    state.log, state.served, state.on_cpu = log, served, on_cpu  # type: ignore[attr-defined]
    return state


@pytest.fixture
def http(tmp_path: Path) -> Iterator[TestClient]:
    from llmux.app import create_app

    state = make_state(tmp_path, gpu=False)
    with TestClient(create_app(state.settings, state), base_url="http://llmux.test") as client:
        yield client


def test_only_admin_keys_reach_the_bench_and_unknown_models_are_404(http: TestClient) -> None:
    assert http.post("/admin/models/Chat/bench").status_code == 401
    refused = http.post("/admin/models/Chat/bench", headers={"Authorization": f"Bearer {TEST_KEY}"})
    assert refused.status_code == 403
    assert refused.json()["error"]["code"] == "admin_key_required"
    unknown = http.post(
        "/admin/models/nope/bench", headers={"Authorization": f"Bearer {ADMIN_KEY}"}
    )
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "model_not_found"


def test_without_a_gpu_only_the_cpu_half_runs_and_says_why(http: TestClient) -> None:
    answer = http.post("/admin/models/Chat/bench", headers={"Authorization": f"Bearer {ADMIN_KEY}"})
    assert answer.status_code == 200
    result = answer.json()
    assert result["model"] == "chat" and result["type"] == "llm"
    assert result["gpu"] is None and result["speedup"] is None
    assert result["gpu_missing"].startswith("no GPU")
    cpu = result["cpu"]
    assert cpu["device"] == "cpu" and cpu["unit"] == "tokens"
    assert cpu["amount"] == bench.MAX_TOKENS and cpu["seconds"] > 0 and cpu["rate"] > 0
    state = http.app.state.llmux  # type: ignore[attr-defined]
    # The CPU half never entered residency: nothing was made resident, no serving runner built.
    assert state.residency.snapshot()["models"] == [] and state.served == []
    assert state.log == [("load", "chat"), ("unload", "chat")]  # its own runner, let go of


async def test_with_a_gpu_the_gpu_half_goes_through_residency(tmp_path: Path) -> None:
    state = make_state(tmp_path, gpu=True)
    result = await bench.run(state, "Chat", "operator")
    assert result.gpu is not None and result.gpu.device == "gpu"
    assert result.gpu.amount == result.cpu.amount == bench.MAX_TOKENS
    # The served runner is the resident one; the CPU runner is another, loaded and unloaded.
    assert [m["physical_id"] for m in state.residency.snapshot()["models"]] == ["chat"]
    served, on_cpu = state.served, state.on_cpu  # type: ignore[attr-defined]
    assert len(served) == 1 and len(on_cpu) == 1 and served[0] is not on_cpu[0]
    assert state.log == [("load", "chat"), ("load", "chat"), ("unload", "chat")]  # type: ignore[attr-defined]
    # The same request on both, after a short warm-up: greedy, fixed length.
    for runner in (served[0], on_cpu[0]):
        assert [r.max_tokens for r in runner.requests] == [4, bench.MAX_TOKENS]
        assert runner.requests[-1].temperature == 0
    # The CPU fake pauses per token, the GPU one does not: the speed-up is the rate ratio.
    assert result.speedup == round(result.gpu.rate / result.cpu.rate, 2) and result.speedup > 1
    await state.residency.close()


@pytest.mark.parametrize(
    ("name", "unit", "audio"),
    [
        ("Ears", "audio seconds", False),
        ("Voice", "audio seconds", True),
        ("Vectors", "texts", False),
    ],
)
async def test_every_kind_has_its_workload(
    tmp_path: Path, name: str, unit: str, audio: bool
) -> None:
    state = make_state(tmp_path, gpu=True)
    result = await bench.run(state, name, "operator")
    assert result.gpu is not None and result.speedup is not None
    for run in (result.cpu, result.gpu):
        assert run.unit == unit and run.amount > 0
        if audio:  # synthesis time against the audio's length
            assert run.amount == pytest.approx(len(bench.SPOKEN) * 0.05)
            assert run.realtime_factor == pytest.approx(run.seconds / run.amount)
        else:
            assert run.realtime_factor is None
    if name == "Ears":  # the shipped English clip, whole
        assert 3 < result.cpu.amount < 8 and result.cpu.output == "heard"
    await state.residency.close()


async def test_one_bench_at_a_time(tmp_path: Path) -> None:
    gate = threading.Event()
    state = make_state(tmp_path, gpu=False, gate=gate)
    first = asyncio.create_task(bench.run(state, "Chat", "operator"))
    while not state.bench.lock.locked():
        await asyncio.sleep(0)
    with pytest.raises(ApiError) as refused:
        await bench.run(state, "Voice", "operator")
    assert refused.value.status == 409 and refused.value.code == "bench_busy"
    gate.set()
    assert (await first).cpu.amount == bench.MAX_TOKENS
    await state.residency.close()


async def test_a_cpu_copy_that_would_not_fit_in_host_memory_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    state = make_state(tmp_path, gpu=False)
    weights = tmp_path / "models" / "chat"
    weights.mkdir(parents=True)
    (weights / "c.gguf").write_bytes(b"GGUF" + b"\0" * 4096)
    monkeypatch.setattr(bench, "available_host_bytes", lambda: 1024)
    with pytest.raises(ApiError) as refused:
        await bench.run(state, "Chat", "operator")
    assert refused.value.status == 409 and refused.value.code == "not_enough_host_memory"
    assert "host memory" in refused.value.message
    assert state.log == []  # type: ignore[attr-defined]  # refused before anything loaded
    await state.residency.close()


def test_the_host_memory_estimate_counts_what_the_cpu_dequantizes(tmp_path: Path) -> None:
    from llmux.core.config import PhysicalModel

    def spec(**fields: Any) -> PhysicalModel:
        return PhysicalModel.model_validate({"type": "llm", "estimated_vram_gb": 1, **fields})

    gguf = tmp_path / "gguf"
    gguf.mkdir()
    (gguf / "m.gguf").write_bytes(b"\0" * 1000)
    (gguf / "other.gguf").write_bytes(b"\0" * 5000)  # not the model's: not counted
    assert host_bytes_needed(spec(backend="llamacpp", model_file="m.gguf"), gguf) == 1250
    # transformers reads a GGUF into float32.
    assert host_bytes_needed(spec(backend="transformers", model_file="m.gguf"), gguf) == 8000
    mxfp4 = tmp_path / "mxfp4"
    mxfp4.mkdir()
    (mxfp4 / "config.json").write_text(
        json.dumps({"quantization_config": {"quant_method": "mxfp4"}})
    )
    (mxfp4 / "model.safetensors").write_bytes(b"\0" * 2000)
    size = 2000 + (mxfp4 / "config.json").stat().st_size
    assert host_bytes_needed(spec(backend="transformers"), mxfp4) == 4 * size


# --- the runners' CPU-only device -------------------------------------------------------------


def test_the_torch_device_is_the_cpu_when_asked_whatever_cuda_says(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import torch

    from runners.base import torch_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert torch_device("cpu") == "cpu"
    assert torch_device("auto") == "cuda"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert torch_device("auto") == "cpu"


QWEN = MODELS_DIR / "qwen2.5-coder-0.5b" / "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
WHISPER = MODELS_DIR / "whisper-base"


def needs(*paths: Path) -> Any:
    """`real_models`' marks (slow; skipped without `make setup`, failing in CI) on one test."""

    def mark(test: Any) -> Any:
        for decorator in real_models(*paths):
            test = decorator(test)
        return test

    return mark


@needs(QWEN)
def test_llama_cpp_on_the_cpu_offloads_nothing() -> None:
    from llmux.core.config import PhysicalModel
    from runners.factory import make_runner

    spec = PhysicalModel.model_validate(
        {
            "type": "llm",
            "backend": "llamacpp",
            "model_file": QWEN.name,
            "estimated_vram_gb": 1,
            "context_length": 512,
        }
    )
    # -1 ("all") reaches llama.cpp as INT32_MAX.
    for device, layers, offloads in (("auto", 2**31 - 1, True), ("cpu", 0, False)):
        runner = make_runner(QWEN.parent.name, spec, MODELS_DIR, device=device)  # type: ignore[arg-type]
        runner.load()
        try:
            llm = runner._llm  # type: ignore[attr-defined]
            assert llm.model_params.n_gpu_layers == layers
            assert llm.context_params.offload_kqv is offloads
            if not offloads:
                assert llm.context_params.op_offload is False
        finally:
            runner.unload()


@needs(WHISPER / "model.bin")
def test_faster_whisper_on_the_cpu_ignores_a_visible_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    import ctranslate2

    from llmux.core.config import PhysicalModel
    from runners.factory import make_runner

    monkeypatch.setattr(ctranslate2, "get_cuda_device_count", lambda: 1)
    spec = PhysicalModel.model_validate(
        {"type": "asr", "backend": "faster_whisper", "estimated_vram_gb": 1}
    )
    runner = make_runner(WHISPER.name, spec, MODELS_DIR, device="cpu")
    runner.load()  # on "auto" this would ask CTranslate2 for the (absent) CUDA device
    try:
        model = runner._model.model  # type: ignore[attr-defined]
        assert model.device == "cpu" and model.compute_type.startswith("int8")
    finally:
        runner.unload()

"""The admin benchmark behind POST /admin/models/{name}/bench (TST-020..022): one physical model's
fixed workload timed on the CPU and on the GPU.

- The CPU half builds a runner of its own with device "cpu" (llama.cpp with no layer offloaded,
  torch on the CPU, CTranslate2 in int8), loads it, runs a warm-up and the timed workload, and
  unloads it. It never enters residency: the GPU's models and budget are untouched. Before the
  load, the host's available memory is compared with an estimate of what the CPU copy takes, so a
  large model is refused (409) rather than get the server killed for memory.
- The GPU half goes through residency as a request does (`Residency.use`: the planner decides the
  evictions), holds a chat model's generation lock, and times a warm-up and the workload on the
  model's inference threads.
- Without a GPU (the memory probe reads nothing) the GPU half is not run and `gpu_missing` says
  so: timing "auto" against "cpu" there would compare the CPU with itself.
- One benchmark at a time (409 while one runs): two would time each other.

The workload is the same on both devices: a fixed prompt decoded greedily to a fixed number of
tokens, the shipped English clip, a fixed sentence, or a fixed batch of texts.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal, cast

import numpy as np

from llmux.audio.decode import decode_audio
from llmux.audio.samples import SENTENCES, sample
from llmux.core.concurrency import run_to_end
from llmux.core.config import PhysicalModel
from llmux.core.errors import ApiError
from llmux.services.admin import physical_id_of
from llmux.voices import BUILTIN_VOICE, choose_voice
from llmux.wire.bench import BenchResult, BenchRun
from runners.base import Runner, release_host_memory
from runners.chat import ChatRunner, GenerationRequest
from runners.embeddings import EmbedRunner
from runners.factory import make_runner
from runners.speech import SpeakRunner
from runners.transcription import SAMPLE_RATE, TranscribeRunner

if TYPE_CHECKING:
    from llmux.state import AppState

log = logging.getLogger("llmux.bench")

PROMPT = "Explain in a few sentences how the gears of a bicycle work."
MAX_TOKENS = 64
SPOKEN = "The quick brown fox jumps over the lazy dog, then runs back into the quiet forest."
TEXTS = [f"Sentence {i}: the gears of a bicycle trade speed for force." for i in range(64)]
# Host memory a CPU copy takes, per byte of weights on disk (see `host_bytes_needed`).
RUNTIME_OVERHEAD = 1.25
DEQUANTIZED = {"mxfp4": 4.0, "gguf": 8.0, "other": 2.5}

CpuRunnerFactory = Callable[[str, PhysicalModel, Path], Runner]
Unit = Literal["tokens", "audio seconds", "texts"]


def cpu_runner(physical_id: str, spec: PhysicalModel, models_dir: Path) -> Runner:
    return make_runner(physical_id, spec, models_dir, device="cpu")


@dataclass
class Benchmark:
    """What the benchmark keeps between requests: the lock that lets one run at a time, and how
    it builds its CPU runners (tests give it fakes)."""

    cpu_runner: CpuRunnerFactory = cpu_runner
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


@dataclass(frozen=True)
class Workload:
    """What is timed. `warm_up` and `run` block; `run` returns (amount in `unit`, a glimpse)."""

    description: str
    unit: Unit
    warm_up: Callable[[Runner, threading.Event], object]
    run: Callable[[Runner, threading.Event], tuple[float, str]]
    makes_audio: bool = False

    def timed(self, runner: Runner, cancel: threading.Event) -> tuple[float, float, str]:
        """(seconds, amount, glimpse) of one run after one warm-up."""
        self.warm_up(runner, cancel)
        started = time.perf_counter()
        amount, glimpse = self.run(runner, cancel)
        return time.perf_counter() - started, amount, glimpse


async def run(state: AppState, name: str, client: str) -> BenchResult:
    physical_id = physical_id_of(state, name)
    spec = state.registry.physical_models[physical_id]
    if state.bench.lock.locked():
        raise ApiError(
            "A benchmark is already running; one runs at a time (they would time each other).",
            status=409,
            code="bench_busy",
        )
    async with state.bench.lock:
        log.info("admin %s: bench %s", client, physical_id)
        workload = await workload_for(state, physical_id, spec)
        missing = gpu_missing(state)
        gpu = None if missing else await _gpu_half(state, physical_id, spec, workload)
        cpu = await _cpu_half(state, physical_id, spec, workload)
    result = BenchResult(
        model=physical_id,
        type=spec.type,
        backend=spec.backend,
        workload=workload.description,
        cpu=cpu,
        gpu=gpu,
        gpu_missing=missing,
        speedup=round(gpu.rate / cpu.rate, 2) if gpu and cpu.rate > 0 else None,
    )
    log.info(
        "bench %s: cpu %.2f s, gpu %s, speed-up %s",
        physical_id,
        cpu.seconds,
        f"{gpu.seconds:.2f} s" if gpu else missing,
        result.speedup,
    )
    return result


def gpu_missing(state: AppState) -> str | None:
    if state.residency.snapshot()["device_used_bytes"] is None:
        return "no GPU: the server sees no NVIDIA GPU (NVML reads none), so only the CPU ran"
    return None


async def _gpu_half(
    state: AppState, physical_id: str, spec: PhysicalModel, workload: Workload
) -> BenchRun:
    started = time.perf_counter()
    async with state.residency.use(physical_id) as runner:
        load_s = time.perf_counter() - started
        lock = (
            state.chat.gate(physical_id).alone() if spec.type == "llm" else contextlib.nullcontext()
        )
        cancel = threading.Event()
        async with lock:
            seconds, amount, glimpse = await run_to_end(
                lambda: workload.timed(runner, cancel),
                cancel,
                executor=state.residency.inference_threads(physical_id),
            )
    return _bench_run("gpu", load_s, seconds, amount, glimpse, workload)


async def _cpu_half(
    state: AppState, physical_id: str, spec: PhysicalModel, workload: Workload
) -> BenchRun:
    models_dir = state.settings.models_dir
    cancel = threading.Event()

    def load_run_unload() -> tuple[float, tuple[float, float, str]]:
        runner = state.bench.cpu_runner(physical_id, spec, models_dir)
        runner.preflight()
        refuse_without_host_memory(physical_id, spec, spec.weights_path(physical_id, models_dir))
        started = time.perf_counter()
        try:
            runner.load()
            load_s = time.perf_counter() - started
            return load_s, workload.timed(runner, cancel)
        finally:
            runner.unload()
            release_host_memory()

    load_s, (seconds, amount, glimpse) = await run_to_end(load_run_unload, cancel)
    return _bench_run("cpu", load_s, seconds, amount, glimpse, workload)


def _bench_run(
    device: Literal["cpu", "gpu"],
    load_s: float,
    seconds: float,
    amount: float,
    glimpse: str,
    workload: Workload,
) -> BenchRun:
    return BenchRun(
        device=device,
        load_s=load_s,
        seconds=seconds,
        amount=amount,
        unit=workload.unit,
        rate=amount / seconds if seconds > 0 else 0.0,
        realtime_factor=seconds / amount if workload.makes_audio and amount else None,
        output=glimpse[:200],
    )


# --- workloads ------------------------------------------------------------------------------------


async def workload_for(state: AppState, physical_id: str, spec: PhysicalModel) -> Workload:
    if spec.type == "llm":
        return chat_workload()
    if spec.type == "asr":
        audio = await asyncio.to_thread(decode_audio, sample("en"), max_seconds=60)
        return transcription_workload(audio)
    if spec.type == "tts":
        voice, language = choose_voice(state.voices, physical_id, spec, BUILTIN_VOICE, None)
        return speech_workload(voice.reference, language)
    return embedding_workload()


def chat_workload() -> Workload:
    def generate(runner: Runner, cancel: threading.Event, max_tokens: int) -> tuple[float, str]:
        chat = cast(ChatRunner, runner)
        request = GenerationRequest(
            messages=[{"role": "user", "content": PROMPT}],
            max_tokens=max_tokens,
            temperature=0.0,
            seed=0,
        )
        chat.check(request)
        tokens, text = 0, []
        for chunk in chat.generate(request, cancel):
            text.append(chunk.text)
            tokens = chunk.completion_tokens if chunk.completion_tokens is not None else tokens
        return tokens, "".join(text)

    return Workload(
        description=f"{PROMPT!r}, greedy, at most {MAX_TOKENS} tokens",
        unit="tokens",
        warm_up=lambda runner, cancel: generate(runner, cancel, 4),
        run=lambda runner, cancel: generate(runner, cancel, MAX_TOKENS),
    )


def transcription_workload(audio: np.ndarray) -> Workload:
    def transcribe(runner: Runner, cancel: threading.Event, clip: np.ndarray) -> tuple[float, str]:
        transcript = cast(TranscribeRunner, runner).transcribe(
            clip, language="en", prompt=None, temperature=0.0, cancel=cancel
        )
        return len(clip) / SAMPLE_RATE, transcript.text

    return Workload(
        description=f"transcribe {len(audio) / SAMPLE_RATE:.1f} s of English: {SENTENCES['en']!r}",
        unit="audio seconds",
        warm_up=lambda runner, cancel: transcribe(runner, cancel, audio[: 2 * SAMPLE_RATE]),
        run=lambda runner, cancel: transcribe(runner, cancel, audio),
    )


def speech_workload(voice: Path | None, language: str) -> Workload:
    def speak(runner: Runner, text: str) -> tuple[float, str]:
        speaker = cast(SpeakRunner, runner)
        samples = speaker.speak(text, voice=voice, language=language, speed=1.0)
        seconds = len(samples) / speaker.sample_rate
        return seconds, f"{seconds:.2f} s of audio"

    return Workload(
        description=f"speak {SPOKEN!r}",
        unit="audio seconds",
        warm_up=lambda runner, cancel: speak(runner, "Hello."),
        run=lambda runner, cancel: speak(runner, SPOKEN),
        makes_audio=True,
    )


def embedding_workload() -> Workload:
    def embed(runner: Runner, texts: list[str]) -> tuple[float, str]:
        vectors = cast(EmbedRunner, runner).embed(texts)
        return len(texts), f"{len(texts)} vectors of {vectors.vectors.shape[1]} dimensions"

    return Workload(
        description=f"embed a batch of {len(TEXTS)} sentences",
        unit="texts",
        warm_up=lambda runner, cancel: embed(runner, TEXTS[:2]),
        run=lambda runner, cancel: embed(runner, TEXTS),
    )


# --- host memory ----------------------------------------------------------------------------------


def refuse_without_host_memory(physical_id: str, spec: PhysicalModel, weights: Path) -> None:
    """409 when the host has less memory available than a CPU copy of the model would take."""
    available = available_host_bytes()
    needed = host_bytes_needed(spec, weights)
    if available is not None and needed > available:
        raise ApiError(
            f"A CPU copy of {physical_id!r} would take about {needed / 1024**3:.1f} GB of host "
            f"memory and {available / 1024**3:.1f} GB is available; free memory (or unload "
            "models warm in host RAM) and run the benchmark again.",
            status=409,
            code="not_enough_host_memory",
        )


def host_bytes_needed(spec: PhysicalModel, weights: Path) -> int:
    """A rough upper estimate of the host memory a CPU load of the model takes: its weights on
    disk with some room for the runtime, more for what the CPU dequantizes (transformers reads a
    GGUF into float32, an MXFP4 checkpoint into bf16, other quantized checkpoints likewise)."""
    if spec.model_file:
        files = [weights / name for name in (spec.model_file, spec.mmproj_file) if name]
    else:
        files = [path for path in weights.rglob("*") if path.is_file()] if weights.is_dir() else []
    size = sum(path.stat().st_size for path in files if path.is_file())
    factor = RUNTIME_OVERHEAD
    if spec.backend == "transformers":
        if spec.model_file:
            factor = DEQUANTIZED["gguf"]
        elif method := _quantization_method(weights):
            factor = DEQUANTIZED["mxfp4" if method == "mxfp4" else "other"]
    return int(size * factor)


def _quantization_method(weights: Path) -> str | None:
    with contextlib.suppress(OSError, ValueError, AttributeError):
        config = json.loads((weights / "config.json").read_text())
        method = (config.get("quantization_config") or {}).get("quant_method")
        return str(method) if method else None
    return None


def available_host_bytes() -> int | None:
    """MemAvailable from /proc/meminfo; None where there is none (not Linux)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return None

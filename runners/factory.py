"""Which runner class serves a (backend, type) pair, imported only when a model is first used.

Every runner class is built the same way: `cls(physical_id, spec, weights, device=device)`, where
`weights` is the model's path under the models directory and `device` is "auto" (serving) or
"cpu" (the benchmark's CPU half). Construction is cheap; `load()` does the work.
"""

from __future__ import annotations

from importlib import import_module
from pathlib import Path

from llmux.core.config import PhysicalModel
from runners.base import Device, ModelLoadError, Runner

RUNNER_CLASSES: dict[tuple[str, str], str] = {
    ("transformers", "llm"): "runners.transformers_llm:TransformersChatRunner",
    ("transformers", "asr"): "runners.transformers_asr:TransformersAsrRunner",
    ("llamacpp", "llm"): "runners.llamacpp:LlamaCppChatRunner",
    ("faster_whisper", "asr"): "runners.faster_whisper:FasterWhisperRunner",
    ("chatterbox", "tts"): "runners.chatterbox:ChatterboxRunner",
    ("piper", "tts"): "runners.piper:PiperRunner",
    ("transformers", "embedding"): "runners.embeddings:TransformersEmbeddingRunner",
}


def make_runner(
    physical_id: str, spec: PhysicalModel, models_dir: Path, *, device: Device = "auto"
) -> Runner:
    target = RUNNER_CLASSES.get((spec.backend, spec.type))
    if target is None:  # config validation makes this unreachable for a loaded registry
        raise ModelLoadError(f"no runner serves backend {spec.backend!r} for type {spec.type!r}")
    module_name, class_name = target.split(":")
    try:
        module = import_module(module_name)
    except ImportError as exc:
        raise ModelLoadError(
            f"The {spec.backend} backend is not installed ({exc.name or exc}); run "
            "`make setup` (or scripts/setup.sh) to install it."
        ) from exc
    runner: Runner = getattr(module, class_name)(
        physical_id, spec, spec.weights_path(physical_id, models_dir), device=device
    )
    return runner

"""What every section gets: the run's options, its work directory, the servers, the models, and
small helpers for llmux's admin API and /metrics."""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from bench.servers import KEY, Served

# The embedded default's models (config/local/models.yaml).
MAIN_LLM = "Qwen2.5-Coder-0.5B"
MAIN_PHYSICAL = "qwen2.5-coder-0.5b"
MAIN_GGUF = "qwen2.5-coder-0.5b/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
MAIN_CONTEXT = 8192
SECOND_LLM = "Gemma-3-270M"
SECOND_PHYSICAL = "gemma3-270m"
SECOND_GGUF = "gemma3-270m/gemma-3-270m-q4_k_m.gguf"
TINY_LLM = "Tiny-Transformers"
TINY_PHYSICAL = "tiny-transformers"
ASR = "whisper-base"
TTS = "piper-joe"
TTS_FILE = "piper-joe/en_US-joe-medium.onnx"
METRIC_SUM = re.compile(
    r"^(?P<series>llmux_model_load_seconds|llmux_swap_seconds|llmux_model_unpark_seconds)_sum"
    r'\{[^}]*model="(?P<model>[^"]*)"'
    r"[^}]*\} (?P<value>\S+)$",
    re.MULTILINE,
)


@dataclass(frozen=True)
class Options:
    quick: bool = False
    rounds: int = 5
    tokens: int = 64  # streamed per answer in the gateway comparison
    concurrency: tuple[int, ...] = (1, 4, 8)
    concurrency_tokens: int = 16
    endpoint_seconds: float = 1.0
    connections: int = 8
    # Open WebUI's built-in tools sent with each message: all 36 (about 5.8k tokens for Qwen's
    # tokenizer) cost two prefills of minutes each on 2 cores, so a default run sends 8.
    tools: int = 8
    tool_rounds: int = 1
    startup_rounds: int = 3

    @classmethod
    def quick_run(cls) -> Options:
        return cls(
            quick=True,
            rounds=1,
            tokens=8,
            concurrency=(1, 4, 8),
            concurrency_tokens=4,
            endpoint_seconds=0.3,
            tools=1,
            tool_rounds=1,
            startup_rounds=1,
        )


@dataclass
class Bench:
    options: Options
    work: Path
    models_dir: Path
    llmux: Served
    bare: Served | None = None
    tiny_model: Path | None = None
    qwen_transformers: Path | None = None
    startup: dict[str, list[Served]] = field(default_factory=dict)

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {KEY}"}

    def admin(self, method: str, path: str, timeout_s: float = 600) -> Any:
        response = httpx.request(
            method, f"{self.llmux.base}/admin{path}", headers=self.auth, timeout=timeout_s
        )
        response.raise_for_status()
        return response.json()

    def health(self) -> dict[str, Any]:
        response = httpx.get(f"{self.llmux.base}/health", timeout=30)
        response.raise_for_status()
        result: dict[str, Any] = response.json()
        return result

    def metric_sums(self) -> dict[tuple[str, str], float]:
        """llmux's residency histograms from /metrics: (series, model) -> the sum so far. Read
        line by line: under BentoML's multiprocess collection the series come without the
        `# TYPE` lines a Prometheus parser groups them by."""
        text = httpx.get(f"{self.llmux.base}/metrics", timeout=30).text
        sums: dict[tuple[str, str], float] = {}
        for match in METRIC_SUM.finditer(text):
            sums[(match["series"], match["model"])] = float(match["value"])
        return sums

    def unload_all(self) -> None:
        with contextlib.suppress(httpx.HTTPError):
            self.admin("POST", "/unload-all")

"""POST /admin/models/{name}/bench: a physical model's fixed workload timed on CPU and GPU.

The answer carries both runs, the speed-up (GPU rate over CPU rate) and, for text-to-speech, how
long synthesis took against the length of the audio it made.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from llmux.core.config import ModelType


class BenchRun(BaseModel):
    """One timed run of the workload on one device."""

    device: Literal["cpu", "gpu"]
    load_s: float = Field(
        description="Seconds to make the model ready for this run: its CPU load, or the wait "
        "for residency (0 when it was already resident). Not part of `seconds`."
    )
    seconds: float = Field(description="The timed inference alone, after a warm-up run.")
    amount: float = Field(description="What the run produced, in `unit`.")
    unit: Literal["tokens", "audio seconds", "texts"]
    rate: float = Field(description="`amount` per second.")
    realtime_factor: float | None = Field(
        None, description="Text-to-speech: synthesis seconds per second of audio (< 1: faster)."
    )
    output: str = Field(description="A glimpse of what it produced, to show the run was real.")


class BenchResult(BaseModel):
    model: str = Field(description="The physical model benchmarked.")
    type: ModelType
    backend: str
    workload: str = Field(description="What was timed, the same on both devices.")
    cpu: BenchRun
    gpu: BenchRun | None = Field(description="None when there is no GPU (see `gpu_missing`).")
    gpu_missing: str | None = Field(description="Why there is no GPU run.")
    speedup: float | None = Field(description="The GPU's rate over the CPU's; None without GPU.")

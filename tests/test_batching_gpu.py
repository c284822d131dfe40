"""Continuous batching on a real GPU, beside other work on the same device.

Skipped (saying so) without CUDA. The batch loop writes each step's inputs on one stream and
runs the forward pass on transformers' compute stream; another model's work queued on the
default stream (another runner's thread, a park, an unpark) must not let the forward pass read
a step's inputs before they are written. On an H200, before the loop ran on its compute stream,
every batched answer parted from its one-at-a-time tokens within a few steps.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from llmux.core.config import PhysicalModel
from runners.chat import GenerationRequest
from runners.transformers_llm import TransformersChatRunner
from tests.conftest import gpu_only
from tests.tiny_models import build_tiny_qwen3

pytestmark = gpu_only()

PROMPTS = ["Hello world", "What colour is this image?", "get_weather Berlin", "tools"]


def greedy(runner: TransformersChatRunner, prompt: str) -> list[int]:
    request = GenerationRequest(
        messages=[{"role": "user", "content": prompt}], max_tokens=48, temperature=0
    )
    runner.check(request)
    return [t for c in runner.generate(request, threading.Event()) for t in c.token_ids]


def runner_for(path: Path, batch_size: int) -> TransformersChatRunner:
    spec = PhysicalModel(
        type="llm",
        backend="transformers",
        estimated_vram_gb=0.1,
        parser="plain",
        max_batch_size=batch_size,
    )
    runner = TransformersChatRunner("tiny-qwen3", spec, path)
    runner.load()
    return runner


def test_batched_answers_hold_while_other_work_fills_the_default_stream(tmp_path: Path) -> None:
    import torch

    build_tiny_qwen3(tmp_path)
    alone = runner_for(tmp_path, 1)
    try:
        expected = [greedy(alone, p) for p in PROMPTS]
    finally:
        alone.unload()
    assert len({tuple(tokens) for tokens in expected}) == len(PROMPTS)  # a meaningful reference

    stop = threading.Event()

    def other_model() -> None:
        """Matrix products on the default stream, as another runner's thread queues them."""
        a = torch.randn(4096, 4096, device="cuda")
        while not stop.is_set():
            for _ in range(4):
                a = (a @ a).tanh()
            torch.cuda.synchronize()

    batching = runner_for(tmp_path, 4)
    assert batching.batch_size == 4  # batched, not quietly one at a time
    side = threading.Thread(target=other_model, daemon=True)
    side.start()
    try:
        with ThreadPoolExecutor(len(PROMPTS)) as pool:
            together = list(pool.map(lambda p: greedy(batching, p), PROMPTS))
    finally:
        stop.set()
        side.join(30)
        batching.unload()
    assert together == expected

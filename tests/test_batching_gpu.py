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

from runners.transformers_llm import TransformersChatRunner
from tests.conftest import gpu_only
from tests.test_continuous_batching import PROMPTS, ask, run, spec
from tests.tiny_models import build_tiny_qwen3

pytestmark = gpu_only()


def loaded(path: Path, batch_size: int) -> TransformersChatRunner:
    runner = TransformersChatRunner("tiny-qwen3", spec(max_batch_size=batch_size), path)
    runner.load()
    return runner


def test_batched_answers_hold_while_other_work_fills_the_default_stream(tmp_path: Path) -> None:
    import torch

    build_tiny_qwen3(tmp_path)
    requests = [ask(p, max_tokens=48) for p in PROMPTS]
    alone = loaded(tmp_path, 1)
    try:
        expected = [run(alone, r)[0] for r in requests]
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

    batching = loaded(tmp_path, 4)
    assert batching.batch_size == 4  # batched, not quietly one at a time
    side = threading.Thread(target=other_model, daemon=True)
    side.start()
    try:
        with ThreadPoolExecutor(len(PROMPTS)) as pool:
            together = [t for t, _ in pool.map(run, [batching] * len(requests), requests)]
    finally:
        stop.set()
        side.join(30)
        batching.unload()
    assert together == expected

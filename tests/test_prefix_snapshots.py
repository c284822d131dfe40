"""Prefix reuse on the one-at-a-time transformers path: a chat's next message continues from the
model state kept at a page boundary of the previous prompt, on the tiny Qwen3.5 model (hybrid
linear attention, so no batching and no cropping of its cache)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from llmux.core.config import PhysicalModel
from runners import transformers_llm
from runners.chat import GenerationRequest
from runners.prefix_snapshots import PrefixSnapshots
from runners.transformers_llm import TransformersChatRunner
from tests.test_transformers_chat_runner import png
from tests.tiny_models import build_tiny_qwen35_vl

TOOLS_PROMPT = {"role": "system", "content": " ".join(["get_weather city Berlin"] * 40)}
FIRST = [TOOLS_PROMPT, {"role": "user", "content": "Hello world"}]
SECOND = [
    *FIRST,
    {"role": "assistant", "content": "Hello"},
    {"role": "user", "content": "What colour is this image?"},
]


@pytest.fixture(scope="module")
def qwen35_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Qwen3.5 model with wider weights, so that greedy answers are varied tokens."""
    import torch
    from transformers import AutoModelForImageTextToText

    out = tmp_path_factory.mktemp("tiny-qwen3.5-varied")
    build_tiny_qwen35_vl(out)
    model: Any = AutoModelForImageTextToText.from_pretrained(out)
    torch.manual_seed(3)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() > 1:
                parameter.copy_(torch.randn_like(parameter) * 0.2)
    model.save_pretrained(out)
    return out


def runner_for(weights: Path, prefix_cache_mb: float | None) -> TransformersChatRunner:
    spec = PhysicalModel(
        type="llm",
        backend="transformers",
        estimated_vram_gb=0.1,
        parser="qwen3.5",
        supports_vision=True,
        prefix_cache_mb=prefix_cache_mb,
    )
    runner = TransformersChatRunner("tiny-qwen3.5", spec, weights)
    runner.load()
    return runner


@pytest.fixture
def small_pages(monkeypatch: pytest.MonkeyPatch) -> None:
    """The tiny model knows 512 positions: snapshot prompts from 128 tokens, on 64-token pages."""
    monkeypatch.setattr(transformers_llm, "SNAPSHOT_MIN_TOKENS", 128)
    monkeypatch.setattr(transformers_llm, "SNAPSHOT_PAGE_TOKENS", 64)


@pytest.fixture
def with_snapshots(qwen35_dir: Path, small_pages: None) -> Iterator[TransformersChatRunner]:
    runner = runner_for(qwen35_dir, None)
    yield runner
    runner.unload()


@pytest.fixture
def without(qwen35_dir: Path, small_pages: None) -> Iterator[TransformersChatRunner]:
    runner = runner_for(qwen35_dir, 0)
    yield runner
    runner.unload()


class PrefillCounter:
    """Sums the prompt and answer tokens the model's forward passes take in."""

    def __init__(self, runner: TransformersChatRunner) -> None:
        self.tokens = 0
        model: Any = runner._require().model

        def count(module: Any, args: Any, kwargs: dict[str, Any]) -> None:
            ids = kwargs.get("input_ids")
            self.tokens += 0 if ids is None else int(ids.shape[1])

        self._handle = model.register_forward_pre_hook(count, with_kwargs=True)

    def remove(self) -> None:
        self._handle.remove()


def answer(
    runner: TransformersChatRunner, messages: list[dict[str, Any]], **extra: Any
) -> tuple[list[int], int]:
    request = GenerationRequest(
        messages=messages,
        max_tokens=8,
        temperature=0,
        template_kwargs={"enable_thinking": False},
        **extra,
    )
    chunks = list(runner.generate(request, threading.Event()))
    final = chunks[-1]
    assert final.prompt_tokens is not None
    return [t for c in chunks for t in c.token_ids], final.prompt_tokens


def test_the_next_message_continues_from_the_previous_prompts_state(
    with_snapshots: TransformersChatRunner, without: TransformersChatRunner
) -> None:
    assert answer(with_snapshots, FIRST) == answer(without, FIRST)
    counter = PrefillCounter(with_snapshots)
    try:
        tokens, prompt_tokens = answer(with_snapshots, SECOND)
    finally:
        counter.remove()
    assert (tokens, prompt_tokens) == answer(without, SECOND)
    assert len(set(tokens)) > 1  # a meaningful reference
    first_prompt = answer(without, FIRST)[1]
    kept = (first_prompt - 16) // 64 * 64
    # The second prompt's kept prefix is not prefilled again: only the rest, then one token per
    # decoding step (the last token decoded is never fed back).
    assert counter.tokens == prompt_tokens - kept + len(tokens) - 1


class FirstPositions:
    """The position ids of the first forward pass that is given any (generate's prefill)."""

    def __init__(self, runner: TransformersChatRunner) -> None:
        self.positions: Any = None
        model: Any = runner._require().model

        def note(module: Any, args: Any, kwargs: dict[str, Any]) -> None:
            if self.positions is None and kwargs.get("position_ids") is not None:
                self.positions = kwargs["position_ids"].clone()

        self._handle = model.register_forward_pre_hook(note, with_kwargs=True)

    def remove(self) -> None:
        self._handle.remove()


def test_an_image_request_in_between_does_not_shift_the_continued_prompts_positions(
    with_snapshots: TransformersChatRunner, without: TransformersChatRunner
) -> None:
    """Qwen-VL keeps an image prompt's position offsets on a module, and generate applies them
    to anything continued from a cache: the continued part of a text prompt must get the
    positions it gets when the whole prompt is prefilled."""
    answer(with_snapshots, FIRST)
    image = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "colour?"}]}]
    answer(with_snapshots, image, images=[png(64, 64)])  # offsets its positions by -12
    continued, whole = FirstPositions(with_snapshots), FirstPositions(without)
    try:
        prompt_tokens = answer(with_snapshots, SECOND)[1]
        answer(without, SECOND)
    finally:
        continued.remove()
        whole.remove()
    assert whole.positions.shape[-1] == prompt_tokens
    tail = continued.positions.shape[-1]
    assert 0 < tail < prompt_tokens
    assert continued.positions.tolist() == whole.positions[..., -tail:].tolist()


def test_prefix_cache_mb_0_keeps_no_snapshot(without: TransformersChatRunner) -> None:
    answer(without, FIRST)
    counter = PrefillCounter(without)
    try:
        tokens, prompt_tokens = answer(without, SECOND)
    finally:
        counter.remove()
    assert counter.tokens == prompt_tokens + len(tokens) - 1


class Blob:
    """A picklable stand-in for a cache of a given size."""

    def __init__(self, size: int) -> None:
        self.data = b"x" * size


def test_snapshots_stay_within_their_budget_least_recently_used_out_first() -> None:
    import torch

    snapshots = PrefixSnapshots(30_000, page_tokens=4, min_tokens=8, margin=2)
    assert (snapshots.point(list(range(7))), snapshots.point(list(range(11)))) == (0, 8)
    snapshots.keep([1, 2, 3, 4], Blob(10_000))
    snapshots.keep([5, 6, 7, 8], Blob(10_000))
    assert snapshots.longest([1, 2, 3, 4, 9], torch.device("cpu"))[0] == 4  # now most recent
    snapshots.keep([1, 2, 3, 4, 5, 6, 7, 8], Blob(10_000))
    assert snapshots.bytes <= 30_000
    assert snapshots.longest([5, 6, 7, 8, 9], torch.device("cpu"))[0] == 0  # dropped
    length, kept = snapshots.longest([1, 2, 3, 4, 5, 6, 7, 8, 9], torch.device("cpu"))
    assert length == 8 and isinstance(kept, Blob)
    assert snapshots.longest([1, 2, 3, 4], torch.device("cpu"))[0] == 0  # one token to prefill
    snapshots.keep(list(range(100)), Blob(50_000))  # bigger than the whole budget: not kept
    assert snapshots.longest([*range(100), 1], torch.device("cpu"))[0] == 0

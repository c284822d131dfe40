"""Continuous batching on the transformers runner, and the chat service admitting batched
generations together.

A tiny random text-only Qwen3 model (every layer full attention, so transformers can batch it)
answers greedily with different tokens for different prompts; its one-at-a-time answers are the
reference that batched ones must equal. The forward passes the model runs are counted to prove
that concurrent generations share them.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from llmux.core.admission import GenerationGate
from llmux.core.config import PhysicalModel, Registry
from llmux.services.chat import ChatService
from llmux.wire.chat import ChatCompletionRequest
from llmux_policy.executor import Residency
from runners.batching import BatchingFailed, CacheRoom
from runners.chat import GenerationChunk, GenerationRequest
from runners.transformers_llm import TransformersChatRunner
from tests.tiny_models import build_tiny_qwen3, build_tiny_qwen35_vl

PROMPTS = ["Hello world", "What colour is this image?", "get_weather Berlin", "tools"]
GIB = 1024**3


def spec(**extra: Any) -> PhysicalModel:
    return PhysicalModel(
        type="llm", backend="transformers", estimated_vram_gb=0.1, parser="plain", **extra
    )


def ask(prompt: str, max_tokens: int = 24, **extra: Any) -> GenerationRequest:
    return GenerationRequest(
        messages=[{"role": "user", "content": prompt}],
        max_tokens=max_tokens,
        temperature=extra.pop("temperature", 0),
        **extra,
    )


def run(
    runner: TransformersChatRunner,
    request: GenerationRequest,
    cancel: threading.Event | None = None,
) -> tuple[list[int], GenerationChunk]:
    runner.check(request)
    chunks = list(runner.generate(request, cancel or threading.Event()))
    return [t for c in chunks for t in c.token_ids], chunks[-1]


@pytest.fixture(scope="module")
def qwen3_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tiny-qwen3")
    build_tiny_qwen3(out)
    return out


@pytest.fixture(scope="module")
def batching(qwen3_dir: Path) -> Iterator[TransformersChatRunner]:
    runner = TransformersChatRunner("tiny-qwen3", spec(max_batch_size=4), qwen3_dir)
    runner.load()
    yield runner
    runner.unload()


@pytest.fixture(scope="module")
def one_at_a_time(qwen3_dir: Path) -> Iterator[TransformersChatRunner]:
    runner = TransformersChatRunner("tiny-qwen3", spec(max_batch_size=1), qwen3_dir)
    runner.load()
    yield runner
    runner.unload()


class ForwardCounter:
    """Counts the model's forward passes while installed."""

    def __init__(self, runner: TransformersChatRunner) -> None:
        self.calls = 0
        model: Any = runner._require().model

        def count(*_: Any) -> None:
            self.calls += 1

        self._handle = model.register_forward_pre_hook(count)

    def remove(self) -> None:
        self._handle.remove()


def batch_loop_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("batch-tiny")]


# --- the runner ------------------------------------------------------------------------------


def test_concurrent_generations_give_the_one_at_a_time_greedy_tokens_and_usage(
    batching: TransformersChatRunner, one_at_a_time: TransformersChatRunner
) -> None:
    assert (batching.batch_size, one_at_a_time.batch_size) == (4, 1)
    requests = [ask(p, max_tokens=8 + 4 * i) for i, p in enumerate(PROMPTS)]
    alone = [run(one_at_a_time, r) for r in requests]
    with ThreadPoolExecutor(len(requests)) as pool:
        together = list(pool.map(lambda r: run(batching, r), requests))
    assert [tokens for tokens, _ in together] == [tokens for tokens, _ in alone]
    assert len({tuple(tokens) for tokens, _ in alone}) == len(PROMPTS)  # a meaningful reference
    usage = [(f.finish_reason, f.prompt_tokens, f.completion_tokens) for _, f in together]
    assert usage == [(f.finish_reason, f.prompt_tokens, f.completion_tokens) for _, f in alone]
    assert [u[2] for u in usage] == [8, 12, 16, 20]  # each its own max_tokens: "length"


def spy_on_evictions(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The ids of the running sequences transformers evicts from a full batch cache (to prefill
    them again, or to host memory), as it evicts them."""
    from transformers.generation.continuous_batching.offloading_manager import OffloadingManager
    from transformers.generation.continuous_batching.requests import RequestState

    evicted: list[str] = []
    prefill_again = RequestState.create_equivalent_initial_request
    to_host = OffloadingManager._offload_to_cpu

    def spy_prefill_again(state: Any) -> Any:
        evicted.append(state.request_id)
        return prefill_again(state)

    def spy_to_host(manager: Any, *args: Any) -> Any:
        moved = to_host(manager, *args)
        evicted.extend(moved)
        return moved

    monkeypatch.setattr(RequestState, "create_equivalent_initial_request", spy_prefill_again)
    monkeypatch.setattr(OffloadingManager, "_offload_to_cpu", spy_to_host)
    return evicted


def test_sequences_that_overflow_the_batch_cache_wait_and_still_match(
    qwen3_dir: Path, one_at_a_time: TransformersChatRunner, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cache of two contexts (256 tokens, four pages here) and four sequences of about 116
    tokens (two pages) each: two wait for room, none is evicted mid-answer to be prefilled again
    (on a GPU, with prefix sharing on, such a sequence went on with wrong tokens), and every
    answer is the one-at-a-time one."""
    evicted = spy_on_evictions(monkeypatch)
    runner = TransformersChatRunner(
        "tiny-qwen3", spec(max_batch_size=4, context_length=128), qwen3_dir
    )
    runner.load()
    try:
        requests = [ask(p, max_tokens=100) for p in PROMPTS]
        with ThreadPoolExecutor(len(requests)) as pool:
            together = list(pool.map(lambda r: run(runner, r), requests))
        assert runner.batch_size == 4  # the loop survived
    finally:
        runner.unload()
    assert evicted == []
    assert [t for t, _ in together] == [run(one_at_a_time, r)[0] for r in requests]


def test_a_model_with_sliding_window_layers_keeps_transformers_recompute_and_still_matches(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Pages are not reserved where transformers splits its cache between full and
    sliding-window layers (a whole-model page count would be wrong there): the four sequences
    all start, transformers evicts and prefills some again (no prefix sharing on such a model),
    and every answer is still the one-at-a-time one."""
    build_tiny_qwen3(tmp_path, sliding_window=32)
    requests = [ask(p, max_tokens=100) for p in PROMPTS]
    alone = TransformersChatRunner("tiny-sliding", spec(max_batch_size=1), tmp_path)
    alone.load()
    try:
        expected = [run(alone, r)[0] for r in requests]
    finally:
        alone.unload()
    evicted = spy_on_evictions(monkeypatch)
    runner = TransformersChatRunner(
        "tiny-sliding", spec(max_batch_size=4, context_length=128), tmp_path
    )
    runner.load()
    try:
        assert runner.batch_size == 4 and runner._batcher is not None
        assert runner._batcher._room is None
        with ThreadPoolExecutor(len(requests)) as pool:
            together = list(pool.map(run, [runner] * len(requests), requests))
    finally:
        runner.unload()
    assert evicted, "the cache never filled: the test no longer exercises the recompute"
    assert [t for t, _ in together] == expected


def test_a_batch_cache_of_more_contexts_runs_more_long_answers_together(qwen3_dir: Path) -> None:
    """The four sequences of two pages each: a cache of two 128-token contexts (four pages) runs
    two at a time, one of four contexts runs all four in the same forward passes."""
    requests = [ask(p, max_tokens=100) for p in PROMPTS]
    passes = {}
    for contexts in (2, 4):
        runner = TransformersChatRunner(
            "tiny-qwen3",
            spec(max_batch_size=4, context_length=128, batch_cache_contexts=contexts),
            qwen3_dir,
        )
        runner.load()
        counter = ForwardCounter(runner)
        try:
            with ThreadPoolExecutor(len(requests)) as pool:
                list(pool.map(run, [runner] * len(requests), requests))
        finally:
            counter.remove()
            runner.unload()
        passes[contexts] = counter.calls
    assert passes[4] < 0.75 * passes[2], passes


# --- the cache's room --------------------------------------------------------------------------


def never_failed() -> None:
    return None


def test_cache_room_admits_in_the_order_asked_and_a_small_sequence_does_not_jump_the_queue() -> (
    None
):
    room = CacheRoom(4)
    assert room.take(3, threading.Event(), never_failed)
    order: list[str] = []

    def wait(name: str, pages: int) -> None:
        assert room.take(pages, threading.Event(), never_failed)
        order.append(name)

    big = threading.Thread(target=wait, args=("big", 4))
    big.start()
    time.sleep(0.2)  # "big" asks first and waits for all four pages
    small = threading.Thread(target=wait, args=("small", 1))
    small.start()
    time.sleep(0.2)
    assert order == [], "one page is free, but 'small' asked after 'big'"
    room.give(3)
    big.join(5)
    assert order == ["big"]
    room.give(4)
    small.join(5)
    assert order == ["big", "small"] and room.free() == 3


def test_a_sequence_cancelled_while_it_waits_for_room_takes_nothing() -> None:
    room = CacheRoom(2)
    assert room.take(2, threading.Event(), never_failed)
    cancel = threading.Event()
    threading.Timer(0.2, cancel.set).start()
    assert not room.take(1, cancel, never_failed)
    room.give(2)
    assert room.free() == 2


def test_a_sequence_waiting_for_room_hears_that_the_loop_is_gone() -> None:
    room = CacheRoom(2)
    assert room.take(2, threading.Event(), never_failed)
    with pytest.raises(BatchingFailed, match="out of memory"):
        room.take(1, threading.Event(), lambda: "out of memory")
    assert room.free() == 0


def test_a_sequence_longer_than_the_cache_waits_for_all_of_it() -> None:
    room = CacheRoom(4)
    assert room.take(1, threading.Event(), never_failed)
    taken = threading.Event()

    def take_nine() -> None:
        assert room.take(9, threading.Event(), never_failed)
        taken.set()

    threading.Thread(target=take_nine).start()
    assert not taken.wait(0.3), "it took the cache while a page was still in use"
    room.give(1)
    assert taken.wait(5)
    assert room.free() == 0
    room.give(9)
    assert room.free() == 4


def test_concurrent_generations_share_forward_passes(batching: TransformersChatRunner) -> None:
    """Four streams of 16 tokens read in lockstep: one at a time they would take 64 forward
    passes; batched, each step serves all four."""
    streams = [batching.generate(ask(p, max_tokens=16), threading.Event()) for p in PROMPTS]
    counter = ForwardCounter(batching)
    try:
        finals: list[GenerationChunk] = []
        while len(finals) < len(streams):
            for stream in streams:
                for chunk in stream:
                    if chunk.finish_reason is not None:
                        finals.append(chunk)
                    break
    finally:
        counter.remove()
    assert [f.completion_tokens for f in finals] == [16] * 4
    assert counter.calls < 32


def test_cancelling_one_sequence_leaves_the_others_finishing(
    batching: TransformersChatRunner, one_at_a_time: TransformersChatRunner
) -> None:
    cancel = threading.Event()
    cancelled = batching.generate(ask(PROMPTS[0], max_tokens=200), cancel)
    other = batching.generate(ask(PROMPTS[1], max_tokens=30), threading.Event())
    first = next(cancelled)
    assert first.token_ids
    cancel.set()
    rest = list(cancelled)
    assert rest[-1].finish_reason == "stop"
    assert rest[-1].completion_tokens is not None and rest[-1].completion_tokens < 200
    other_chunks = list(other)
    tokens = [t for c in other_chunks for t in c.token_ids]
    assert tokens == run(one_at_a_time, ask(PROMPTS[1], max_tokens=30))[0]
    assert other_chunks[-1].finish_reason == "length"
    room = batching._batcher._room if batching._batcher is not None else None
    assert room is not None and room.free() == room.pages  # the cancelled one's pages too


def test_sampled_unseeded_requests_batch_and_seeded_ones_run_alone(
    batching: TransformersChatRunner,
) -> None:
    assert batching.batches(ask("hi", temperature=0.8, top_p=0.9))
    assert not batching.batches(ask("hi", temperature=0.8, seed=7))
    assert not batching.batches(ask("hi", json_schema={"type": "object"}))
    draws = []
    for _ in range(5):
        tokens, final = run(batching, ask("hi", max_tokens=12, temperature=1.5))
        # A sampled answer may draw the end-of-turn token, which is yielded but not counted.
        counted = len(tokens) - (final.finish_reason == "stop")
        assert final.completion_tokens == counted <= 12
        draws.append(tuple(tokens))
    assert len(set(draws)) > 1  # sampled, not greedy: five draws at temperature 1.5 differ
    # The seeded path still reproduces, beside a live batch loop.
    seeded = [run(batching, ask("hi", max_tokens=12, temperature=1.5, seed=3))[0] for _ in "ab"]
    assert seeded[0] == seeded[1]


def test_a_prompt_extending_a_finished_one_reuses_its_cache_pages(
    batching: TransformersChatRunner, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The second message of a chat: the same long system prompt (tools), more turns after it.
    Its whole pages of the first prompt are matched in the cache instead of prefilled again."""
    from transformers.generation.continuous_batching.cache import PagedAttentionCache

    matched: list[int] = []
    search = PagedAttentionCache.search_prefix_match

    def spy(self: Any, request_id: str, prompt_ids: list[int]) -> int:
        found: int = search(self, request_id, prompt_ids)
        matched.append(found)
        return found

    monkeypatch.setattr(PagedAttentionCache, "search_prefix_match", spy)
    system = {"role": "system", "content": " ".join(["get_weather city Berlin"] * 40)}
    first = [system, {"role": "user", "content": "Hello world"}]
    _, final = run(batching, GenerationRequest(messages=first, max_tokens=4, temperature=0))
    assert final.prompt_tokens is not None and final.prompt_tokens > 128
    second = [
        *first,
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "What colour is this image?"},
    ]
    run(batching, GenerationRequest(messages=second, max_tokens=4, temperature=0))
    assert matched[-1] >= 128  # at least two 64-token pages not prefilled again


def test_park_and_unload_stop_the_batch_loop(qwen3_dir: Path) -> None:
    before = len(batch_loop_threads())
    runner = TransformersChatRunner("tiny-qwen3", spec(max_batch_size=2), qwen3_dir)
    runner.load()
    assert runner.batch_size == 2 and len(batch_loop_threads()) == before + 1
    runner.park()
    assert runner.batch_size == 1 and len(batch_loop_threads()) == before
    runner.unpark()
    assert runner.batch_size == 2
    assert run(runner, ask(PROMPTS[0], max_tokens=3))[1].completion_tokens == 3
    runner.unload()
    assert runner.batch_size == 1 and len(batch_loop_threads()) == before


def test_a_model_that_cannot_batch_generates_one_at_a_time_and_says_why(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Qwen3.5's linear-attention layers have no paged cache in transformers 5.23; it is also a
    vision model. Either way it is served, one request at a time, with a log line saying why."""
    build_tiny_qwen35_vl(tmp_path)
    runner = TransformersChatRunner("tiny-qwen3.5", spec(supports_vision=True), tmp_path)
    with caplog.at_level(logging.INFO, logger="llmux.runners.transformers"):
        runner.load()
    try:
        assert runner.batch_size == 1
        assert not runner.batches(ask("hi"))
        assert "tiny-qwen3.5: generates one request at a time: it is a vision model" in caplog.text
        assert run(runner, ask("hi", max_tokens=3))[1].completion_tokens == 3
    finally:
        runner.unload()


def test_a_layer_type_transformers_cannot_page_falls_back_with_its_reason(
    qwen3_dir: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    from transformers.generation.continuous_batching import cache

    monkeypatch.setattr(cache, "group_layers_by_attn_type", _refuse_linear_attention)
    runner = TransformersChatRunner("tiny-qwen3", spec(), qwen3_dir)
    with caplog.at_level(logging.INFO, logger="llmux.runners.transformers"):
        runner.load()
    try:
        assert runner.batch_size == 1
        assert "transformers cannot batch it: ValueError: Invalid layer type" in caplog.text
        assert run(runner, ask("hi", max_tokens=3))[1].completion_tokens == 3
    finally:
        runner.unload()


def _refuse_linear_attention(config: Any) -> dict[str, list[int]]:
    raise ValueError("Invalid layer type: linear_attention")  # transformers' own words


def test_a_batch_loop_that_dies_fails_its_sequences_and_the_runner_falls_back(
    qwen3_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    runner = TransformersChatRunner("tiny-qwen3", spec(max_batch_size=2), qwen3_dir)
    runner.load()
    try:
        model: Any = runner._require().model

        def explode(*_: Any) -> None:
            raise RuntimeError("device lost")

        handle = model.register_forward_pre_hook(explode)
        with pytest.raises(RuntimeError, match="device lost"):
            run(runner, ask("hi", max_tokens=3))
        handle.remove()
        assert runner.batch_size == 1
        assert "continuous batching stopped" in caplog.text
        assert run(runner, ask("hi", max_tokens=3))[1].completion_tokens == 3
    finally:
        runner.unload()


def test_check_encodes_the_prompt_that_generate_then_uses(
    batching: TransformersChatRunner, monkeypatch: pytest.MonkeyPatch
) -> None:
    renders: list[GenerationRequest] = []
    render = batching.render_prompt

    def counted(request: GenerationRequest) -> str:
        renders.append(request)
        return render(request)

    monkeypatch.setattr(batching, "render_prompt", counted)
    request = ask("Hello world", max_tokens=2)
    run(batching, request)
    assert renders == [request]
    list(batching.generate(request, threading.Event()))  # not checked again: renders anew
    assert len(renders) == 2


# --- the gate --------------------------------------------------------------------------------


async def test_the_gate_admits_shared_holders_together_and_alone_ones_by_themselves() -> None:
    gate = GenerationGate()
    log: list[str] = []
    release = asyncio.Event()

    async def hold(name: str, alone: bool) -> None:
        async with gate.alone() if alone else gate.shared(2):
            log.append(f"+{name}")
            await release.wait()
            log.append(f"-{name}")

    tasks = [asyncio.create_task(hold(n, a)) for n, a in [("a", False), ("b", False), ("c", False)]]
    tasks += [asyncio.create_task(hold("bench", True)), asyncio.create_task(hold("d", False))]
    await asyncio.sleep(0)
    assert (log, gate.holders) == (["+a", "+b"], 2)  # capacity 2; the rest wait in order
    release.set()
    await asyncio.gather(*tasks)
    # c before the bench (it came first); d after the bench, which ran alone.
    assert log.index("+c") < log.index("+bench")
    assert log.index("-a") < log.index("+bench") and log.index("-c") < log.index("+bench")
    assert log.index("-bench") < log.index("+d")


async def test_a_waiter_cancelled_in_the_queue_does_not_block_those_behind_it() -> None:
    gate = GenerationGate()
    held = asyncio.Event()
    release = asyncio.Event()

    async def hold_shared() -> None:
        async with gate.shared(1):
            held.set()
            await release.wait()

    alone: list[asyncio.Task[None] | None] = []

    async def hold_alone() -> None:
        async with gate.alone():
            alone.append(asyncio.current_task())

    first = asyncio.create_task(hold_shared())
    await held.wait()
    waiting_alone = asyncio.create_task(hold_alone())
    behind = asyncio.create_task(hold_alone())
    await asyncio.sleep(0)
    waiting_alone.cancel()
    release.set()
    await asyncio.wait_for(behind, 5)
    await first
    assert waiting_alone.cancelled() and gate.holders == 0
    assert alone == [behind]  # the one behind held the gate alone; the cancelled one never did


# --- the chat service ------------------------------------------------------------------------


class World:
    def __init__(self, weights: Path) -> None:
        self.registry = Registry.model_validate(
            {
                "physical_models": {
                    "tiny": {
                        "type": "llm",
                        "backend": "transformers",
                        "path": str(weights),
                        "estimated_vram_gb": 0.1,
                        "parser": "plain",
                        "max_batch_size": 4,
                    }
                },
                "virtual_models": {"Tiny": {"physical": "tiny"}},
            }
        )
        self.runner = ActiveCountingRunner("tiny", self.registry.physical_models["tiny"], weights)
        self.residency = Residency(self.registry, lambda _: self.runner, 8 * GIB)
        self.chat = ChatService(self.registry, self.residency)


class ActiveCountingRunner(TransformersChatRunner):
    """The real runner, noting how many generations run at once."""

    active = 0
    most = 0
    active_at_unload: list[int] = []  # noqa: RUF012  (class-wide, like the counts)

    def unload(self) -> None:
        type(self).active_at_unload.append(type(self).active)
        super().unload()

    def generate(
        self, request: GenerationRequest, cancel: threading.Event
    ) -> Iterator[GenerationChunk]:
        type(self).active += 1
        type(self).most = max(type(self).most, type(self).active)
        try:
            yield from super().generate(request, cancel)
        finally:
            type(self).active -= 1


@pytest.fixture
async def world(qwen3_dir: Path) -> Any:
    w = World(qwen3_dir)
    ActiveCountingRunner.active = ActiveCountingRunner.most = 0
    ActiveCountingRunner.active_at_unload = []
    yield w
    await w.residency.close()


def body(prompt: str, **extra: Any) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate(
        {
            "model": "Tiny",
            "messages": [{"role": "user", "content": prompt}],
            "temperature": 0,
            **extra,
        }
    )


async def answer(w: World, request: ChatCompletionRequest) -> Any:
    session = await w.chat.start(request)
    try:
        return await session.complete()
    finally:
        await session.close()


async def test_chat_sessions_on_a_batching_model_generate_together(world: World) -> None:
    alone = [await answer(world, body(p, max_tokens=40)) for p in PROMPTS[:3]]
    assert ActiveCountingRunner.most == 1
    together = await asyncio.gather(*(answer(world, body(p, max_tokens=40)) for p in PROMPTS[:3]))
    assert ActiveCountingRunner.most == 3
    assert [c.choices[0].message.content for c in together] == [
        c.choices[0].message.content for c in alone
    ]
    assert [c.usage for c in together] == [c.usage for c in alone]
    assert world.residency.snapshot()["models"][0]["in_flight"] == 0


async def test_seeded_requests_wait_for_the_batch_and_run_alone(world: World) -> None:
    await asyncio.gather(
        answer(world, body(PROMPTS[0], max_tokens=30)),
        answer(world, body(PROMPTS[1], max_tokens=30, seed=1, temperature=1)),
        answer(world, body(PROMPTS[2], max_tokens=30, seed=2, temperature=1)),
    )
    assert ActiveCountingRunner.most == 1


async def test_a_stop_sequence_ends_one_batched_answer_and_not_the_others(world: World) -> None:
    full = await answer(world, body(PROMPTS[1], max_tokens=40))
    text = full.choices[0].message.content
    stop = text[10:14]
    cut, other = await asyncio.gather(
        answer(world, body(PROMPTS[1], max_tokens=40, stop=[stop])),
        answer(world, body(PROMPTS[2], max_tokens=40)),
    )
    assert cut.choices[0].message.content == text[: text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    assert cut.usage.completion_tokens < full.usage.completion_tokens
    assert other.choices[0].finish_reason == "length" and other.usage.completion_tokens == 40


async def test_the_admin_bench_gets_the_model_alone(world: World) -> None:
    """The benchmark's hold (`gate(...).alone()`) waits for batched generations in progress and
    keeps new ones out until it is done."""
    gate = world.chat.gate("tiny")
    running = asyncio.gather(*(answer(world, body(p, max_tokens=60)) for p in PROMPTS[:2]))
    while gate.holders < 2:
        await asyncio.sleep(0.01)
    async with gate.alone():
        assert ActiveCountingRunner.active == 0
        late = asyncio.create_task(answer(world, body(PROMPTS[3], max_tokens=5)))
        await asyncio.sleep(0.2)
        assert not late.done() and ActiveCountingRunner.active == 0
    await running
    await late


async def test_a_side_request_is_answered_while_a_long_stream_runs(world: World) -> None:
    """Open WebUI's pattern: the chat's stream is being generated when its title request comes;
    the title is answered without waiting for the stream to end."""
    stream_body = body(PROMPTS[0], max_tokens=400, stream=True)
    main = await world.chat.start(stream_body)
    try:
        pieces = main.stream()
        await anext(pieces)  # the role chunk, sent before generation
        await anext(pieces)  # a generated token (or more): the stream is generating
        title = await answer(world, body(PROMPTS[1], max_tokens=5))
        assert title.usage.completion_tokens == 5
        assert main._generation is not None and not main._generation.done()
    finally:
        await main.close()


def test_a_process_that_never_unloads_a_batching_model_still_exits(qwen3_dir: Path) -> None:
    import subprocess
    import sys

    script = (
        "from pathlib import Path\n"
        "from llmux.core.config import PhysicalModel\n"
        "from runners.transformers_llm import TransformersChatRunner\n"
        "spec = PhysicalModel(type='llm', backend='transformers', estimated_vram_gb=0.1)\n"
        f"runner = TransformersChatRunner('tiny', spec, Path({str(qwen3_dir)!r}))\n"
        "runner.load()\n"
        "assert runner.batch_size == 8\n"
    )
    done = subprocess.run([sys.executable, "-c", script], timeout=120, capture_output=True)
    assert done.returncode == 0, done.stderr.decode()[-2000:]


async def test_an_unload_waits_for_every_sequence_of_the_batch(world: World) -> None:
    """Each batched session holds the model: the operator's unload waits for all of them."""
    gate = world.chat.gate("tiny")
    answers = [asyncio.create_task(answer(world, body(p, max_tokens=120))) for p in PROMPTS[:3]]
    while gate.holders < 3:
        await asyncio.sleep(0.01)
    assert await world.residency.unload("tiny", wait_s=120)
    assert ActiveCountingRunner.active_at_unload == [0]
    assert all(task.done() for task in answers)
    assert [t.result().usage.completion_tokens for t in answers] == [120] * 3

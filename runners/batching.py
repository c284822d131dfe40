"""Continuous batching for transformers chat models: many sequences, one forward pass per step.

transformers 5.23's `ContinuousBatchingManager` keeps a paged KV cache and one loop thread that,
at every step, runs the forward pass for every admitted sequence together (prefill chunks and
decode tokens side by side) and hands each sequence its new token. `ContinuousBatcher` wraps one
manager for one loaded model:

- Each sequence's tokens reach the thread that asked for them through a queue of its own (the
  manager's shared output queue would hand one consumer another's tokens).
- Sampling is per sequence and exact: the manager decodes greedily, and a logits processor of
  ours applies each sampled sequence's own `runners.sampling` sampler to its row (the manager's
  own sampling draws from one generator for the whole batch). Seeded requests are not sent here
  (see `TransformersChatRunner.batches`): a batch's numerics depend on who else is in it, so a
  seed would not reproduce its tokens.
- Prefix sharing: a complete cache page (`PAGE_TOKENS`) that an earlier or concurrent sequence
  computed for the same tokens is reused, not recomputed, while the cache has room to keep it.
  That is what spares the second message of a tool-heavy chat the prefill of its tool block.
- The cache is sized here (`cache_tokens`), never from "free memory": the manager's default
  takes most of what the device has free, which belongs to the other resident models. On a
  model whose layers are all full attention, a sequence waits for room in it before it starts
  (`CacheRoom`): the manager's own answer to a full cache, evicting a running sequence to
  prefill it again, gave wrong tokens on a GPU with prefix sharing on.

Threading: `generate` blocks on the caller's thread, waiting on its queue; the compute happens
on the manager's loop thread. `close` stops that thread (a sequence still running gets an error)
and drops the cache.
"""

from __future__ import annotations

import atexit
import itertools
import logging
import queue
import threading
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, cast

if TYPE_CHECKING:
    import torch
    from transformers import LogitsProcessor, PreTrainedModel

log = logging.getLogger("llmux.runners.batching")

# Tokens per cache page: the unit of prefix reuse (only whole pages are shared).
PAGE_TOKENS = 64
# The most prompt tokens one step prefills (a longer prompt is prefilled over several steps,
# while the other sequences keep decoding).
MAX_STEP_TOKENS = 1024
# How often a waiting consumer looks at its cancel event.
CANCEL_POLL_S = 0.05


class BatchingFailed(RuntimeError):
    """The batch loop refused or lost a sequence (its message says why)."""


class ContinuousBatcher:
    """Continuous batching over one loaded model. Construction allocates the cache and starts the
    loop thread; it raises whatever transformers raises for a model it cannot batch (a layer
    type without a paged cache, such as Qwen3.5's linear attention)."""

    def __init__(
        self,
        model: PreTrainedModel,
        *,
        stop_token_ids: Sequence[int],
        batch_size: int,
        cache_tokens: int,
        share_prefixes: bool,
        thread_name: str = "batch-loop",
    ) -> None:
        import torch
        from transformers import GenerationConfig, LogitsProcessorList
        from transformers.generation.configuration_utils import ContinuousBatchingConfig
        from transformers.generation.continuous_batching.cache_allocators import (
            FullAttentionCacheAllocator,
        )
        from transformers.generation.continuous_batching.cb_logits_processors import (
            ContinuousBatchingLogitsProcessorList,
        )
        from transformers.generation.continuous_batching.utils import stream_context

        self.batch_size = batch_size
        self._stop_token_ids = list(stop_token_ids)
        self._sampling = _per_sequence_sampling()
        self._router = _per_sequence_router()
        self._ids = itertools.count()
        config = ContinuousBatchingConfig(
            page_size=PAGE_TOKENS,
            num_blocks=-(-cache_tokens // PAGE_TOKENS),
            max_batch_tokens=MAX_STEP_TOKENS,
            max_requests_per_batch=batch_size,
            allow_block_sharing=share_prefixes,
            # Keep the model's attention implementation: a switch (to flash, or eager to
            # paged|eager) would change what the one-at-a-time path runs between batches.
            auto_switch_to_flash=False,
            use_async_batching=False,
            use_cuda_graph=False,
        )
        with torch.no_grad():
            manager: Any = cast(Any, model).init_continuous_batching(
                generation_config=GenerationConfig(
                    do_sample=False, eos_token_id=self._stop_token_ids
                ),
                continuous_batching_config=config,
            )
        # Before the batch processor exists (warmup makes it): it takes both at creation.
        processors = ContinuousBatchingLogitsProcessorList(LogitsProcessorList([self._sampling]))
        processors.tensors_required = 1  # one int32 per row: the sequence's sampler key
        manager.logit_processor = processors
        manager.output_router = self._router
        manager.warmup()  # allocates the cache now (no graphs to capture without CUDA graphs)
        # Pages are reserved where they can be counted exactly: a cache of full-attention layers
        # only, one allocator whose blocks are whole-model pages (and the only kind that shares
        # prefixes, where the recompute went wrong). With sliding-window layers, transformers
        # splits its sectors between two allocators; there it keeps its own recompute, which
        # gave the one-at-a-time tokens without prefix sharing.
        cache = manager.batch_processor.cache
        self._room: CacheRoom | None = (
            CacheRoom(int(cache.num_blocks))
            if set(cache.cache_allocators) == {FullAttentionCacheAllocator.layer_type}
            else None
        )
        # The loop writes each step's inputs on its thread's current stream and runs the forward
        # pass on the manager's compute stream, and in sync mode nothing orders the two. With
        # any other work queued on the default stream (another model, a park or an unpark), the
        # forward pass read stale inputs: on an H200, every batched answer parted from its
        # one-at-a-time tokens within a few steps. On the compute stream, both are in order.
        compute_stream = manager.batch_processor.inputs_and_outputs.compute_stream
        loop = manager._run_generation_loop

        def run_loop() -> None:
            with stream_context(compute_stream):
                loop()

        # manager.start(), but on a daemon thread: the manager's own is not one, and a process
        # that exits without unloading the model would wait for it forever. The loop is still
        # stopped at exit, before the interpreter finalizes: killed inside torch, it aborts.
        manager.background_thread_status.clear()
        manager._generation_thread = threading.Thread(
            target=run_loop, name=thread_name, daemon=True
        )
        manager._generation_thread.start()
        self._manager = manager
        this = weakref.ref(self)

        def stop_at_exit() -> None:
            batcher = this()
            if batcher is not None:
                batcher.close()

        self._stop_at_exit = stop_at_exit
        atexit.register(stop_at_exit)

    def cache_bytes(self) -> int:
        """Bytes of the paged cache (on the model's device)."""
        processor = self._manager.batch_processor
        return 0 if processor is None else int(processor.cache.cache_tensor.nbytes)

    def failure(self) -> str | None:
        """Why the loop thread is stopping or gone, or None while it serves. (After a fatal error
        the loop asks itself to stop before it fails its sequences, so this is already set when
        a failed sequence's consumer looks.)"""
        status = self._manager.background_thread_status
        error = status.fatal_error
        if error is not None:
            return f"{type(error).__name__}: {error}"
        refusal = status.can_accept_new_requests()
        if refusal is not None:
            return str(refusal)
        if not self._manager.is_running():
            return "the batch loop has stopped"
        return None

    def generate(
        self,
        input_ids: list[int],
        max_new_tokens: int,
        sampler: LogitsProcessor | None,
        cancel: threading.Event,
    ) -> Iterator[int]:
        """Each new token id of one sequence as the loop makes it (the last may be a stop token).
        On a model whose layers are all full attention, waits first for the cache pages its
        prompt and answer can fill (`CacheRoom`). Ends within one step once `cancel` is set,
        and frees the sequence's cache slot and pages.
        Raises `BatchingFailed` if the loop refuses or fails the sequence."""
        room = self._room
        pages = -(-(len(input_ids) + max_new_tokens) // PAGE_TOKENS)
        if room is not None and not room.take(pages, cancel, self.failure):
            return  # cancelled while it waited for room: nothing was sent to the loop
        request_id = f"llmux-{next(self._ids)}"
        key = int(request_id.rsplit("-", 1)[1])
        outputs: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._router.queues[request_id] = outputs
        if sampler is not None:
            self._sampling.samplers[key] = sampler
        finished = False
        try:
            added = self._manager.add_request(
                input_ids,
                request_id=request_id,
                max_new_tokens=max_new_tokens,
                streaming=True,
                eos_token_id=self._stop_token_ids,
                llmux_sequence=key,
            )
            if added is None:
                raise BatchingFailed(f"the batch loop took no new sequence ({self.failure()})")
            sent = 0
            while not cancel.is_set():
                try:
                    output = outputs.get(timeout=CANCEL_POLL_S)
                except queue.Empty:
                    if self.failure() is not None:
                        raise BatchingFailed(f"the batch loop stopped: {self.failure()}") from None
                    continue
                if output.error is not None:
                    finished = True
                    raise BatchingFailed(output.error)
                tokens = output.generated_tokens
                yield from tokens[sent:]
                sent = len(tokens)
                if output.is_finished():
                    finished = True
                    return
        finally:
            if not finished:
                self._manager.cancel_request(request_id)
            self._router.queues.pop(request_id, None)
            self._sampling.samplers.pop(key, None)
            if room is not None:
                room.give(pages)

    def close(self) -> None:
        """Stop the loop thread and drop the cache. Idempotent."""
        atexit.unregister(self._stop_at_exit)
        manager = self._manager
        if manager.is_running():
            manager.stop(block=True, timeout=30, hard_stop=True)  # any sequence left fails
        manager.batch_processor = None


class CacheRoom:
    """The batch cache's pages, handed out whole: a sequence enters the loop only once the pages
    its prompt and answer can fill are free, in the order the sequences asked, so the manager
    never runs out of pages mid-answer. Out of pages, transformers 5.23 evicts a running sequence
    and prefills it again later; with prefix sharing on, such a sequence went on with wrong tokens
    on an H200 (the token it chose was 3.5 logits below the one-at-a-time argmax)."""

    def __init__(self, pages: int) -> None:
        self.pages = pages
        self._free = pages
        self._waiting: list[object] = []
        self._changed = threading.Condition()

    def take(self, pages: int, cancel: threading.Event, failure: Callable[[], str | None]) -> bool:
        """Block until `pages` (at most the whole cache) are free and every earlier caller has
        had its own, then take them; False, taking nothing, once `cancel` is set. Raises
        `BatchingFailed` if `failure()` says the loop is gone."""
        pages = min(pages, self.pages)
        turn = object()
        with self._changed:
            self._waiting.append(turn)
            try:
                while self._waiting[0] is not turn or self._free < pages:
                    if cancel.is_set():
                        return False
                    reason = failure()
                    if reason is not None:
                        raise BatchingFailed(f"the batch loop stopped: {reason}")
                    self._changed.wait(CANCEL_POLL_S)
                self._free -= pages
                return True
            finally:
                self._waiting.remove(turn)
                self._changed.notify_all()

    def give(self, pages: int) -> None:
        with self._changed:
            self._free += min(pages, self.pages)
            self._changed.notify_all()

    def free(self) -> int:
        with self._changed:
            return self._free


def _per_sequence_router() -> Any:
    """An OutputRouter that puts each sequence's outputs on that sequence's own queue; outputs of
    a sequence nobody waits for any more (cancelled) are dropped."""
    from transformers.generation.continuous_batching.continuous_api import OutputRouter

    class PerSequenceRouter(OutputRouter):
        def __init__(self) -> None:
            super().__init__()
            self.queues: dict[str, queue.SimpleQueue[Any]] = {}

        def deliver(self, output: Any) -> None:
            outputs = self.queues.get(output.request_id)
            if outputs is not None:
                outputs.put(output)

        def deliver_batch(self, outputs: list[Any]) -> None:
            for output in outputs:
                self.deliver(output)

    return PerSequenceRouter()


def _per_sequence_sampling() -> Any:
    """A continuous-batching logits processor that runs, on each row of a step's logits, the
    sampler of the sequence that row belongs to (rows of greedy sequences are left alone). Each
    row carries its sequence's key as the processor's per-request argument."""
    import torch
    from transformers.generation.continuous_batching.cb_logits_processors import (
        ContinuousBatchingLogitsProcessor,
    )

    class PerSequenceSampling(ContinuousBatchingLogitsProcessor):
        supported_kwargs: dict[str, type] = {"llmux_sequence": int}  # noqa: RUF012
        ignored_kwargs: tuple[str, ...] = ()

        def __init__(self) -> None:
            self.samplers: dict[int, Any] = {}

        def fill_defaults(self, int32_tensor: torch.Tensor) -> None:
            int32_tensor.fill_(-1)

        def prepare_tensor_args(self, requests_with_new_token: list[Any]) -> torch.Tensor:
            keys = [
                r.state.logit_processor_kwargs.get("llmux_sequence", -1)
                for r in requests_with_new_token
            ]
            return torch.tensor(keys, dtype=torch.int32, device="cpu")

        def __call__(self, scores: torch.Tensor, tensor_arg: torch.Tensor) -> torch.Tensor:
            keys = tensor_arg[: scores.size(0)].tolist()
            for row, key in enumerate(keys):
                sampler = self.samplers.get(key)
                if sampler is not None:
                    scores[row : row + 1] = sampler(None, scores[row : row + 1])
            return scores

    return PerSequenceSampling()

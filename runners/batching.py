"""Continuous batching for transformers chat models: many sequences, one forward pass per step.

transformers 5.23's `ContinuousBatchingManager` keeps a paged KV cache and one loop thread that,
at every step, runs the forward pass for every admitted sequence together (prefill chunks and
decode tokens side by side) and hands each sequence its new token. `ContinuousBatcher` wraps one
manager for one loaded model:

- Each sequence's new tokens are handed to a callback of its own, on the loop thread, as the
  step that made them ends (the manager's shared output queue would hand one consumer another's
  tokens, and a thread waiting on a queue per sequence is one more hand-over per token).
- Sampling is per sequence and exact: the manager decodes greedily, and a logits processor of
  ours applies each sampled sequence's own `runners.sampling` sampler to its row (the manager's
  own sampling draws from one generator for the whole batch). Seeded requests are not sent here
  (see `TransformersChatRunner.batches`): a batch's numerics depend on who else is in it, so a
  seed would not reproduce its tokens.
- Prefix sharing: a complete cache page (`PAGE_TOKENS`) that an earlier or concurrent sequence
  computed for the same tokens is reused, not recomputed, while the cache has room to keep it.
  That is what spares the second message of a tool-heavy chat the prefill of its tool block.
- The cache is sized here (`cache_tokens`), never from "free memory": the manager's default
  takes most of what the device has free, which belongs to the other resident models.

Threading: `start` returns at once; the compute, and the calls of each sequence's callback,
happen on the manager's loop thread. One watcher thread, awake only while sequences run, ends a
sequence whose `cancel` is set and fails every sequence once the loop stops. `close` stops both
threads (a sequence still running gets an error) and drops the cache.
"""

from __future__ import annotations

import atexit
import itertools
import logging
import threading
import weakref
from collections.abc import Callable, Sequence
from concurrent.futures import Future
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
# How often the watcher looks at the running sequences' cancel events and at the loop's health.
CANCEL_POLL_S = 0.05


class BatchingFailed(RuntimeError):
    """The batch loop refused or lost a sequence (its message says why)."""


class _Sequence:
    """One admitted sequence: where its tokens go, and its end, which comes once (`ended`)."""

    def __init__(
        self,
        request_id: str,
        key: int,
        on_tokens: Callable[[list[int]], None],
        cancel: threading.Event,
    ) -> None:
        self.request_id = request_id
        self.key = key
        self.on_tokens = on_tokens
        self.cancel = cancel
        self.sent = 0  # tokens handed to on_tokens so far
        self.error: str | None = None  # the loop's error for it, ended by the watcher
        self.ended: Future[None] = Future()
        # Held while tokens are handed over and while the sequence ends, so that no token is
        # handed over after its end (the end's callbacks send the generation's last chunk).
        self.lock = threading.Lock()


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
        from transformers.generation.continuous_batching.cb_logits_processors import (
            ContinuousBatchingLogitsProcessorList,
        )

        self.batch_size = batch_size
        self._stop_token_ids = list(stop_token_ids)
        self._sampling = _per_sequence_sampling()
        self._sequences: dict[str, _Sequence] = {}
        self._router = _per_sequence_router(self._deliver)
        self._ids = itertools.count()
        self._watching = threading.Condition()  # notified when a sequence starts, or at close
        self._closed = False
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
        # manager.start(), but on a daemon thread: the manager's own is not one, and a process
        # that exits without unloading the model would wait for it forever. The loop is still
        # stopped at exit, before the interpreter finalizes: killed inside torch, it aborts.
        manager.background_thread_status.clear()
        manager._generation_thread = threading.Thread(
            target=manager._run_generation_loop, name=thread_name, daemon=True
        )
        manager._generation_thread.start()
        self._manager = manager
        self._watcher = threading.Thread(
            target=self._watch, name=f"watch-{thread_name}", daemon=True
        )
        self._watcher.start()
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

    def start(
        self,
        input_ids: list[int],
        max_new_tokens: int,
        sampler: LogitsProcessor | None,
        cancel: threading.Event,
        on_tokens: Callable[[list[int]], None],
    ) -> Future[None]:
        """Admit one sequence. `on_tokens` gets each step's new token ids on the loop thread, as
        the step ends (the last may be a stop token); it must not block, and if it raises, the
        sequence is cancelled and ends with that error. The returned Future ends (its callbacks
        run before anything else is handed over) when the sequence finishes, within one
        `CANCEL_POLL_S` of `cancel` being set (the sequence's cache slot is freed), or with
        `BatchingFailed` if the loop refuses or fails it. Raises `BatchingFailed` at once if the
        loop takes no new sequence."""
        request_id = f"llmux-{next(self._ids)}"
        key = int(request_id.rsplit("-", 1)[1])
        sequence = _Sequence(request_id, key, on_tokens, cancel)
        # Known before the loop can make its first token.
        self._sequences[request_id] = sequence
        if sampler is not None:
            self._sampling.samplers[key] = sampler
        try:
            added = self._manager.add_request(
                input_ids,
                request_id=request_id,
                max_new_tokens=max_new_tokens,
                streaming=True,
                eos_token_id=self._stop_token_ids,
                llmux_sequence=key,
            )
        except BaseException:
            self._forget(sequence)
            raise
        if added is None:
            self._forget(sequence)
            raise BatchingFailed(f"the batch loop took no new sequence ({self.failure()})")
        with self._watching:
            self._watching.notify()
        return sequence.ended

    def _deliver(self, output: Any) -> None:
        """The router's hand-over of one sequence's output, on the loop thread."""
        sequence = self._sequences.get(output.request_id)
        if sequence is None:  # ended (cancelled) while the step ran
            return
        if output.error is not None:
            # Ended by the watcher: a sequence's end may close the batcher (the runner drops a
            # failed one), which cannot happen on the loop thread it joins.
            sequence.error = str(output.error)
            with self._watching:
                self._watching.notify()
            return
        with sequence.lock:
            if sequence.ended.done():
                return
            tokens = output.generated_tokens
            new, sequence.sent = tokens[sequence.sent :], len(tokens)
            try:
                if new:
                    sequence.on_tokens(new)
            except BaseException as exc:  # the reader's side failed: stop computing for it
                self._manager.cancel_request(sequence.request_id)
                self._end(sequence, exc)
                return
            if output.is_finished():
                self._end(sequence, None)

    def _watch(self) -> None:
        """The watcher thread: while sequences run, every `CANCEL_POLL_S`, end those cancelled or
        failed, and all of them once the loop stops."""
        while True:
            with self._watching:
                while not self._sequences and not self._closed:
                    self._watching.wait()
                if self._closed:
                    return
                self._watching.wait(CANCEL_POLL_S)
            failure = self.failure()
            for sequence in list(self._sequences.values()):
                if failure is not None:
                    self._fail(sequence, f"the batch loop stopped: {failure}")
                elif sequence.error is not None:
                    self._fail(sequence, sequence.error)
                elif sequence.cancel.is_set():
                    with sequence.lock:
                        if not sequence.ended.done():
                            self._manager.cancel_request(sequence.request_id)
                            self._end(sequence, None)

    def _fail(self, sequence: _Sequence, reason: str) -> None:
        with sequence.lock:
            self._end(sequence, BatchingFailed(reason))

    def _end(self, sequence: _Sequence, error: BaseException | None) -> None:
        """End a sequence (under its lock), once: its Future's callbacks run here."""
        if sequence.ended.done():
            return
        self._forget(sequence)
        if error is None:
            sequence.ended.set_result(None)
        else:
            sequence.ended.set_exception(error)

    def _forget(self, sequence: _Sequence) -> None:
        self._sequences.pop(sequence.request_id, None)
        self._sampling.samplers.pop(sequence.key, None)

    def close(self) -> None:
        """Stop the loop thread and drop the cache. Idempotent."""
        atexit.unregister(self._stop_at_exit)
        manager = self._manager
        if manager.is_running():
            manager.stop(block=True, timeout=30, hard_stop=True)  # any sequence left fails
        manager.batch_processor = None
        with self._watching:
            self._closed = True
            self._watching.notify()
        for sequence in list(self._sequences.values()):
            self._fail(sequence, "the batch loop has stopped")
        if threading.current_thread() is not self._watcher:  # a failed sequence's end closes
            self._watcher.join()


def _per_sequence_router(deliver: Callable[[Any], None]) -> Any:
    """An OutputRouter that hands every output to `deliver` (on the loop thread)."""
    from transformers.generation.continuous_batching.continuous_api import OutputRouter

    class PerSequenceRouter(OutputRouter):
        def deliver(self, output: Any) -> None:
            deliver(output)

        def deliver_batch(self, outputs: list[Any]) -> None:
            for output in outputs:
                deliver(output)

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

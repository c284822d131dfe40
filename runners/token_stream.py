"""Tokens out of `model.generate` one at a time, and text out of tokens without broken characters.

Threading contract of `stream_tokens`: `model.generate` blocks until the whole answer is made, so
it runs on one inner thread per generation while the caller's thread (a worker thread; the one
that iterates the generator) receives the tokens through a queue and yields them. The inner
thread is started by the first `next()` and is always joined before the generator finishes,
however it finishes: exhausted, raising, or closed early (`close()`, garbage collection, the
consumer leaving a `for` loop). Closing sets a stop flag that generate's stopping criteria reads
after each token, so the join waits for at most the forward pass in flight. An exception raised
by `model.generate` is re-raised in the caller's thread. `cancel` is read at the same point, so
once it is set generation ends within one token.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Generator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

_END = object()


@dataclass(frozen=True)
class _Failure:
    error: BaseException


def stream_tokens(
    model: PreTrainedModel,
    inputs: dict[str, Any],
    generate_kwargs: dict[str, Any],
    cancel: threading.Event,
    *,
    thread_name: str = "generate",
) -> Generator[int, None, None]:
    """Run `model.generate(**inputs, **generate_kwargs)` for one sequence and yield each new
    token id as soon as it exists (the prompt is not yielded). See the module docstring for the
    threading contract. `generate_kwargs` must not hold `streamer` or `stopping_criteria`."""
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList
    from transformers.generation.streamers import BaseStreamer

    stop = threading.Event()
    tokens: queue.SimpleQueue[object] = queue.SimpleQueue()

    class QueueStreamer(BaseStreamer):
        """generate calls `put` with the prompt first, then with each step's new token."""

        def __init__(self) -> None:
            self.prompt_seen = False

        def put(self, value: torch.Tensor) -> None:
            if not self.prompt_seen:
                self.prompt_seen = True
                return
            for token in value.reshape(-1).tolist():
                tokens.put(int(token))

        def end(self) -> None:
            pass

    class StopWhenAsked(StoppingCriteria):
        def __call__(
            self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any
        ) -> torch.Tensor:
            done = stop.is_set() or cancel.is_set()
            return torch.full(
                (input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device
            )

    def run() -> None:
        try:
            cast(Any, model).generate(
                **inputs,
                **generate_kwargs,
                streamer=QueueStreamer(),
                stopping_criteria=StoppingCriteriaList([StopWhenAsked()]),
            )
        except BaseException as error:
            tokens.put(_Failure(error))
        finally:
            tokens.put(_END)

    worker = threading.Thread(target=run, name=thread_name, daemon=True)
    worker.start()
    try:
        while True:
            item = tokens.get()
            if item is _END:
                return
            if isinstance(item, _Failure):
                raise item.error
            assert isinstance(item, int)
            yield item
    finally:
        stop.set()
        worker.join()


class IncrementalDetokenizer:
    """Text for token ids pushed one batch at a time, equal in the end to decoding them all at
    once, and never ending inside a multi-byte character: while the decoded tail is an incomplete
    UTF-8 sequence (U+FFFD) the text is held back until the next tokens complete it.

    It decodes a short window (the last emitted token(s) as context plus the new ones), the method
    of vLLM and text-generation-inference, so the cost per token does not grow with the answer and
    tokenizers that change a token's leading space by context (SentencePiece) come out right.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, *, skip_special_tokens: bool) -> None:
        self._tokenizer = tokenizer
        self._skip_special = skip_special_tokens
        self._ids: list[int] = []
        self._prefix_offset = 0  # start of the context window
        self._read_offset = 0  # tokens before this have been emitted as text

    def push(self, token_ids: Sequence[int]) -> str:
        """The new text these tokens complete ('' while it is held back)."""
        self._ids.extend(token_ids)
        context = self._decode(self._ids[self._prefix_offset : self._read_offset])
        text = self._decode(self._ids[self._prefix_offset :])
        if len(text) > len(context) and not text.endswith("\ufffd"):
            self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
            return text[len(context) :]
        return ""

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character becomes U+FFFD)."""
        context = self._decode(self._ids[self._prefix_offset : self._read_offset])
        text = self._decode(self._ids[self._prefix_offset :])
        self._prefix_offset = self._read_offset = len(self._ids)
        return text[len(context) :]

    def _decode(self, ids: list[int]) -> str:
        if not ids:
            return ""
        text = self._tokenizer.decode(
            ids, skip_special_tokens=self._skip_special, clean_up_tokenization_spaces=False
        )
        assert isinstance(text, str)  # one sequence of ids decodes to one string
        return text

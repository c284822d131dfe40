"""What a llama.cpp generation starts from: the prompt its context already holds, or a saved state
of an earlier long prompt (issue #16).

llama-cpp-python's `Llama` holds one sequence and, left to itself, reuses only the longest common
prefix with the last prompt it evaluated. Open WebUI sends a title request (no tools) after each
answer, which replaces a chat's tool block in that sequence, so the chat's next message prefilled
thousands of tokens again. `PromptStates` keeps the sequence states of recent long prompts in host
memory (an LRU within a byte budget) and, before each generation, starts from whichever holds the
longest usable prefix of the new prompt: the live context or a saved state.

"Usable" depends on the model's memory. An attention-only model's KV cache can be cut to any
shorter prefix. A recurrent or hybrid model (Mamba, RWKV, Qwen3.5's linear-attention layers)
folds its whole history into a state that cannot be cut, so a state is usable only when all the
tokens it holds are a prefix of the new prompt. Either way one prompt token is always left to
evaluate, so sampling starts from fresh logits (a saved state carries none).

Contract: not thread-safe; the runner calls it from its one generating thread at a time, like the
`Llama` it wraps.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from llama_cpp import Llama

log = logging.getLogger("llmux.runners.prompt_states")

# Prompts shorter than this are not saved. A saved state pays off when restoring it (a copy of its
# bytes) is cheaper than prefilling its tokens again: on a GPU a 9B model prefills a few thousand
# tokens a second and a 256-token state is a few MB (plus a recurrent model's fixed tens of MB),
# so from here up a restore wins; below, a save costs more than it ever returns, and short
# requests (titles, tags) would only churn the budget.
MIN_SAVED_TOKENS = 256
# prefix_cache_mb when models.yaml gives none: room for a few 7k-token tool prompts of a 9B model
# (about 30 KB of KV a token on Qwen3.5-9B's attention layers, 120 KB on Qwen2.5-7B) and more than
# enough for the small embedded models.
DEFAULT_BUDGET_MB = 1024.0


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def usable_prefix(held: Sequence[int], prompt: Sequence[int], *, truncatable: bool) -> int:
    """How many leading tokens of `prompt` a context holding `held` can start from, leaving at
    least one prompt token to evaluate. A context that cannot be truncated (recurrent memory)
    is usable only whole."""
    limit = len(prompt) - 1
    shared = common_prefix(held, prompt)
    if truncatable:
        return max(0, min(shared, limit))
    return len(held) if shared == len(held) and len(held) <= limit else 0


class Context(Protocol):
    """The one sequence of a llama.cpp context, as `PromptStates` drives it."""

    # Whether the memory can be cut to a shorter prefix (attention-only models).
    truncatable: bool

    def held(self) -> Sequence[int]:
        """The tokens the context's state holds, in order."""

    def keep(self, n: int) -> None:
        """Keep the first `n` tokens' state and drop the rest; `n` is 0, len(held()), or any
        length when `truncatable`."""

    def snapshot(self) -> bytes:
        """The sequence's state, to `restore` later."""

    def restore(self, tokens: Sequence[int], state: bytes) -> bool:
        """Replace the sequence's state by `state`, which holds `tokens`. False (the context
        then holds nothing) when llama.cpp refuses it."""


@dataclass(frozen=True)
class SavedState:
    tokens: tuple[int, ...]
    state: bytes

    @property
    def nbytes(self) -> int:
        return len(self.state) + 4 * len(self.tokens)


class PromptStates:
    """Saved states of one model's recent long prompts, and the choice of where each generation
    starts. `budget_bytes` 0 turns saving off; the live context is reused either way."""

    def __init__(
        self, context: Context, budget_bytes: int, *, min_tokens: int = MIN_SAVED_TOKENS
    ) -> None:
        self.context = context
        self.budget_bytes = budget_bytes
        self.min_tokens = min_tokens
        self._saved: OrderedDict[tuple[int, ...], SavedState] = OrderedDict()
        self._live_known = True

    @property
    def nbytes(self) -> int:
        return sum(saved.nbytes for saved in self._saved.values())

    def __len__(self) -> int:
        return len(self._saved)

    def start(self, prompt: Sequence[int]) -> int:
        """Put the context at the longest usable prefix of `prompt` (live or saved) and return
        its length; the caller evaluates the rest."""
        truncatable = self.context.truncatable
        live = (
            usable_prefix(self.context.held(), prompt, truncatable=truncatable)
            if self._live_known
            else 0
        )
        best: SavedState | None = None
        best_length = live
        for saved in self._saved.values():
            length = usable_prefix(saved.tokens, prompt, truncatable=truncatable)
            if length > best_length:
                best, best_length = saved, length
        self._live_known = True
        if best is not None:
            self._saved.move_to_end(best.tokens)
            if self.context.restore(best.tokens, best.state):
                self.context.keep(best_length)
                log.debug(
                    "restored a saved state: %d of %d prompt tokens (the live context had %d)",
                    best_length,
                    len(prompt),
                    live,
                )
                return best_length
            del self._saved[best.tokens]  # refused: no use keeping it
            log.warning("llama.cpp refused a saved prompt state; prefilling the whole prompt")
            self.context.keep(0)
            return 0
        self.context.keep(live)
        return live

    def save(self, prompt_tokens: int) -> None:
        """After a generation on a prompt of `prompt_tokens` tokens: keep what the context holds
        now (the prompt and the answer so far) if the prompt was long enough."""
        if prompt_tokens < self.min_tokens or not self._live_known:
            return
        self.checkpoint()

    def checkpoint(self) -> None:
        """Keep what the context holds now, whatever its length (a recurrent model's state at a
        message boundary, taken mid-prompt)."""
        if self.budget_bytes <= 0:
            return
        tokens = tuple(self.context.held())
        if not tokens or tokens in self._saved:
            if tokens in self._saved:
                self._saved.move_to_end(tokens)
            return
        saved = SavedState(tokens, self.context.snapshot())
        if saved.nbytes > self.budget_bytes:
            return
        if self.context.truncatable:
            # A cuttable state covers every shorter state of its own prefix.
            for older in [t for t in self._saved if t == tokens[: len(t)]]:
                del self._saved[older]
        self._saved[tokens] = saved
        while self.nbytes > self.budget_bytes:
            self._saved.popitem(last=False)
        log.debug("saved a prompt state: %d tokens, %d bytes", len(tokens), saved.nbytes)

    def forget_live(self) -> None:
        """The context was used outside `start` (the image path): its tokens no longer say what
        its state holds, so the next start does not trust them."""
        self._live_known = False

    def clear(self) -> None:
        self._saved.clear()


class LlamaContext:
    """`Context` over a llama-cpp-python `Llama`: its token record (`input_ids[:n_tokens]`) and
    llama.cpp's per-sequence state API on sequence 0, the only one a `Llama` uses."""

    def __init__(self, llm: Llama) -> None:
        import llama_cpp

        self.llm = llm
        self._api: Any = llama_cpp
        model = llm.model
        self.truncatable = not (
            llama_cpp.llama_model_is_recurrent(model) or llama_cpp.llama_model_is_hybrid(model)
        )

    def held(self) -> Sequence[int]:
        return self.llm.input_ids[: self.llm.n_tokens].tolist()

    def keep(self, n: int) -> None:
        llm = self.llm
        if n == 0:
            llm.reset()  # n_tokens 0; clears a recurrent memory, whose state cannot be cut
            llm._ctx.kv_cache_seq_rm(0, 0, -1)
        elif n < llm.n_tokens:
            if not self.truncatable or not llm._ctx.kv_cache_seq_rm(0, n, -1):
                raise RuntimeError(f"cannot cut this context to {n} of {llm.n_tokens} tokens")
            llm.n_tokens = n

    def snapshot(self) -> bytes:
        import ctypes

        api, ctx = self._api, self.llm.ctx
        size = api.llama_state_seq_get_size(ctx, 0)
        buffer = (ctypes.c_uint8 * size)()
        written = api.llama_state_seq_get_data(ctx, buffer, size, 0)
        return ctypes.string_at(buffer, written)

    def restore(self, tokens: Sequence[int], state: bytes) -> bool:
        import ctypes

        api, llm = self._api, self.llm
        llm.reset()
        api.llama_memory_clear(api.llama_get_memory(llm.ctx), True)
        buffer = (ctypes.c_uint8 * len(state)).from_buffer_copy(state)
        if api.llama_state_seq_set_data(llm.ctx, buffer, len(state), 0) == 0:
            api.llama_memory_clear(api.llama_get_memory(llm.ctx), True)
            return False
        llm.input_ids[: len(tokens)] = tokens
        llm.n_tokens = len(tokens)
        return True

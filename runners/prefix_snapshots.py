"""Model states of long prompts' prefixes, for the one-at-a-time transformers path.

The second message of a chat repeats the first one's start (the system prompt and, from Open
WebUI, ~25 KB of tool definitions) and adds the turns since. A model that cannot batch (Qwen3.5:
its linear-attention layers carry a recurrent state, which cannot be cropped back to a shorter
prefix the way a key/value cache can) would prefill all of it again. Instead, the runner stops
its prefill of a long prompt at a page boundary a little before the prompt's end (before the
generation prompt that the next message renders differently), keeps a copy of the model's cache
there, and prefills the rest; a later prompt that starts with those tokens continues from a copy
of that state and prefills only what follows.

Snapshots are serialised into host memory (`torch.save`: whatever the cache holds, key/value
tensors or recurrent states, on whatever device) within a byte budget, least recently used out
first. Not thread-safe: the one-at-a-time path runs alone.
"""

from __future__ import annotations

import io
import logging
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

log = logging.getLogger("llmux.runners.prefix_snapshots")


class PrefixSnapshots:
    """Cache states at `page_tokens` boundaries of prompts of at least `min_tokens` tokens,
    `budget_bytes` of them at most."""

    def __init__(self, budget_bytes: int, *, page_tokens: int, min_tokens: int, margin: int):
        self.budget_bytes = budget_bytes
        self.page_tokens = page_tokens
        self.min_tokens = min_tokens
        self.margin = margin  # tokens at a prompt's end that the next message may render anew
        self._kept: OrderedDict[tuple[int, ...], bytes] = OrderedDict()
        self._bytes = 0

    @property
    def bytes(self) -> int:
        return self._bytes

    def point(self, prompt_ids: list[int]) -> int:
        """Where to take this prompt's snapshot (0: too short for one)."""
        if len(prompt_ids) < self.min_tokens:
            return 0
        return (len(prompt_ids) - self.margin) // self.page_tokens * self.page_tokens

    def longest(self, prompt_ids: list[int], device: torch.device) -> tuple[int, Any]:
        """The longest kept prefix of `prompt_ids` (leaving at least one token to prefill) and
        a fresh copy of its cache on `device`; (0, None) when none is kept."""
        best: tuple[int, ...] | None = None
        for key in self._kept:
            longer = best is None or len(key) > len(best)
            if longer and len(key) < len(prompt_ids) and tuple(prompt_ids[: len(key)]) == key:
                best = key
        if best is None:
            return 0, None
        import torch

        self._kept.move_to_end(best)
        cache = torch.load(io.BytesIO(self._kept[best]), map_location=device, weights_only=False)
        return len(best), cache

    def keep(self, prefix_ids: list[int], cache: Any) -> None:
        """Keep a copy of `cache`, the model's state after `prefix_ids`."""
        import torch

        key = tuple(prefix_ids)
        if key in self._kept:
            self._kept.move_to_end(key)
            return
        buffer = io.BytesIO()
        torch.save(cache, buffer)
        data = buffer.getvalue()
        if len(data) > self.budget_bytes:
            log.info(
                "a prompt prefix of %d tokens takes %d MB, over the prefix cache's %d MB: not kept",
                len(key),
                len(data) >> 20,
                self.budget_bytes >> 20,
            )
            return
        while self._bytes + len(data) > self.budget_bytes:
            _, dropped = self._kept.popitem(last=False)
            self._bytes -= len(dropped)
        self._kept[key] = data
        self._bytes += len(data)

    def clear(self) -> None:
        self._kept.clear()
        self._bytes = 0

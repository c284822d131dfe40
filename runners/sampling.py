"""Temperature / top-p sampling with a per-request random generator, as a logits processor.

transformers' own sampling draws from torch's global RNG, which every thread of the process shares
(ASR, TTS, other requests), so `seed` would not reproduce anything. Instead generation runs
greedy (`do_sample=False`) and this processor, last in the list, draws the token itself from a
`torch.Generator` of its own and leaves only that token finite: greedy's argmax then picks it.

OpenAI's semantics: temperature defaults to 1 and top_p to 1 (no filtering); temperature 0 means
greedy, so no sampler is made for it (`make_sampler` returns None).
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from transformers import LogitsProcessor

DEFAULT_TEMPERATURE = 1.0  # OpenAI's default when a request leaves it out
DEFAULT_TOP_P = 1.0


def make_sampler(
    temperature: float | None, top_p: float | None, seed: int | None, device: torch.device
) -> LogitsProcessor | None:
    """A sampler for these settings, or None for greedy decoding (temperature 0).

    The same seed with the same settings, prompt and model gives the same tokens; without a seed
    one is drawn at random."""
    chosen = DEFAULT_TEMPERATURE if temperature is None else temperature
    if chosen <= 0:
        return None
    import torch
    from transformers import LogitsProcessor

    class SeededSampler(LogitsProcessor):
        def __init__(self) -> None:
            self.temperature = chosen
            self.top_p = DEFAULT_TOP_P if top_p is None else top_p
            self.generator = torch.Generator(device=device)
            self.generator.manual_seed(random.getrandbits(63) if seed is None else seed)

        def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.Tensor:
            probs = torch.softmax(scores.float() / self.temperature, dim=-1)
            if self.top_p < 1.0:
                probs = _top_p_filter(probs, self.top_p)
            choice = torch.multinomial(probs, num_samples=1, generator=self.generator)
            chosen = torch.full_like(scores, float("-inf"))
            return chosen.scatter_(-1, choice, 0.0)

    return SeededSampler()


def _top_p_filter(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose mass reaches `top_p` (at least one)."""
    import torch

    sorted_probs, order = torch.sort(probs, descending=True, dim=-1)
    mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
    sorted_probs = sorted_probs.masked_fill(mass_before >= top_p, 0.0)
    return torch.zeros_like(probs).scatter_(-1, order, sorted_probs)

"""Word error rate, for the smoke command and the speech tests."""

from __future__ import annotations

import re


def words(text: str) -> list[str]:
    """Lower-case words without punctuation ("Friday," and "friday" are one word)."""
    return re.findall(r"[\w']+", text.lower())


def word_error_rate(reference: str, hypothesis: str) -> float:
    """Word-level Levenshtein distance (substitutions, insertions, deletions) / reference words."""
    ref, hyp = words(reference), words(hypothesis)
    previous = list(range(len(hyp) + 1))
    for i, ref_word in enumerate(ref, start=1):
        current = [i]
        for j, hyp_word in enumerate(hyp, start=1):
            current.append(
                min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ref_word != hyp_word))
            )
        previous = current
    return previous[-1] / max(1, len(ref))

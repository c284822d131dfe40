"""Stop sequences over streamed text, the same for every backend.

Text that could still be the start of a stop sequence is held back until it is decided, so a
client never sees part of a stop sequence.
"""

from __future__ import annotations


class StopFilter:
    """Cuts streamed text at the first stop sequence. Per piece of text it looks only at what is
    held (shorter than the longest stop) plus the new text, so its cost does not grow with the
    answer; stops are bounded in number and length by the request's validation."""

    def __init__(self, stops: list[str]) -> None:
        self._stops = [s for s in stops if s]
        self._longest = max((len(s) for s in self._stops), default=0)
        self._held = ""
        self.stopped = False

    def push(self, text: str) -> str:
        """The text that is safe to emit now; after a stop sequence, nothing more."""
        if self.stopped or not self._stops:
            return "" if self.stopped else text
        self._held += text
        cut = min((i for i in (self._held.find(s) for s in self._stops) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            out, self._held = self._held[:cut], ""
            return out
        keep = self._longest_partial_stop()
        out = self._held[: len(self._held) - keep]
        self._held = self._held[len(out) :]
        return out

    def _longest_partial_stop(self) -> int:
        """The length of the longest end of the held text that a stop sequence starts with."""
        held = self._held
        best = 0
        for stop in self._stops:
            for n in range(min(len(stop) - 1, len(held)), best, -1):
                if held.endswith(stop[:n]):
                    best = n
                    break
        return best

    def flush(self) -> str:
        out, self._held = ("" if self.stopped else self._held), ""
        return out

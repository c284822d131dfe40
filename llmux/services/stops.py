"""Stop sequences over streamed text, the same for every backend.

Text that could still be the start of a stop sequence is held back until it is decided, so a
client never sees part of a stop sequence.
"""

from __future__ import annotations


class StopFilter:
    def __init__(self, stops: list[str]) -> None:
        self._stops = [s for s in stops if s]
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
        keep = max(
            (n for s in self._stops for n in range(1, len(s)) if self._held.endswith(s[:n])),
            default=0,
        )
        out = self._held[: len(self._held) - keep]
        self._held = self._held[len(out) :]
        return out

    def flush(self) -> str:
        out, self._held = ("" if self.stopped else self._held), ""
        return out

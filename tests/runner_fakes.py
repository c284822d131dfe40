"""What the tests' fake runners share: a runner that loads nothing, records its loads and
unloads, and passes its preflight. Each test adds the capability it fakes (chat, speech, ...)."""

from __future__ import annotations

from collections.abc import Callable


class RecordingRunner:
    """`note(what, physical_id)` is called for every load and unload, in order."""

    def __init__(self, physical_id: str, note: Callable[[str, str], None]) -> None:
        self.physical_id = physical_id
        self._note = note

    def preflight(self) -> None:
        pass

    def load(self) -> None:
        self._note("load", self.physical_id)

    def unload(self) -> None:
        self._note("unload", self.physical_id)

    def device_bytes(self) -> None:
        return None


class ParkingRecordingRunner(RecordingRunner):
    """A RecordingRunner that can park (the warm tier); notes "park" and "unpark" too."""

    def park(self) -> None:
        self._note("park", self.physical_id)

    def unpark(self) -> None:
        self._note("unpark", self.physical_id)

    def host_bytes(self) -> int:
        return 1024**3

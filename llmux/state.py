"""What the service owns, built once at start-up and handed to routes through the app."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING

from starlette.requests import HTTPConnection

from llmux.core.config import Registry
from llmux.keys import KeyRing
from llmux.settings import Settings
from llmux.voices import Voices

if TYPE_CHECKING:
    from llmux.services.bench import Benchmark
    from llmux.services.chat import ChatService
    from llmux_policy.executor import Residency


@dataclass
class AppState:
    settings: Settings
    registry: Registry
    keys: KeyRing
    residency: Residency
    chat: ChatService
    voices: Voices = field(default_factory=Voices.builtin)
    started_at: int = field(default_factory=lambda: int(time.time()))
    bench: Benchmark = field(default_factory=lambda: _benchmark())

    @cached_property
    def model_list_json(self) -> bytes:
        """GET /v1/models's body, rendered once: the registry does not change while serving."""
        from llmux.wire.models import ModelList, model_card

        cards = [
            model_card(self.registry, name, self.started_at)
            for name in self.registry.virtual_models
        ]
        return ModelList(data=cards).model_dump_json().encode()

    @staticmethod
    def of(connection: HTTPConnection) -> AppState:
        state: AppState = connection.app.state.llmux
        return state


def _benchmark() -> Benchmark:
    from llmux.services.bench import Benchmark  # the service module needs this one first

    return Benchmark()

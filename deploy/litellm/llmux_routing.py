"""Residency-aware choice of an llmux replica: a pure function of the replicas' `/health` and the
model asked for, plus a one-second cache of those readings. No LiteLLM import here: the LiteLLM
glue (`llmux_litellm.py`) is a thin hook around `choose_replica`, and tests drive this module
against real replicas without LiteLLM.

The decision, in order (docs/scaling.md, "How the routing decides"):
1. Replicas where the model is resident (ready or loading, or a swap bringing it in is under
   way): the one with the fewest requests on that model (in flight plus waiting for its swap).
2. Replicas where it is warm (parked in host memory, `warm_models` in /health: back on the GPU
   much faster than from disk): the one whose eviction would cost least, as in 3.
3. Otherwise the replica whose eviction would cost least: the victims llmux's own rules would take
   (a resident model of the same kind for an LLM or a TTS, one of each at a time; then, when the
   budget is short, lowest priority first), compared by their requests in flight, then by their
   highest priority, then how many, then the replica's total in flight.
4. No reading at all (every replica unreachable or closing): `None`, and the caller keeps its own
   choice (LiteLLM's least-busy).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

# llmux's eviction order (llmux_policy/planner.py): LLMs go first, ASR and embeddings last.
PRIORITY = {"llm": 0, "tts": 1, "asr": 2, "embedding": 2}
# One model of these kinds is resident at a time: loading another replaces it.
ONE_AT_A_TIME = {"llm", "tts"}
WARM_STATES = {"loading", "ready"}


@dataclass(frozen=True)
class Resident:
    """One resident model as a replica's /health reports it (`loaded_models[physical_id]`)."""

    physical_id: str
    type: str
    state: str
    in_flight: int
    footprint_bytes: int
    evicting: bool = False


@dataclass(frozen=True)
class ReplicaHealth:
    """A replica's `/health`, read at one moment: what is resident and what swaps are coming."""

    name: str
    resident: Mapping[str, Resident]
    budget_bytes: int
    used_bytes: int
    swaps: Mapping[str, int] = field(default_factory=dict)  # physical id -> requests waiting
    warm: frozenset[str] = frozenset()  # parked in host memory (llmux's warm tier, if it has one)
    closing: bool = False

    @classmethod
    def from_health(cls, name: str, body: Mapping[str, Any]) -> ReplicaHealth:
        resident = {
            physical_id: Resident(
                physical_id=physical_id,
                type=str(info.get("type", "")),
                state=str(info.get("state", "")),
                in_flight=int(info.get("in_flight") or 0),
                footprint_bytes=int(info.get("footprint_bytes") or 0),
                evicting=bool(info.get("evicting")),
            )
            for physical_id, info in (body.get("loaded_models") or {}).items()
        }
        return cls(
            name=name,
            resident=resident,
            budget_bytes=int(body.get("budget_bytes") or 0),
            used_bytes=int(body.get("used_bytes") or 0),
            swaps={str(s["model"]): int(s.get("waiting") or 0) for s in body.get("swaps") or []},
            # {physical_id: {...}}, as /health has it (absent where llmux has no warm tier)
            warm=frozenset(str(physical_id) for physical_id in body.get("warm_models") or {}),
            closing=bool(body.get("closing")),
        )

    @property
    def in_flight(self) -> int:
        return sum(model.in_flight for model in self.resident.values()) + sum(self.swaps.values())


@dataclass(frozen=True)
class Choice:
    """The replica chosen and why (`resident`, `warm`, `cheapest_eviction`), for logs and tests."""

    replica: str
    reason: str
    victims: tuple[str, ...] = ()


def is_resident(replica: ReplicaHealth, physical_id: str) -> bool:
    """The model is resident (loading or ready, and not about to be evicted) or on its way in."""
    model = replica.resident.get(physical_id)
    if model is not None and model.state in WARM_STATES and not model.evicting:
        return True
    return physical_id in replica.swaps


def victims_for(
    replica: ReplicaHealth, physical_id: str, kind: str, footprint_bytes: int
) -> list[Resident]:
    """The models loading `physical_id` on this replica would evict, by llmux's rules: the
    resident model of the same kind for an LLM or a TTS, then lowest priority first (least
    recently used order is not in /health, so fewest in flight first) until it fits the budget."""
    others = [m for m in replica.resident.values() if m.physical_id != physical_id]
    victims = [m for m in others if kind in ONE_AT_A_TIME and m.type == kind]
    free = replica.budget_bytes - replica.used_bytes + sum(m.footprint_bytes for m in victims)
    rest = sorted(
        (m for m in others if m not in victims),
        key=lambda m: (PRIORITY.get(m.type, 2), m.in_flight, m.physical_id),
    )
    for model in rest:
        if free >= footprint_bytes or replica.budget_bytes == 0:
            break
        victims.append(model)
        free += model.footprint_bytes
    return victims


def eviction_cost(victims: Sequence[Resident], replica: ReplicaHealth) -> tuple[int, int, int, int]:
    """Smaller is cheaper: requests the victims hold (a swap waits for them), the highest victim
    priority (evicting speech costs more than an LLM), how many victims, the replica's load."""
    return (
        sum(m.in_flight for m in victims),
        max((PRIORITY.get(m.type, 2) for m in victims), default=-1),
        len(victims),
        replica.in_flight,
    )


def choose_replica(
    replicas: Sequence[ReplicaHealth],
    physical_id: str,
    kind: str,
    footprint_bytes: int | None = None,
) -> Choice | None:
    """Where a request for `physical_id` (of type `kind`) should go; None when no replica has a
    usable reading, so the caller falls back to its own choice. Ties go to the first listed."""
    usable = [r for r in replicas if not r.closing]
    if not usable:
        return None
    resident = [r for r in usable if is_resident(r, physical_id)]
    if resident:

        def load_on_model(r: ReplicaHealth) -> tuple[int, int]:
            model = r.resident.get(physical_id)
            return ((model.in_flight if model else 0) + r.swaps.get(physical_id, 0), r.in_flight)

        best = min(resident, key=load_on_model)
        return Choice(best.name, "resident")
    if footprint_bytes is None:  # measured on another replica, if any has it resident
        known = [
            r.resident[physical_id].footprint_bytes for r in usable if physical_id in r.resident
        ]
        footprint_bytes = max(known, default=0)
    warm = [r for r in usable if physical_id in r.warm]
    candidates, reason = (warm, "warm") if warm else (usable, "cheapest_eviction")
    costed = [(r, victims_for(r, physical_id, kind, footprint_bytes)) for r in candidates]
    best, victims = min(costed, key=lambda item: eviction_cost(item[1], item[0]))
    return Choice(best.name, reason, tuple(m.physical_id for m in victims))


Fetch = Callable[[str], Awaitable[Mapping[str, Any] | None]]


class HealthCache:
    """Each replica's /health, read at most once per `ttl_s` (one second by default) and shared by
    the requests of that second. `fetch(url)` returns the parsed body, or None when the replica
    does not answer; a replica that does not answer is left out of the decision."""

    def __init__(
        self, fetch: Fetch, ttl_s: float = 1.0, clock: Callable[[], float] = time.monotonic
    ):
        self._fetch = fetch
        self._ttl_s = ttl_s
        self._clock = clock
        self._readings: dict[str, tuple[float, ReplicaHealth | None]] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    async def read(self, name: str, url: str) -> ReplicaHealth | None:
        lock = self._locks.setdefault(name, asyncio.Lock())
        async with lock:  # one fetch per replica at a time; the others reuse its answer
            cached = self._readings.get(name)
            if cached is not None and self._clock() - cached[0] < self._ttl_s:
                return cached[1]
            body = await self._fetch(url)
            health = ReplicaHealth.from_health(name, body) if body is not None else None
            self._readings[name] = (self._clock(), health)
            return health

    async def read_all(self, replicas: Mapping[str, str]) -> list[ReplicaHealth]:
        """`replicas`: name -> health URL, in the order ties should go."""
        readings = await asyncio.gather(*(self.read(n, u) for n, u in replicas.items()))
        return [r for r in readings if r is not None]


def health_url(api_base: str) -> str:
    """`http://host:8081/v1` (an OpenAI api_base) -> `http://host:8081/health`."""
    base = api_base.rstrip("/")
    if base.endswith("/v1"):
        base = base[: -len("/v1")]
    return base + "/health"

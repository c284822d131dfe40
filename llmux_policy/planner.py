"""The residency policy as a pure function (the rules and their reasons: docs/residency.md).

`plan_residency(resident, request, budget_bytes)` looks at what is on the GPU and says what to do to
serve one more model: nothing (it is already there), load it after some evictions, wait for busy
models to finish first, or refuse. It imports no torch, does no I/O, logs nothing and never blocks;
the executor (`llmux_policy.executor`) carries plans out.

The rules, in the order they are applied:

1. A model that is already resident (in any state) needs nothing: `AlreadyResident`.
2. A model bigger than the whole budget can never be served: `Refuse`.
3. At most one LLM and at most one TTS: a resident model of the requested type is replaced
   (evictions with reason `replace_same_type`). ASR and embedding models have no such limit.
4. If the request now fits beside what stays, load it alongside: `Load` with only those evictions.
5. Otherwise make room: victims in eviction order, lowest priority first (LLM, then TTS, then ASR
   and embedding models; those have the highest priority), least recently used first within a
   type, taken until the request fits (reason `make_room`). The victims are always a prefix of
   that order, so a higher-priority model is never taken while a lower-priority one could be
   taken instead. A load never takes a model of higher priority than its own (a TTS load never
   evicts ASR), with one exception the requirement names itself: an LLM may take TTS and ASR
   (a 13 GB LLM over ASR + TTS + 4B evicts all three). When the models a load may take are not
   enough, the plan is `Refuse`, naming what is resident.
6. A busy model (requests in flight, or not `ready`) is never a victim. If the evictions of steps 3
   and 5 include busy models, the plan is `Wait`: it names the busy ones (`waiting_for`) and the
   evictions it will make once they are idle. The planner never picks a higher-priority idle model
   to avoid waiting for a busy lower-priority one: that would break rule 5. Within one type, a busy
   model counts as more recently used than any idle one (it is in use right now), so an idle model
   of the same type is taken first; that costs no priority.

Evictions are listed in the order they should run: replacements first, then victims in eviction
order. Once step 2 has passed, evicting everything else always makes room, so the only refusal is
a model that exceeds the budget on its own, or one that would need a higher-priority model gone.

The warm tier (host RAM) has a plan of its own, `plan_parking(warm, parking, host_budget_bytes)`:
a model evicted from the GPU whose runner can park is kept warm when the host budget allows, the
least recently used warm models going cold (dropped) first to make room for it. A warm model on
its way back to the GPU (`unparking`) never goes cold meanwhile; a model that does not fit the
host budget beside those is dropped. Bringing a warm model back needs no plan of its own: it is a
load like any other (`plan_residency`), only faster.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from llmux.core.config import ModelType

ResidentState = Literal["loading", "ready", "unloading"]
EvictionReason = Literal["replace_same_type", "make_room"]

# Eviction order: a lower number goes first. ASR has the highest priority, so it goes last;
# embedding models rank with it (small, always on, evicted last).
EVICTION_ORDER: dict[ModelType, int] = {"llm": 0, "tts": 1, "asr": 2, "embedding": 2}

# Types of which at most one model may be resident; loading another replaces it.
ONE_AT_A_TIME: frozenset[ModelType] = frozenset({"llm", "tts"})


@dataclass(frozen=True)
class Resident:
    """One model on the GPU, as the planner sees it (a snapshot; the planner never changes it).

    `last_used` is any number that grows with time (a counter or a monotonic clock): larger means
    more recent. A model that is `loading` or `unloading` is busy whatever its `in_flight`.
    """

    physical_id: str
    type: ModelType
    footprint_bytes: int
    in_flight: int = 0
    last_used: float = 0
    state: ResidentState = "ready"

    @property
    def busy(self) -> bool:
        return self.in_flight > 0 or self.state != "ready"


@dataclass(frozen=True)
class Request:
    """The model a request needs."""

    physical_id: str
    type: ModelType
    footprint_bytes: int


@dataclass(frozen=True)
class Eviction:
    physical_id: str
    reason: EvictionReason


@dataclass(frozen=True)
class AlreadyResident:
    """The model is resident (or loading); nothing to evict."""

    physical_id: str


@dataclass(frozen=True)
class Load:
    """Evict these models, in this order (all idle), then load the requested one."""

    physical_id: str
    evictions: tuple[Eviction, ...]


@dataclass(frozen=True)
class Wait:
    """Room needs busy models. Wait until `waiting_for` are idle, then plan again.

    `evictions` is what would go now (it includes `waiting_for`); the executor holds new requests
    off all of them meanwhile (writer preference). Once `waiting_for` are idle, and nothing else
    changed, the new plan evicts a subset of `evictions`: within a type an idle model ranks before
    a busy one, so when the busy ones turn idle, least-recently-used alone may need fewer.
    """

    physical_id: str
    waiting_for: tuple[str, ...]
    evictions: tuple[Eviction, ...]


@dataclass(frozen=True)
class Refuse:
    """The request cannot be served now; `reason` is a user-facing sentence. `code` says why:
    `model_exceeds_budget` (never, under this budget) or `model_does_not_fit` (not beside the
    higher-priority models resident now)."""

    physical_id: str
    reason: str
    code: str = "model_exceeds_budget"


Plan = AlreadyResident | Load | Wait | Refuse


@dataclass(frozen=True)
class Warm:
    """A model parked in host memory (or one about to be), as the planner sees it.

    `last_used` is on the same scale as `Resident.last_used`. An `unparking` model is on its way
    back to the GPU: it still holds its host memory, but is never sent cold."""

    physical_id: str
    host_bytes: int
    last_used: float = 0
    unparking: bool = False


@dataclass(frozen=True)
class Park:
    """Send `cold` to disk (drop them), in this order, then park `physical_id` warm."""

    physical_id: str
    cold: tuple[str, ...]


@dataclass(frozen=True)
class Drop:
    """`physical_id` does not fit the host budget: drop it as a model that cannot park."""

    physical_id: str
    reason: str


ParkPlan = Park | Drop


def plan_parking(warm: Sequence[Warm], parking: Warm, host_budget_bytes: int) -> ParkPlan:
    """Decide whether a model leaving the GPU stays warm in host memory. Pure.

    Warm models go cold least recently used first, only as many as the new one needs; when even
    all of them (less those unparking) are not enough, it is dropped and nothing goes cold."""
    ids = [model.physical_id for model in warm]
    if len(set(ids)) != len(ids) or parking.physical_id in ids:
        raise ValueError(f"a physical model is listed twice in the warm tier: {sorted(ids)}")
    kept = sum(model.host_bytes for model in warm if model.unparking)
    if kept + parking.host_bytes > host_budget_bytes:
        return Drop(
            parking.physical_id,
            f"{parking.physical_id} needs {_gib(parking.host_bytes)} of host memory; the host "
            f"budget is {_gib(host_budget_bytes)}"
            + (f", {_gib(kept)} of it held by models on their way back" if kept else ""),
        )
    used = sum(model.host_bytes for model in warm)
    cold: list[str] = []
    for model in sorted(warm, key=lambda model: model.last_used):
        if used + parking.host_bytes <= host_budget_bytes:
            break
        if model.unparking:
            continue
        cold.append(model.physical_id)
        used -= model.host_bytes
    return Park(parking.physical_id, tuple(cold))


def may_evict(request_type: ModelType, victim_type: ModelType) -> bool:
    """Whether a load of `request_type` may take a `victim_type` model to make room: never one of
    higher priority, except that an LLM may take anything (the requirement's own example)."""
    return request_type == "llm" or EVICTION_ORDER[victim_type] <= EVICTION_ORDER[request_type]


def eviction_key(resident: Resident) -> tuple[int, bool, float]:
    """Sort key of the eviction order: type priority, then idle before busy, then least recent."""
    return (EVICTION_ORDER[resident.type], resident.busy, resident.last_used)


def plan_residency(resident: Sequence[Resident], request: Request, budget_bytes: int) -> Plan:
    """Decide how to make `request` resident. Pure: same input, same plan."""
    ids = [model.physical_id for model in resident]
    if len(set(ids)) != len(ids):
        raise ValueError(f"a physical model is listed twice among the resident: {sorted(ids)}")
    if request.physical_id in ids:
        return AlreadyResident(request.physical_id)
    if request.footprint_bytes > budget_bytes:
        return Refuse(
            request.physical_id,
            f"Model {request.physical_id!r} needs {_gib(request.footprint_bytes)} of GPU memory, "
            f"more than the whole budget of {_gib(budget_bytes)}; raise gpu_budget_gb or choose "
            f"a smaller model.",
        )

    evictions: list[Eviction] = []
    evicted: list[Resident] = []
    staying: list[Resident] = []
    for model in resident:
        if request.type in ONE_AT_A_TIME and model.type == request.type:
            evictions.append(Eviction(model.physical_id, "replace_same_type"))
            evicted.append(model)
        else:
            staying.append(model)

    used = sum(model.footprint_bytes for model in staying)
    for victim in sorted(staying, key=eviction_key):
        if used + request.footprint_bytes <= budget_bytes:
            break
        if not may_evict(request.type, victim.type):
            break  # the order is by priority: every later victim outranks the request too
        evictions.append(Eviction(victim.physical_id, "make_room"))
        evicted.append(victim)
        used -= victim.footprint_bytes
    if used + request.footprint_bytes > budget_bytes:
        kept = ", ".join(
            f"{m.physical_id} ({m.type}, {_gib(m.footprint_bytes)})"
            for m in staying
            if m not in evicted
        )
        return Refuse(
            request.physical_id,
            f"Model {request.physical_id!r} ({request.type}, {_gib(request.footprint_bytes)}) "
            f"does not fit beside the higher-priority models resident ({kept}; budget "
            f"{_gib(budget_bytes)}), and a {request.type} load never evicts those. Free GPU "
            f"memory by using a smaller model, or raise gpu_budget_gb.",
            code="model_does_not_fit",
        )

    busy = tuple(model.physical_id for model in evicted if model.busy)
    if busy:
        return Wait(request.physical_id, busy, tuple(evictions))
    return Load(request.physical_id, tuple(evictions))


def _gib(n_bytes: int) -> str:
    return f"{n_bytes / 1024**3:.1f} GiB"

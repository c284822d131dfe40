"""The pure residency planner: docs/residency.md as a table, then its invariants as properties."""

from __future__ import annotations

from dataclasses import dataclass, replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llmux.core.config import ModelType
from llmux_policy.planner import (
    AlreadyResident,
    Drop,
    Eviction,
    Load,
    Park,
    ParkPlan,
    Plan,
    Refuse,
    Request,
    Resident,
    ResidentState,
    Wait,
    Warm,
    plan_parking,
    plan_residency,
)

GIB = 1024**3
BUDGET = 16 * GIB

# The production footprints (config/models.yaml), plus a few made-up models for edge cases.
MODELS: dict[str, tuple[ModelType, float]] = {
    "asr": ("asr", 4),  # cohere-transcribe
    "asr-b": ("asr", 4),
    "tts": ("tts", 2),  # chatterbox-turbo
    "tts-multi": ("tts", 2),  # chatterbox-multilingual
    "tts-big": ("tts", 5),
    "tts-large": ("tts", 9),
    "tts-huge": ("tts", 13),
    "qwen-4b": ("llm", 4),
    "qwen-9b": ("llm", 9),
    "gpt-oss-20b": ("llm", 13),
    "huge": ("llm", 17),
}


def res(
    physical_id: str,
    *,
    in_flight: int = 0,
    last_used: float = 0,
    state: ResidentState = "ready",
) -> Resident:
    model_type, gib = MODELS[physical_id]
    return Resident(physical_id, model_type, int(gib * GIB), in_flight, last_used, state)


def req(physical_id: str) -> Request:
    model_type, gib = MODELS[physical_id]
    return Request(physical_id, model_type, int(gib * GIB))


def replaced(physical_id: str) -> Eviction:
    return Eviction(physical_id, "replace_same_type")


def room(physical_id: str) -> Eviction:
    return Eviction(physical_id, "make_room")


@dataclass(frozen=True)
class Case:
    name: str
    resident: list[Resident]
    request: str
    expected: Plan
    budget: int = BUDGET


CASES = [
    # TST-016 / TST-017: ASR + TTS + a 4B or 9B LLM live together (~10 GB, ~15 GB).
    Case("asr on an empty gpu", [], "asr", Load("asr", ())),
    Case("tts beside asr", [res("asr")], "tts", Load("tts", ())),
    Case("4b beside asr+tts (~10 GB)", [res("asr"), res("tts")], "qwen-4b", Load("qwen-4b", ())),
    Case("9b beside asr+tts (~15 GB)", [res("asr"), res("tts")], "qwen-9b", Load("qwen-9b", ())),
    Case(
        "exactly the budget fits",
        [res("asr"), res("tts")],
        "qwen-9b",
        Load("qwen-9b", ()),
        budget=15 * GIB,
    ),
    # TST-018: GPT-OSS-20B evicts the LLM (same type), then TTS, then ASR; and back.
    Case(
        "20b over asr+tts+4b evicts all three, llm first",
        [res("asr", last_used=3), res("tts", last_used=2), res("qwen-4b", last_used=1)],
        "gpt-oss-20b",
        Load("gpt-oss-20b", (replaced("qwen-4b"), room("tts"), room("asr"))),
    ),
    Case(
        "20b over asr+tts evicts both",
        [res("asr"), res("tts")],
        "gpt-oss-20b",
        Load("gpt-oss-20b", (room("tts"), room("asr"))),
    ),
    Case(
        "asr after 20b evicts the llm",
        [res("gpt-oss-20b", last_used=9)],
        "asr",
        Load("asr", (room("gpt-oss-20b"),)),
    ),
    Case(
        "asr beside tts+20b evicts the llm and keeps tts",
        [res("tts", last_used=1), res("gpt-oss-20b", last_used=2)],
        "asr",
        Load("asr", (room("gpt-oss-20b"),)),
    ),
    # TST-019: switching LLMs evicts the first, and only it.
    Case(
        "4b -> 9b replaces the llm only",
        [res("asr"), res("tts"), res("qwen-4b")],
        "qwen-9b",
        Load("qwen-9b", (replaced("qwen-4b"),)),
    ),
    Case(
        "tts -> another tts replaces it",
        [res("asr"), res("tts"), res("qwen-9b")],
        "tts-multi",
        Load("tts-multi", (replaced("tts"),)),
    ),
    # TTS never evicts ASR while an LLM can go, however recently the LLM was used.
    Case(
        "tts evicts the llm, not asr",
        [res("asr", last_used=1), res("qwen-4b", last_used=99)],
        "tts",
        Load("tts", (room("qwen-4b"),)),
        budget=9 * GIB,
    ),
    Case(
        "a bigger tts replaces tts, then evicts the llm, not asr",
        [res("asr"), res("tts"), res("qwen-9b")],
        "tts-big",
        Load("tts-big", (replaced("tts"), room("qwen-9b"))),
    ),
    # Within a type: least recently used first, and an idle model before a busy one.
    Case(
        "least recently used asr goes first",
        [res("asr", last_used=5), res("asr-b", last_used=1)],
        "qwen-4b",
        Load("qwen-4b", (room("asr-b"),)),
        budget=9 * GIB,
    ),
    Case(
        "idle asr goes before a busy, older one",
        [res("asr", in_flight=1, last_used=1), res("asr-b", last_used=5)],
        "qwen-4b",
        Load("qwen-4b", (room("asr-b"),)),
        budget=9 * GIB,
    ),
    # Refusals: only a model bigger than the whole budget.
    Case("bigger than the budget", [], "huge", Refuse("huge", "")),
    Case(
        "bigger than a small budget, even with the gpu full",
        [res("asr"), res("tts")],
        "gpt-oss-20b",
        Refuse("gpt-oss-20b", ""),
        budget=12 * GIB,
    ),
    # Busy models are never victims: wait for them.
    Case(
        "20b waits for a busy 4b",
        [res("asr"), res("tts"), res("qwen-4b", in_flight=2)],
        "gpt-oss-20b",
        Wait("gpt-oss-20b", ("qwen-4b",), (replaced("qwen-4b"), room("tts"), room("asr"))),
    ),
    Case(
        "asr waits for a busy 20b",
        [res("gpt-oss-20b", in_flight=1)],
        "asr",
        Wait("asr", ("gpt-oss-20b",), (room("gpt-oss-20b"),)),
    ),
    Case(
        "waits for a busy llm rather than take an idle tts that would free enough",
        [res("qwen-4b", in_flight=1), res("tts")],
        "asr",
        Wait("asr", ("qwen-4b",), (room("qwen-4b"),)),
        budget=9 * GIB,
    ),
    Case(
        "a loading model counts as busy",
        [res("qwen-4b", state="loading")],
        "qwen-9b",
        Wait("qwen-9b", ("qwen-4b",), (replaced("qwen-4b"),)),
    ),
    Case(
        "a busy model that need not go does not matter",
        [res("asr", in_flight=3), res("tts", in_flight=1)],
        "qwen-9b",
        Load("qwen-9b", ()),
    ),
    Case("already resident", [res("asr")], "asr", AlreadyResident("asr")),
    Case("already loading", [res("asr", state="loading")], "asr", AlreadyResident("asr")),
]


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_scenarios(case: Case) -> None:
    plan = plan_residency(case.resident, req(case.request), case.budget)
    if isinstance(case.expected, Refuse):
        assert isinstance(plan, Refuse)
        assert plan.physical_id == case.request
        assert "budget" in plan.reason
    else:
        assert plan == case.expected


def test_spec_sequence_asr_tts_llm_switches() -> None:
    """The residency scenarios end to end: build up ASR+TTS+4B, switch to 9B, go to 20B, then
    ask for ASR again."""
    state: dict[str, Resident] = {}
    expected_resident = [
        ("asr", {"asr"}),
        ("tts", {"asr", "tts"}),
        ("qwen-4b", {"asr", "tts", "qwen-4b"}),
        ("qwen-9b", {"asr", "tts", "qwen-9b"}),
        ("gpt-oss-20b", {"gpt-oss-20b"}),
        ("asr", {"asr"}),
        ("tts", {"asr", "tts"}),
    ]
    for tick, (wanted, after) in enumerate(expected_resident, start=1):
        plan = plan_residency(list(state.values()), req(wanted), BUDGET)
        assert isinstance(plan, Load), (wanted, plan)
        for eviction in plan.evictions:
            del state[eviction.physical_id]
        state[wanted] = res(wanted, last_used=tick)
        assert set(state) == after, wanted


def test_a_tts_load_that_would_need_asr_gone_is_refused_naming_what_is_resident() -> None:
    """SPEC's decision on VRAM-002: a TTS load never evicts ASR, even when evicting the LLM is not
    enough; it is refused instead, with a message that says what is resident."""
    resident = [res("asr", last_used=1), res("qwen-4b", last_used=2)]
    plan = plan_residency(resident, req("tts-huge"), BUDGET)
    assert isinstance(plan, Refuse) and plan.code == "model_does_not_fit"
    assert "asr (asr, 4.0 GiB)" in plan.reason and "tts" in plan.reason
    # Evicting the LLM is enough for a smaller voice: that is still done.
    assert plan_residency(resident, req("tts-large"), BUDGET) == Load(
        "tts-large", (Eviction("qwen-4b", "make_room"),)
    )
    # An LLM may still take ASR and TTS (the requirement's own gpt-oss example).
    plan = plan_residency([*resident, res("tts", last_used=3)], req("gpt-oss-20b"), BUDGET)
    assert isinstance(plan, Load) and {e.physical_id for e in plan.evictions} == {
        "qwen-4b",
        "tts",
        "asr",
    }


def test_duplicate_resident_is_a_caller_bug() -> None:
    with pytest.raises(ValueError, match="twice"):
        plan_residency([res("asr"), res("asr")], req("tts"), BUDGET)


# --- properties over random catalogues and request sequences -----------------------------------

# Priority, from the requirement: ASR (and embedding models, which rank with it) first, then TTS,
# then LLMs. A higher number is a higher priority, so the eviction order is ascending.
RANK: dict[str, int] = {"llm": 0, "tts": 1, "asr": 2, "embedding": 2}


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[list[Request], int, list[tuple[int, list[int], int]]]:
    """A catalogue of models, a budget, and steps: (model asked for, in-flight counts, its own)."""
    types = st.sampled_from(["llm", "tts", "asr", "embedding"])
    catalogue = [
        Request(f"m{i}", draw(types), draw(st.integers(1, 20)))
        for i in range(draw(st.integers(2, 8)))
    ]
    budget = draw(st.integers(4, 24))
    step = st.tuples(
        st.integers(0, len(catalogue) - 1),
        st.lists(st.integers(0, 2), min_size=8, max_size=8),  # in-flight of residents, by position
        st.integers(0, 1),  # in-flight of the model once loaded
    )
    return catalogue, budget, draw(st.lists(step, min_size=1, max_size=25))


def check_plan(resident: list[Resident], request: Request, budget: int, plan: Plan) -> None:
    by_id = {model.physical_id: model for model in resident}
    if isinstance(plan, AlreadyResident):
        assert request.physical_id in by_id
        return
    assert request.physical_id not in by_id
    if isinstance(plan, Refuse):
        if plan.code == "model_exceeds_budget":
            assert request.footprint_bytes > budget
        else:
            # Refused only because room would need a model of higher priority than the request's,
            # which a lower-priority load never takes (an LLM load may take anything).
            assert plan.code == "model_does_not_fit" and request.type != "llm"
            outranking = [m for m in resident if RANK[m.type] > RANK[request.type]]
            assert sum(m.footprint_bytes for m in outranking) + request.footprint_bytes > budget
        return
    assert request.footprint_bytes <= budget
    evicted_ids = [eviction.physical_id for eviction in plan.evictions]
    assert len(set(evicted_ids)) == len(evicted_ids)
    evicted = [by_id[physical_id] for physical_id in evicted_ids]
    kept = [model for model in resident if model.physical_id not in evicted_ids]

    # One LLM, one TTS: every resident of the requested type goes, as a replacement.
    replacements = {e.physical_id for e in plan.evictions if e.reason == "replace_same_type"}
    same_type = {m.physical_id for m in resident if m.type == request.type}
    assert replacements == (same_type if request.type in ("llm", "tts") else set())

    # Room: what stays plus the request fits, and the last victim was needed.
    victims = [by_id[e.physical_id] for e in plan.evictions if e.reason == "make_room"]
    kept_bytes = sum(model.footprint_bytes for model in kept)
    assert kept_bytes + request.footprint_bytes <= budget
    if victims:
        assert kept_bytes + victims[-1].footprint_bytes + request.footprint_bytes > budget

    # "Never evict a higher-priority model to load a lower-priority one", the one exception being
    # the requirement's own example: an LLM may evict TTS and ASR.
    if request.type != "llm":
        assert all(RANK[m.type] <= RANK[request.type] for m in evicted), (request, evicted)

    # Priority: no victim ranks above anything kept; within a type, idle LRU before the rest.
    for victim in victims:
        for model in kept:
            assert RANK[victim.type] <= RANK[model.type], (victim, model)
            if RANK[victim.type] == RANK[model.type] and not victim.busy and not model.busy:
                assert victim.last_used <= model.last_used, (victim, model)
            if RANK[victim.type] == RANK[model.type] and victim.busy:
                assert model.busy, (victim, model)

    # Busy models are never victims: a plan that needs them waits for exactly those.
    busy = tuple(model.physical_id for model in evicted if model.busy)
    if isinstance(plan, Wait):
        assert busy and plan.waiting_for == busy
    else:
        assert isinstance(plan, Load) and not busy


@settings(max_examples=300, deadline=None)
@given(scenarios())
def test_request_sequences_keep_the_invariants(
    scenario: tuple[list[Request], int, list[tuple[int, list[int], int]]],
) -> None:
    catalogue, budget, steps = scenario
    state: dict[str, Resident] = {}
    for tick, (index, in_flight, own_in_flight) in enumerate(steps, start=1):
        state = {
            physical_id: replace(model, in_flight=in_flight[position])
            for position, (physical_id, model) in enumerate(sorted(state.items()))
        }
        request = catalogue[index]
        plan = plan_residency(list(state.values()), request, budget)
        check_plan(list(state.values()), request, budget, plan)

        if isinstance(plan, Wait):
            # The busy models finish; planning again now loads, evicting no model the wait did
            # not name (the executor holds requests off those meanwhile). It may need fewer: an
            # idle model ranks before a busy one of its type, and now plain LRU decides.
            for physical_id in plan.waiting_for:
                state[physical_id] = replace(state[physical_id], in_flight=0)
            again = plan_residency(list(state.values()), request, budget)
            check_plan(list(state.values()), request, budget, again)
            assert isinstance(again, Load)
            assert set(again.evictions) <= set(plan.evictions)
            plan = again

        if isinstance(plan, Load):
            for eviction in plan.evictions:
                del state[eviction.physical_id]
            state[request.physical_id] = Resident(
                request.physical_id,
                request.type,
                request.footprint_bytes,
                own_in_flight,
                tick,
            )
        if not isinstance(plan, Refuse):
            assert request.physical_id in state

        assert sum(model.footprint_bytes for model in state.values()) <= budget
        assert sum(model.type == "llm" for model in state.values()) <= 1
        assert sum(model.type == "tts" for model in state.values()) <= 1


# --- the warm tier: which evicted models stay in host memory ------------------------------------


def warm(physical_id: str, gib: float, last_used: float = 0, *, unparking: bool = False) -> Warm:
    return Warm(physical_id, int(gib * GIB), last_used, unparking)


PARKING_CASES = [
    ("room for it: nothing goes cold", [warm("a", 4, 1)], warm("new", 4, 9), 8, Park("new", ())),
    ("empty tier", [], warm("new", 8, 9), 8, Park("new", ())),
    (
        "least recently used goes cold first, only as many as needed",
        [warm("a", 4, 3), warm("b", 4, 1), warm("c", 4, 2)],
        warm("new", 10, 9),
        16,
        Park("new", ("b", "c")),
    ),
    (
        "a model on its way back never goes cold",
        [warm("back", 4, 1, unparking=True), warm("a", 4, 2)],
        warm("new", 4, 9),
        8,
        Park("new", ("a",)),
    ),
    (
        "bigger than the whole host budget: dropped, nothing goes cold",
        [warm("a", 1, 1)],
        warm("new", 9, 9),
        8,
        Drop("new", "new needs 9.0 GiB of host memory; the host budget is 8.0 GiB"),
    ),
    (
        "no room beside a model on its way back: dropped",
        [warm("back", 6, 1, unparking=True), warm("a", 1, 2)],
        warm("new", 4, 9),
        8,
        Drop(
            "new",
            "new needs 4.0 GiB of host memory; the host budget is 8.0 GiB, 6.0 GiB of it held "
            "by models on their way back",
        ),
    ),
    (
        "no warm tier at all",
        [],
        warm("new", 1, 9),
        0,
        Drop("new", "new needs 1.0 GiB of host memory; the host budget is 0.0 GiB"),
    ),
]


@pytest.mark.parametrize(
    ("warm_tier", "parking", "host_budget_gib", "expected"),
    [case[1:] for case in PARKING_CASES],
    ids=[case[0] for case in PARKING_CASES],
)
def test_parking(
    warm_tier: list[Warm], parking: Warm, host_budget_gib: int, expected: ParkPlan
) -> None:
    assert plan_parking(warm_tier, parking, host_budget_gib * GIB) == expected


def test_a_model_listed_twice_in_the_warm_tier_is_a_caller_bug() -> None:
    with pytest.raises(ValueError, match="twice"):
        plan_parking([warm("a", 1)], warm("a", 1), 8 * GIB)


def check_parking(tier: list[Warm], parking: Warm, host_budget: int, plan: ParkPlan) -> None:
    by_id = {model.physical_id: model for model in tier}
    held_back = sum(model.host_bytes for model in tier if model.unparking)
    if isinstance(plan, Drop):
        assert held_back + parking.host_bytes > host_budget
        return
    cold = [by_id[physical_id] for physical_id in plan.cold]
    assert len(set(plan.cold)) == len(plan.cold)
    assert not any(model.unparking for model in cold)
    kept = [model for model in tier if model.physical_id not in plan.cold]
    kept_bytes = sum(model.host_bytes for model in kept)
    assert kept_bytes + parking.host_bytes <= host_budget
    if cold:  # the last one to go cold was needed
        assert kept_bytes + cold[-1].host_bytes + parking.host_bytes > host_budget
    for gone in cold:  # least recently used first
        for model in kept:
            if not model.unparking:
                assert gone.last_used <= model.last_used, (gone, model)


@st.composite
def warm_scenarios(
    draw: st.DrawFn,
) -> tuple[list[Request], dict[str, int], int, int, list[int]]:
    """A catalogue, each model's host bytes, the GPU and host budgets, and the models asked for."""
    types = st.sampled_from(["llm", "tts", "asr", "embedding"])
    catalogue = [
        Request(f"m{i}", draw(types), draw(st.integers(1, 20)))
        for i in range(draw(st.integers(2, 8)))
    ]
    host_bytes = {model.physical_id: draw(st.integers(1, 20)) for model in catalogue}
    budget = draw(st.integers(4, 24))
    host_budget = draw(st.integers(0, 40))
    asked = draw(st.lists(st.integers(0, len(catalogue) - 1), min_size=1, max_size=30))
    return catalogue, host_bytes, budget, host_budget, asked


@settings(max_examples=300, deadline=None)
@given(warm_scenarios())
def test_request_sequences_keep_the_host_budget_and_the_gpu_invariants(
    scenario: tuple[list[Request], dict[str, int], int, int, list[int]],
) -> None:
    """The executor's warm tier, played with the two pure plans: every eviction asks
    `plan_parking`, a warm model asked for is on its way back while room is made for it."""
    catalogue, host_bytes, budget, host_budget, asked = scenario
    resident: dict[str, Resident] = {}
    tier: dict[str, Warm] = {}
    for tick, index in enumerate(asked, start=1):
        request = catalogue[index]
        if request.physical_id in tier:
            tier[request.physical_id] = replace(tier[request.physical_id], unparking=True)
        plan = plan_residency(list(resident.values()), request, budget)
        check_plan(list(resident.values()), request, budget, plan)
        if isinstance(plan, Load):
            for eviction in plan.evictions:
                gone = resident.pop(eviction.physical_id)
                parking = Warm(gone.physical_id, host_bytes[gone.physical_id], gone.last_used)
                parked = plan_parking(list(tier.values()), parking, host_budget)
                check_parking(list(tier.values()), parking, host_budget, parked)
                if isinstance(parked, Park):
                    for physical_id in parked.cold:
                        del tier[physical_id]
                    tier[gone.physical_id] = parking
            tier.pop(request.physical_id, None)  # unparked, or loaded from disk
            resident[request.physical_id] = Resident(
                request.physical_id, request.type, request.footprint_bytes, 0, tick
            )
        elif request.physical_id in tier:  # refused: it stays warm
            tier[request.physical_id] = replace(tier[request.physical_id], unparking=False)

        assert sum(model.host_bytes for model in tier.values()) <= host_budget
        assert not set(tier) & set(resident), "a model both warm and resident"
        assert sum(model.footprint_bytes for model in resident.values()) <= budget
        assert sum(model.type == "llm" for model in resident.values()) <= 1
        assert sum(model.type == "tts" for model in resident.values()) <= 1

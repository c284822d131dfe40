"""Residency-aware routing over llmux replicas (deploy/litellm, docs/scaling.md).

The decision (`llmux_routing.choose_replica`) is tested as a table of /health readings; then
against two real `bentoml serve` replicas of the embedded default, driven from here, with two
clients alternating between the two LLMs: residency-aware routing settles each replica on one LLM
and the swaps stop after warm-up, round-robin keeps swapping (counted from /metrics). The same
through LiteLLM's real proxy is `make e2e-cluster` (the last test here; it needs LiteLLM in
build/venv-cluster, whose pins clash with the dev venv's)."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.conftest import MODELS_DIR, REPO
from tests.test_serve import free_port, start_server, stop_server, wait_until_ready

sys.path.insert(0, str(REPO / "deploy" / "litellm"))
from llmux_routing import (
    Choice,
    HealthCache,
    ReplicaHealth,
    choose_replica,
    health_url,
)
from make_config import make_config

GB = 1024**3
QWEN, GEMMA = "Qwen2.5-Coder-0.5B", "Gemma-3-270M"
PHYSICAL = {QWEN: "qwen2.5-coder-0.5b", GEMMA: "gemma3-270m"}
LITELLM = REPO / "build" / "venv-cluster" / "bin" / "litellm"
WEIGHTS = [
    MODELS_DIR / "qwen2.5-coder-0.5b" / "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
    MODELS_DIR / "gemma3-270m" / "gemma-3-270m-q4_k_m.gguf",
]
needs_weights = pytest.mark.skipif(
    not all(w.exists() for w in WEIGHTS),
    reason="the embedded default's LLMs are not set up (make setup)",
)


def replica(
    name: str,
    *resident: tuple[str, str, int],
    budget_gb: float = 16,
    swaps: dict[str, int] | None = None,
    warm: tuple[str, ...] = (),
    closing: bool = False,
) -> ReplicaHealth:
    """A replica's /health: `resident` as (physical id, type, in flight), 1 GB each, ready."""
    body: dict[str, Any] = {
        "status": "ok",
        "loaded_models": {
            pid: {"type": kind, "state": "ready", "in_flight": n, "footprint_bytes": GB}
            for pid, kind, n in resident
        },
        "budget_bytes": int(budget_gb * GB),
        "used_bytes": len(resident) * GB,
        "swaps": [{"model": m, "waiting": n} for m, n in (swaps or {}).items()],
        "warm_models": {pid: {"type": "llm", "footprint_bytes": GB} for pid in warm},
        "closing": closing,
    }
    return ReplicaHealth.from_health(name, body)


# --- the decision ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("replicas", "model", "kind", "expected"),
    [
        pytest.param(
            [replica("a", ("gemma", "llm", 0)), replica("b", ("qwen", "llm", 0))],
            "qwen",
            "llm",
            Choice("b", "resident"),
            id="the-replica-where-it-is-resident",
        ),
        pytest.param(
            [replica("a", ("qwen", "llm", 3)), replica("b", ("qwen", "llm", 1))],
            "qwen",
            "llm",
            Choice("b", "resident"),
            id="resident-on-both-fewest-in-flight-on-it",
        ),
        pytest.param(
            [
                replica("a", ("gemma", "llm", 0)),
                replica("b", ("whisper", "asr", 0), swaps={"qwen": 2}),
            ],
            "qwen",
            "llm",
            Choice("b", "resident"),
            id="a-swap-bringing-it-in-counts-as-resident",
        ),
        pytest.param(
            [replica("a", ("gemma", "llm", 0)), replica("b", ("whisper", "asr", 0))],
            "qwen",
            "llm",
            Choice("b", "cheapest_eviction"),
            id="not-resident-where-no-llm-must-go",
        ),
        pytest.param(
            [replica("a", ("gemma", "llm", 2)), replica("b", ("mistral", "llm", 0))],
            "qwen",
            "llm",
            Choice("b", "cheapest_eviction", ("mistral",)),
            id="evict-the-idle-llm-not-the-busy-one",
        ),
        pytest.param(
            [
                replica("a", ("gemma", "llm", 0)),
                replica("b", ("mistral", "llm", 0), warm=("qwen",)),
            ],
            "qwen",
            "llm",
            Choice("b", "warm", ("mistral",)),
            id="warm-in-host-memory-before-a-cold-load",
        ),
        pytest.param(
            [replica("a", closing=True), replica("b", ("gemma", "llm", 5))],
            "qwen",
            "llm",
            Choice("b", "cheapest_eviction", ("gemma",)),
            id="a-closing-replica-takes-nothing",
        ),
        pytest.param(
            [replica("a"), replica("b")],
            "qwen",
            "llm",
            Choice("a", "cheapest_eviction"),
            id="a-tie-goes-to-the-first",
        ),
    ],
)
def test_the_router_prefers_resident_then_warm_then_the_cheapest_eviction(
    replicas: list[ReplicaHealth], model: str, kind: str, expected: Choice
) -> None:
    assert choose_replica(replicas, model, kind) == expected


def test_when_the_budget_is_short_an_llm_goes_before_a_voice() -> None:
    full = [
        replica("a", ("whisper", "asr", 0), ("gemma", "llm", 0), budget_gb=2),
        replica("b", ("whisper", "asr", 0), ("piper", "tts", 0), budget_gb=2),
    ]
    # A 1 GB embedding model fits nowhere: evicting the LLM costs less than evicting the voice.
    assert choose_replica(full, "minilm", "embedding", GB) == Choice(
        "a", "cheapest_eviction", ("gemma",)
    )
    # A second TTS replaces the first one where there is one, by the one-TTS rule, with no LLM gone.
    assert choose_replica(full, "chatterbox", "tts", GB) == Choice(
        "a", "cheapest_eviction", ("gemma",)
    )
    assert choose_replica(full[1:], "chatterbox", "tts", GB) == Choice(
        "b", "cheapest_eviction", ("piper",)
    )


def test_without_any_reading_the_caller_keeps_its_own_choice() -> None:
    assert choose_replica([], "qwen", "llm") is None
    assert choose_replica([replica("a", closing=True)], "qwen", "llm") is None


def test_health_is_read_once_a_second_and_a_silent_replica_is_left_out() -> None:
    now = [0.0]
    calls: list[str] = []

    async def fetch(url: str) -> dict[str, Any] | None:
        calls.append(url)
        return None if "down" in url else {"loaded_models": {}, "budget_bytes": GB}

    async def scenario() -> list[list[str]]:
        cache = HealthCache(fetch, ttl_s=1.0, clock=lambda: now[0])
        urls = {"a": "http://a/health", "b": "http://down/health"}
        seen = []
        for t in (0.0, 0.5, 0.99, 1.0, 1.5):
            now[0] = t
            seen.append([r.name for r in await cache.read_all(urls)])
        return seen

    seen = asyncio.run(scenario())
    assert seen == [["a"]] * 5
    assert calls == ["http://a/health", "http://down/health"] * 2  # at 0 and at 1.0


def test_health_url_from_an_openai_api_base() -> None:
    assert (
        health_url("http://llmux-0.llmux-replicas:8081/v1")
        == "http://llmux-0.llmux-replicas:8081/health"
    )
    assert health_url("http://127.0.0.1:9/v1/") == "http://127.0.0.1:9/health"


def test_the_shipped_litellm_config_is_the_generators_for_the_production_registry() -> None:
    replicas = [f"http://llmux-{i}.llmux-replicas.llmux.svc:8081" for i in range(2)]
    registry = yaml.safe_load((REPO / "config" / "models.yaml").read_text())
    shipped = yaml.safe_load((REPO / "deploy" / "litellm" / "config.yaml").read_text())
    assert shipped == make_config(registry, replicas)
    assert len(shipped["model_list"]) == 2 * len(registry["virtual_models"])
    keys = {
        d["litellm_params"]["api_base"]: d["litellm_params"]["api_key"]
        for d in shipped["model_list"]
    }
    assert keys == {f"{r}/v1": f"os.environ/LLMUX_KEY_{i}" for i, r in enumerate(replicas)}
    # The k8s headless Service names these replicas (deploy/k8s/services.yaml).
    assert "llmux-replicas" in (REPO / "deploy" / "k8s" / "services.yaml").read_text()


# --- two real replicas -------------------------------------------------------------------------


def llm_loads(base: str) -> int:
    """Successful LLM loads on one replica, from its /metrics (a swap is a load of an LLM)."""
    text = httpx.get(f"{base}/metrics", timeout=10).text
    total = 0.0
    for line in text.splitlines():
        labels = dict(re.findall(r'(\w+)="([^"]*)"', line.split("}")[0]))
        ours = labels.get("model") in PHYSICAL.values() and labels.get("outcome") == "ok"
        if line.startswith("llmux_model_loads_total{") and ours:
            total += float(line.rsplit(" ", 1)[1])
    return int(total)


def replica_key(home: Path) -> str:
    keys = yaml.safe_load((home / ".config" / "llmux" / "api_keys.yaml").read_text())
    return str(keys["api_keys"][0]["key"])


@pytest.fixture(scope="module")
def replicas(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[tuple[str, str]]]:
    """Two `bentoml serve` replicas of the embedded default, each with its own HOME (so its own
    first-start key): [(base URL, key)]."""
    started = []
    try:
        for index in range(2):
            tmp = tmp_path_factory.mktemp(f"replica{index}")
            home = tmp / "home"
            home.mkdir()
            proc, base, log = start_server(
                tmp, tmp, {"HOME": str(home)}, embedded=True, models_dir=MODELS_DIR
            )
            started.append((proc, log))
            del proc, log
            started[-1] = (*started[-1], base, replica_key(home))  # type: ignore[assignment]
        yield [(base, key) for _, _, base, key in started]  # type: ignore[misc]
    finally:
        for proc, log, *_ in started:
            stop_server(proc, log)


def alternating_clients(rounds: int) -> list[str]:
    """Two clients, each alternating between the two LLMs, out of step (A: Qwen, Gemma, ...;
    B: Gemma, Qwen, ...), their requests interleaved: Qwen, Gemma, Gemma, Qwen, Qwen, ..."""
    a = [QWEN, GEMMA] * rounds
    b = [GEMMA, QWEN] * rounds
    return [model for pair in zip(a, b, strict=True) for model in pair]


def chat(base: str, key: str, model: str) -> None:
    response = httpx.post(
        f"{base}/v1/chat/completions",
        headers={"Authorization": f"Bearer {key}"},
        json={
            "model": model,
            "messages": [{"role": "user", "content": "Hi"}],
            "max_tokens": 4,
            "temperature": 0,
        },
        timeout=300,
    )
    assert response.status_code == 200, response.text


def unload_all(base: str, key: str) -> None:
    response = httpx.post(
        f"{base}/admin/unload-all", headers={"Authorization": f"Bearer {key}"}, timeout=60
    )
    assert response.status_code == 200, response.text


def drive(
    replicas: list[tuple[str, str]], sequence: list[str], pick: Callable[[int, str], int]
) -> list[int]:
    """Send `sequence` one by one to the replica `pick(i, model)` names; the LLM loads after each
    request, summed over the replicas."""
    for base, key in replicas:
        unload_all(base, key)
    start = sum(llm_loads(base) for base, _ in replicas)
    loads = []
    for i, model in enumerate(sequence):
        base, key = replicas[pick(i, model)]
        chat(base, key, model)
        loads.append(sum(llm_loads(b) for b, _ in replicas) - start)
    return loads


@pytest.mark.slow
@needs_weights
def test_residency_aware_routing_settles_each_replica_on_one_llm_and_round_robin_does_not(
    replicas: list[tuple[str, str]],
) -> None:
    sequence = alternating_clients(rounds=6)  # 24 requests
    names = [base for base, _ in replicas]

    def residency_aware(i: int, model: str) -> int:
        readings = [
            ReplicaHealth.from_health(base, httpx.get(health_url(f"{base}/v1"), timeout=5).json())
            for base in names
        ]
        choice = choose_replica(readings, PHYSICAL[model], "llm")
        assert choice is not None
        return names.index(choice.replica)

    aware = drive(replicas, sequence, residency_aware)
    robin = drive(replicas, sequence, lambda i, model: i % len(replicas))
    print(
        f"\nLLM loads after each of {len(sequence)} requests:\n"
        f"  residency-aware {aware}\n  round-robin     {robin}"
    )
    # Warm-up: the first request of each LLM loads it on one replica; after that, no swap at all.
    assert aware[-1] == 2 and aware[1] == 2, aware
    # Round-robin sends each LLM to both replicas in turn: nearly every request is a swap.
    assert robin[-1] >= len(sequence) - 2, robin


# --- the same through LiteLLM's proxy (make e2e-cluster) -----------------------------------------


def start_litellm(
    config: dict[str, Any], keys: list[str], tmp: Path
) -> tuple[subprocess.Popen[bytes], str, Any]:
    folder = tmp / "litellm"
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("llmux_litellm.py", "llmux_routing.py"):
        (folder / name).write_text((REPO / "deploy" / "litellm" / name).read_text())
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    port = free_port()
    env = {
        **os.environ,
        "LITELLM_MASTER_KEY": "sk-litellm-test-master",
        "LITELLM_LOCAL_MODEL_COST_MAP": "True",
        "LITELLM_TELEMETRY": "False",
        "HOME": str(tmp),
        **{f"LLMUX_KEY_{i}": key for i, key in enumerate(keys)},
    }
    env.pop("DATABASE_URL", None)
    log = open(folder / "litellm.log", "wb")  # noqa: SIM115 - the process holds it
    proc = subprocess.Popen(
        [
            str(LITELLM),
            "--config",
            str(folder / "config.yaml"),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        cwd=folder,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until_ready(proc, f"{base}/health/liveliness", folder / "litellm.log", 120, "LiteLLM")
    except AssertionError:
        log.close()
        raise
    return proc, base, log


def drive_litellm(replicas: list[tuple[str, str]], proxy: str, rounds: int) -> list[int]:
    """Two client threads, each alternating between the LLMs out of step with the other, through
    the proxy at the same time; the LLM loads after each round."""
    from concurrent.futures import ThreadPoolExecutor

    for base, key in replicas:
        unload_all(base, key)
    start = sum(llm_loads(base) for base, _ in replicas)
    loads = []
    with ThreadPoolExecutor(2) as pool:
        for r in range(rounds):
            models = [QWEN, GEMMA] if r % 2 == 0 else [GEMMA, QWEN]
            list(pool.map(lambda m: chat(proxy, "sk-litellm-test-master", m), models))
            loads.append(sum(llm_loads(b) for b, _ in replicas) - start)
    return loads


@pytest.mark.slow
@needs_weights
@pytest.mark.skipif(not LITELLM.exists(), reason="LiteLLM is not installed: make e2e-cluster")
def test_through_litellm_residency_aware_routing_stops_the_swaps_and_least_busy_does_not(
    replicas: list[tuple[str, str]], tmp_path: Path
) -> None:
    registry = yaml.safe_load((REPO / "config" / "local" / "models.yaml").read_text())
    registry["virtual_models"] = {n: registry["virtual_models"][n] for n in (QWEN, GEMMA)}
    bases = [base for base, _ in replicas]
    keys = [key for _, key in replicas]
    results = {}
    for label, residency in (("residency-aware", True), ("least-busy", False)):
        config = make_config(registry, bases, residency=residency)
        del config["general_settings"]["database_url"]
        proc, proxy, log = start_litellm(config, keys, tmp_path / label)
        try:
            results[label] = drive_litellm(replicas, proxy, rounds=12)
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            log.close()
    print(f"\nLLM loads after each round of 2 concurrent requests: {results}")
    aware, busy = results["residency-aware"], results["least-busy"]
    # Warm-up may cost a swap or two while both replicas start empty at once; the second half
    # of the run swaps nothing.
    assert aware[-1] == aware[len(aware) // 2 - 1], aware
    assert busy[-1] - busy[len(busy) // 2 - 1] > 0, busy
    assert aware[-1] < busy[-1], results

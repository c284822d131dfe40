"""Prometheus series of the residency executor.

The executor reports through the small `ResidencyMetricsSink` protocol; `ResidencyMetrics` turns
that into Prometheus series, `NoMetrics` drops it. `ResidencyMetrics` takes the module that
provides the prometheus_client API (`Counter`, `Histogram`, `Gauge`) instead of importing one, so
that the service can hand in `prometheus_client` (or `bentoml.metrics`, deprecated in BentoML
1.4) once its worker has set up multiprocess collection, and tests can hand in their own
`CollectorRegistry`. Create it once per process: Prometheus refuses a second series of one name in
one registry.

Series (the Counter names get `_total` appended by Prometheus):
- `llmux_model_loads_total{model, outcome}`: loads finished; outcome ok, error or cancelled.
- `llmux_model_evictions_total{model, reason}`: models unloaded; reason replace_same_type,
  make_room or shutdown.
- `llmux_model_load_seconds{model}`: histogram of successful load durations.
- `llmux_model_resident_bytes{model}`: footprint of each resident model (0 once unloaded).
- `llmux_requests_waiting_for_swap`: requests waiting for a load or an eviction.
- `llmux_swap_seconds{model}`: histogram of whole swaps (waiting for busy victims, evictions and
  the load), by the model brought in.
- `llmux_swap_wait_seconds`: histogram of how long requests waited for a swap.
- `llmux_llm_swaps_total`: one LLM replacing another; a warning is logged when two alternate
  faster than the thrash window.
- `llmux_model_parks_total{model, outcome}`: models evicted from the GPU that could park; outcome
  ok (now warm in host memory), no_room (dropped: bigger than the host budget allows) or error
  (the park failed, the model was dropped).
- `llmux_model_unparks_total{model, outcome}`: warm models brought back to the GPU; outcome ok,
  error or cancelled (an error falls back to a load from disk).
- `llmux_model_unpark_seconds{model}`: histogram of successful unparks.
- `llmux_model_warm_bytes{model}`: host memory of each warm model (0 once gone).
- `llmux_model_cold_total{model}`: warm models dropped to make host room for a newer one.
"""

from __future__ import annotations

from typing import Any, Literal, Protocol

LoadOutcome = Literal["ok", "error", "cancelled"]
EvictionCause = Literal["replace_same_type", "make_room", "shutdown", "admin", "idle"]

ParkOutcome = Literal["ok", "no_room", "error"]

UNPARK_SECONDS_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
LOAD_SECONDS_BUCKETS = (0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0)


class ResidencyMetricsSink(Protocol):
    """What the executor reports. Called on the event loop; must not block."""

    def load_finished(self, physical_id: str, outcome: LoadOutcome, seconds: float) -> None: ...

    def evicted(self, physical_id: str, reason: EvictionCause) -> None: ...

    def resident_bytes(self, physical_id: str, footprint_bytes: int) -> None: ...

    def waiting_for_swap(self, count: int) -> None: ...

    def swap_finished(self, physical_id: str, seconds: float) -> None: ...

    def waited_for_swap(self, seconds: float) -> None: ...

    def llm_swapped(self) -> None: ...

    def parked(self, physical_id: str, outcome: ParkOutcome) -> None: ...

    def unpark_finished(self, physical_id: str, outcome: LoadOutcome, seconds: float) -> None: ...

    def warm_bytes(self, physical_id: str, host_bytes: int) -> None: ...

    def went_cold(self, physical_id: str) -> None: ...


class NoMetrics:
    """The default: records nothing."""

    def load_finished(self, physical_id: str, outcome: LoadOutcome, seconds: float) -> None:
        pass

    def evicted(self, physical_id: str, reason: EvictionCause) -> None:
        pass

    def resident_bytes(self, physical_id: str, footprint_bytes: int) -> None:
        pass

    def waiting_for_swap(self, count: int) -> None:
        pass

    def swap_finished(self, physical_id: str, seconds: float) -> None:
        pass

    def waited_for_swap(self, seconds: float) -> None:
        pass

    def llm_swapped(self) -> None:
        pass

    def parked(self, physical_id: str, outcome: ParkOutcome) -> None:
        pass

    def unpark_finished(self, physical_id: str, outcome: LoadOutcome, seconds: float) -> None:
        pass

    def warm_bytes(self, physical_id: str, host_bytes: int) -> None:
        pass

    def went_cold(self, physical_id: str) -> None:
        pass


class ResidencyMetrics:
    """The residency series, built from `prometheus` (a module with the prometheus_client API).

    `registry`, when given, is passed to every series (tests use a fresh `CollectorRegistry`);
    otherwise each series goes to the module's default registry.
    """

    def __init__(self, prometheus: Any, *, registry: Any | None = None) -> None:
        where: dict[str, Any] = {} if registry is None else {"registry": registry}
        self._loads = prometheus.Counter(
            "llmux_model_loads", "Model loads finished, by outcome.", ["model", "outcome"], **where
        )
        self._evictions = prometheus.Counter(
            "llmux_model_evictions", "Models unloaded, by reason.", ["model", "reason"], **where
        )
        self._load_seconds = prometheus.Histogram(
            "llmux_model_load_seconds",
            "Seconds a successful model load took.",
            ["model"],
            buckets=LOAD_SECONDS_BUCKETS,
            **where,
        )
        # livesum: under BentoML's multiprocess collection, add up the live workers' values.
        self._resident_bytes = prometheus.Gauge(
            "llmux_model_resident_bytes",
            "GPU memory of each resident model (measured when known, else declared).",
            ["model"],
            multiprocess_mode="livesum",
            **where,
        )
        self._waiting = prometheus.Gauge(
            "llmux_requests_waiting_for_swap",
            "Requests waiting for a model load or eviction.",
            multiprocess_mode="livesum",
            **where,
        )
        self._swap_seconds = prometheus.Histogram(
            "llmux_swap_seconds",
            "Seconds a swap took: waiting for busy victims, evictions and the load.",
            ["model"],
            buckets=LOAD_SECONDS_BUCKETS,
            **where,
        )
        self._swap_wait_seconds = prometheus.Histogram(
            "llmux_swap_wait_seconds",
            "Seconds a request waited for a swap to bring its model in.",
            buckets=LOAD_SECONDS_BUCKETS,
            **where,
        )
        self._llm_swaps = prometheus.Counter(
            "llmux_llm_swaps", "One LLM replacing another on the GPU.", **where
        )
        self._parks = prometheus.Counter(
            "llmux_model_parks",
            "Models evicted from the GPU that could park in host memory, by outcome.",
            ["model", "outcome"],
            **where,
        )
        self._unparks = prometheus.Counter(
            "llmux_model_unparks",
            "Warm models brought back from host memory to the GPU, by outcome.",
            ["model", "outcome"],
            **where,
        )
        self._unpark_seconds = prometheus.Histogram(
            "llmux_model_unpark_seconds",
            "Seconds a successful unpark (host memory to GPU) took.",
            ["model"],
            buckets=UNPARK_SECONDS_BUCKETS,
            **where,
        )
        self._warm_bytes = prometheus.Gauge(
            "llmux_model_warm_bytes",
            "Host memory of each model parked in the warm tier.",
            ["model"],
            multiprocess_mode="livesum",
            **where,
        )
        self._cold = prometheus.Counter(
            "llmux_model_cold",
            "Warm models dropped to make room in the host budget for a newer one.",
            ["model"],
            **where,
        )

    def load_finished(self, physical_id: str, outcome: LoadOutcome, seconds: float) -> None:
        self._loads.labels(model=physical_id, outcome=outcome).inc()
        if outcome == "ok":
            self._load_seconds.labels(model=physical_id).observe(seconds)

    def evicted(self, physical_id: str, reason: EvictionCause) -> None:
        self._evictions.labels(model=physical_id, reason=reason).inc()

    def resident_bytes(self, physical_id: str, footprint_bytes: int) -> None:
        self._resident_bytes.labels(model=physical_id).set(footprint_bytes)

    def waiting_for_swap(self, count: int) -> None:
        self._waiting.set(count)

    def swap_finished(self, physical_id: str, seconds: float) -> None:
        self._swap_seconds.labels(model=physical_id).observe(seconds)

    def waited_for_swap(self, seconds: float) -> None:
        self._swap_wait_seconds.observe(seconds)

    def llm_swapped(self) -> None:
        self._llm_swaps.inc()

    def parked(self, physical_id: str, outcome: ParkOutcome) -> None:
        self._parks.labels(model=physical_id, outcome=outcome).inc()

    def unpark_finished(self, physical_id: str, outcome: LoadOutcome, seconds: float) -> None:
        self._unparks.labels(model=physical_id, outcome=outcome).inc()
        if outcome == "ok":
            self._unpark_seconds.labels(model=physical_id).observe(seconds)

    def warm_bytes(self, physical_id: str, host_bytes: int) -> None:
        self._warm_bytes.labels(model=physical_id).set(host_bytes)

    def went_cold(self, physical_id: str) -> None:
        self._cold.labels(model=physical_id).inc()


class WorkerResidencyMetrics:
    """`ResidencyMetrics` on prometheus_client's default registry, created on first use.

    BentoML sets PROMETHEUS_MULTIPROC_DIR in its worker only after importing the service module;
    series created earlier would never reach its /metrics. The first residency event happens in
    the worker, after start-up, so creating the series then puts them in the right place.
    """

    def __init__(self) -> None:
        self._metrics: ResidencyMetrics | None = None

    def _sink(self) -> ResidencyMetrics:
        if self._metrics is None:
            import prometheus_client

            self._metrics = ResidencyMetrics(prometheus_client)
        return self._metrics

    def load_finished(self, physical_id: str, outcome: LoadOutcome, seconds: float) -> None:
        self._sink().load_finished(physical_id, outcome, seconds)

    def evicted(self, physical_id: str, reason: EvictionCause) -> None:
        self._sink().evicted(physical_id, reason)

    def resident_bytes(self, physical_id: str, footprint_bytes: int) -> None:
        self._sink().resident_bytes(physical_id, footprint_bytes)

    def waiting_for_swap(self, count: int) -> None:
        self._sink().waiting_for_swap(count)

    def swap_finished(self, physical_id: str, seconds: float) -> None:
        self._sink().swap_finished(physical_id, seconds)

    def waited_for_swap(self, seconds: float) -> None:
        self._sink().waited_for_swap(seconds)

    def llm_swapped(self) -> None:
        self._sink().llm_swapped()

    def parked(self, physical_id: str, outcome: ParkOutcome) -> None:
        self._sink().parked(physical_id, outcome)

    def unpark_finished(self, physical_id: str, outcome: LoadOutcome, seconds: float) -> None:
        self._sink().unpark_finished(physical_id, outcome, seconds)

    def warm_bytes(self, physical_id: str, host_bytes: int) -> None:
        self._sink().warm_bytes(physical_id, host_bytes)

    def went_cold(self, physical_id: str) -> None:
        self._sink().went_cold(physical_id)

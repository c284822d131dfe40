"""Which models are on the GPU: the pure residency planner and the executor that carries it out.

- `planner`: `plan_residency`, a pure function of (resident models, request, budget) -> plan.
- `executor`: `Residency`, the async component that runs plans; the only caller of load/unload.
- `memory`: the budget (`default_budget_bytes`) and the device memory probe.
- `metrics`: the Prometheus series the executor reports.

Import from the modules themselves; this package re-exports nothing.
"""

"""The operator's handles behind /admin/: what is where, load a model, unload one or all.

Every action goes through the residency executor, with the planner's rules: a load that the plan
refuses is a 409 saying why, an unload waits a bounded time for requests in flight. Each action
is logged with the client that asked.
"""

from __future__ import annotations

import logging
from typing import Any

from llmux.core.errors import ApiError, ModelNotFound, ModelUnavailable
from llmux.state import AppState

log = logging.getLogger("llmux.admin")

# Unload waits at most this long for the model's requests in flight.
UNLOAD_WAIT_S = 30.0


def physical_id_of(state: AppState, name: str) -> str:
    """A physical model's id, from it or from one of its virtual names."""
    registry = state.registry
    if name in registry.physical_models:
        return name
    if name in registry.virtual_models:
        return registry.virtual_models[name].physical
    raise ModelNotFound(name, param=None)


def models(state: AppState) -> list[dict[str, Any]]:
    """Every physical model: its names, type, footprints, where it is, and its activity."""
    snapshot = state.residency.snapshot()
    resident = {m["physical_id"]: m for m in snapshot["models"]}
    warm = {m["physical_id"] for m in snapshot["warm_models"]}
    errors = snapshot["last_load_errors"]
    rows = []
    for physical_id, physical in state.registry.physical_models.items():
        here = resident.get(physical_id)
        rows.append(
            {
                "id": physical_id,
                "names": [
                    n for n, v in state.registry.virtual_models.items() if v.physical == physical_id
                ],
                "type": physical.type,
                "backend": physical.backend,
                "where": "gpu" if here else "host" if physical_id in warm else "disk",
                "state": here["state"] if here else None,
                "footprint_bytes": here["footprint_bytes"] if here else physical.footprint_bytes,
                "in_flight": here["in_flight"] if here else 0,
                "last_used_at": here["last_used_at"] if here else None,
                "loads": here["loads"] if here else None,
                "last_load_error": errors.get(physical_id),
            }
        )
    return rows


async def load(state: AppState, name: str, client: str) -> dict[str, Any]:
    """Make a model resident as a request would (the planner decides the evictions)."""
    physical_id = physical_id_of(state, name)
    log.info("admin %s: load %s", client, physical_id)
    try:
        async with state.residency.use(physical_id):
            pass
    except ModelUnavailable as exc:
        if exc.code in ("model_does_not_fit", "model_exceeds_budget"):
            raise ApiError(exc.message, status=409, code=exc.code) from exc
        raise
    return next(row for row in models(state) if row["id"] == physical_id)


async def unload(state: AppState, name: str | None, client: str) -> list[str]:
    """Unload one model (or every resident and warm one when `name` is None); the ids unloaded.
    An unloaded model is dropped, not parked: the operator asked for its memory back."""
    snapshot = state.residency.snapshot()
    targets = (
        [physical_id_of(state, name)]
        if name is not None
        else [m["physical_id"] for m in [*snapshot["models"], *snapshot["warm_models"]]]
    )
    log.info("admin %s: unload %s", client, ", ".join(targets) or "(nothing resident)")
    return [t for t in targets if await state.residency.unload(t, wait_s=UNLOAD_WAIT_S)]

"""LiteLLM glue for residency-aware routing over llmux replicas (docs/scaling.md).

LiteLLM's proxy loads `proxy_handler_instance` from `litellm_settings.callbacks` in config.yaml.
Its `async_filter_deployments` hook runs on every request after LiteLLM has dropped deployments in
cooldown, and before its routing strategy (least-busy here) picks one: the hook narrows the list
to the replica `llmux_routing.choose_replica` prefers, or leaves it whole when there is nothing to
decide by (one candidate, a deployment that is not llmux, no replica answering /health), so
LiteLLM's own least-busy choice stands. The decision is in llmux_routing.py, which imports no
LiteLLM.

Each deployment names the llmux physical model behind it in `model_info`:
`llmux_physical_model` (the physical id /health reports) and `llmux_type` (llm, asr, tts,
embedding), as in config.yaml next to this file.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import httpx
from litellm.integrations.custom_logger import CustomLogger

sys.path.insert(0, str(Path(__file__).resolve().parent))  # LiteLLM loads this file by path
from llmux_routing import HealthCache, choose_replica, health_url

log = logging.getLogger("llmux.routing")


class LlmuxResidencyRouting(CustomLogger):  # type: ignore[misc]  # LiteLLM is untyped here
    def __init__(self, ttl_s: float = 1.0, timeout_s: float = 0.5) -> None:
        super().__init__()
        self._client = httpx.AsyncClient(timeout=timeout_s)
        self._health = HealthCache(self._fetch, ttl_s=ttl_s)

    async def _fetch(self, url: str) -> Mapping[str, Any] | None:
        try:
            response = await self._client.get(url)
            response.raise_for_status()
            body = response.json()
        except (httpx.HTTPError, ValueError):
            return None  # a replica that does not answer is left out of the decision
        return body if isinstance(body, dict) else None

    async def async_filter_deployments(
        self,
        model: str,
        healthy_deployments: list[dict[str, Any]],
        messages: Any,
        request_kwargs: dict[str, Any] | None = None,
        parent_otel_span: Any = None,
    ) -> list[dict[str, Any]]:
        if len(healthy_deployments) < 2:
            return healthy_deployments
        by_id: dict[str, dict[str, Any]] = {}
        urls: dict[str, str] = {}
        physical = kind = None
        for deployment in healthy_deployments:
            info = deployment.get("model_info") or {}
            api_base = (deployment.get("litellm_params") or {}).get("api_base")
            if not info.get("llmux_physical_model") or not api_base:
                return healthy_deployments  # not an llmux deployment: LiteLLM decides
            physical, kind = str(info["llmux_physical_model"]), str(info.get("llmux_type", "llm"))
            by_id[str(info["id"])] = deployment
            urls[str(info["id"])] = health_url(str(api_base))
        assert physical is not None and kind is not None
        choice = choose_replica(await self._health.read_all(urls), physical, kind)
        if choice is None:
            log.info("llmux routing: no replica answered /health; least-busy decides %s", model)
            return healthy_deployments
        log.info(
            "llmux routing: %s -> %s (%s%s)",
            model,
            urls[choice.replica],
            choice.reason,
            f", evicts {', '.join(choice.victims)}" if choice.victims else "",
        )
        return [by_id[choice.replica]]


proxy_handler_instance = LlmuxResidencyRouting()

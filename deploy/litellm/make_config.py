"""Write LiteLLM's proxy config for llmux replicas: every virtual model of a registry, once per
replica, each deployment with its replica's own llmux key and the physical model behind it (what
the residency-aware hook reads /health for). config.yaml next to this file is its output for the
production registry on two Kubernetes replicas (tests/test_litellm_routing.py keeps it so):

    python deploy/litellm/make_config.py --registry config/models.yaml \\
        --replica http://llmux-0.llmux-replicas.llmux.svc:8081 \\
        --replica http://llmux-1.llmux-replicas.llmux.svc:8081 > deploy/litellm/config.yaml

The key of replica i is read from the environment variable LLMUX_KEY_<i> (LiteLLM's
`os.environ/` form), so the file itself holds no secret. `--no-residency` leaves the hook out
(LiteLLM's least-busy alone), for comparison.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import yaml


def make_config(
    registry: dict[str, Any], replicas: list[str], *, residency: bool = True
) -> dict[str, Any]:
    physical = registry["physical_models"]
    model_list = [
        {
            "model_name": name,
            "litellm_params": {
                # openai/: LiteLLM speaks OpenAI's API to llmux and passes SSE through as is.
                "model": f"openai/{name}",
                "api_base": f"{replica.rstrip('/')}/v1",
                "api_key": f"os.environ/LLMUX_KEY_{index}",
                # The first byte of an answer can wait for a swap: no short timeout here.
                "timeout": 600,
                "stream_timeout": 600,
            },
            "model_info": {
                "id": f"{name}@replica-{index}",
                "llmux_physical_model": virtual["physical"],
                "llmux_type": physical[virtual["physical"]]["type"],
            },
        }
        for name, virtual in registry["virtual_models"].items()
        for index, replica in enumerate(replicas)
    ]
    litellm_settings: dict[str, Any] = {"drop_params": False}
    if residency:
        litellm_settings["callbacks"] = "llmux_litellm.proxy_handler_instance"
    return {
        "model_list": model_list,
        "router_settings": {
            # What stands when the hook leaves the choice open (no /health answer, one replica).
            "routing_strategy": "least-busy",
            # A replica that fails is cooled down and the request retried on another.
            "num_retries": 1,
            "allowed_fails": 2,
            "cooldown_time": 30,
        },
        "litellm_settings": litellm_settings,
        "general_settings": {
            # Clients use LiteLLM virtual keys (needs database_url); the master key makes them.
            "master_key": "os.environ/LITELLM_MASTER_KEY",
            "database_url": "os.environ/DATABASE_URL",
        },
    }


HEADER = """\
# LiteLLM proxy config for llmux replicas, written by deploy/litellm/make_config.py (do not edit
# by hand: regenerate; docs/scaling.md). Keys: LLMUX_KEY_<i> per replica, LITELLM_MASTER_KEY and
# DATABASE_URL (virtual keys) in the environment.
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--registry", type=Path, required=True, help="llmux models.yaml")
    parser.add_argument("--replica", action="append", required=True, help="replica base URL")
    parser.add_argument("--no-residency", action="store_true", help="leave the hook out")
    parser.add_argument("--no-database", action="store_true", help="master key only")
    args = parser.parse_args(argv)
    registry = yaml.safe_load(args.registry.read_text())
    config = make_config(registry, args.replica, residency=not args.no_residency)
    if args.no_database:
        del config["general_settings"]["database_url"]
    sys.stdout.write(HEADER + yaml.safe_dump(config, sort_keys=False, width=100))
    return 0


if __name__ == "__main__":
    sys.exit(main())

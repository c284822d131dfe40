"""What every check reads: the server, the options, what the server lists (asked once), and the
host's commands (podman, systemctl, ss) where llmux runs on this machine."""

from __future__ import annotations

import ipaddress
import shutil
import subprocess
from dataclasses import dataclass
from functools import cached_property
from typing import Any
from urllib.parse import urlsplit

from llmux.check.http import Server
from llmux.check.rows import Row, failed, skipped

# The acceptance plan's registry: the 16 virtual models of config/models.yaml (SPEC section 3).
# Written out because the `llmux` command is installed on the host without the repository's
# config/ (a test keeps the two equal).
PRODUCTION_MODELS = (
    "Qwen3.5-9B-FP8-Thinking",
    "Qwen3.5-9B-FP8-Instruct",
    "Qwen3.5-9B-FP8-Uncensored-Thinking",
    "Qwen3.5-9B-FP8-Uncensored-Instruct",
    "Qwen3.5-4B-Thinking",
    "Qwen3.5-4B-Instruct",
    "GPT-OSS-20B-Low",
    "GPT-OSS-20B-Medium",
    "GPT-OSS-20B-High",
    "GPT-OSS-20B-Uncensored-Low",
    "GPT-OSS-20B-Uncensored-Medium",
    "GPT-OSS-20B-Uncensored-High",
    "cohere-transcribe",
    "Chatterbox-Turbo",
    "Chatterbox-Multilingual",
    "Chatterbox",
)
COMMAND_TIMEOUT_S = 120


@dataclass(frozen=True)
class Options:
    url: str
    key: str | None
    # The box itself: every part of the acceptance plan must be present, so what is missing (the
    # pod, the GPU, the production registry) fails instead of being skipped.
    production: bool = False
    gpu: bool = False  # a GPU is expected (also when the host shows one, or with production)
    public_url: str | None = None  # the Traefik route (TST-006)
    pod: str = "llmux_pod"
    container: str = "llmux_ctr"
    image: str = "localhost/llmux:latest"


class Context:
    def __init__(self, options: Options) -> None:
        self.options = options
        self.server = Server(options.url, options.key)

    # --- what the server says (asked once; an error is raised again by each row that needs it)

    @cached_property
    def models(self) -> list[dict[str, Any]]:
        """GET /v1/models' cards."""
        data: list[dict[str, Any]] = self.server.get("/v1/models")["data"]
        return data

    @cached_property
    def admin_models(self) -> list[dict[str, Any]]:
        """GET /admin/models' rows (physical models: id, names, type, backend, footprint)."""
        rows: list[dict[str, Any]] = self.server.get("/admin/models")["models"]
        return rows

    def health(self) -> dict[str, Any]:
        answer: dict[str, Any] = self.server.get("/health", key=False)
        return answer

    def of_type(self, kind: str) -> list[dict[str, Any]]:
        return [m for m in self.models if m["type"] == kind]

    # --- what is expected here

    @cached_property
    def expect_gpu(self) -> bool:
        return self.options.production or self.options.gpu or self.host_gpu is not None

    @cached_property
    def host_gpu(self) -> str | None:
        """The first GPU `nvidia-smi -L` lists on this host, when llmux runs here."""
        if not self.local or shutil.which("nvidia-smi") is None:
            return None
        listed = self.command("nvidia-smi", "-L")
        first = next((line for line in listed.stdout.splitlines() if line.startswith("GPU")), "")
        return first or None

    def absent(self, reason: str, figures: str = "", details: list[str] | None = None) -> Row:
        """A row whose subject is not here: skipped, except on the box (--production), where
        everything the plan names must be present."""
        if self.options.production:
            return failed(reason, figures, details)
        return skipped(reason, figures, details)

    # --- the host

    @cached_property
    def local(self) -> bool:
        """llmux's URL is on this machine (a loopback address or localhost)."""
        host = urlsplit(self.options.url).hostname or ""
        if host == "localhost":
            return True
        try:
            return ipaddress.ip_address(host).is_loopback
        except ValueError:
            return False

    @cached_property
    def pod_missing(self) -> str | None:
        """Why the pod's rows cannot look at the pod from here, or None when they can."""
        if not self.local:
            return f"llmux at {self.options.url} is not on this machine; run llmux check on the box"
        if shutil.which("podman") is None:
            return "podman is not installed here (the pod's rows run on the box, as llm)"
        pod = self.command("podman", "pod", "exists", self.options.pod)
        if pod.returncode != 0:
            return (
                f"no pod {self.options.pod} on this host (create_pod_llmux.sh makes it); "
                "this llmux is not the deployed one"
            )
        return None

    def command(self, *args: str) -> subprocess.CompletedProcess[str]:
        """Run a host command; a missing program or a timeout is a failed run, not an error."""
        try:
            return subprocess.run(
                args, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S, check=False
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            return subprocess.CompletedProcess(args, 127, "", str(exc))

    def in_container(self, *args: str) -> subprocess.CompletedProcess[str]:
        return self.command("podman", "exec", self.options.container, *args)


def prefer(names: list[str]) -> str:
    """The virtual name to ask of a physical model: an Instruct or Low one (short answers, no
    long reasoning) when there is one."""
    for word in ("Instruct", "Low"):
        for name in names:
            if word.lower() in name.lower():
                return name
    return names[0]


def one_per_physical(cards: list[dict[str, Any]]) -> dict[str, str]:
    """physical model -> the virtual name to ask of it, for the cards given."""
    grouped: dict[str, list[str]] = {}
    for card in cards:
        grouped.setdefault(card["physical_model"], []).append(card["id"])
    return {physical: prefer(names) for physical, names in grouped.items()}

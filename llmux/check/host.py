"""The deployment's rows (TST-001..007): the image, the GPU and the mounts inside the container,
the port, the model list, the Traefik route and the systemd units.

The pod's rows look at it with podman and systemctl, so they run on the box, as llm, against the
local URL; elsewhere they are skipped saying why (failed with --production). None of them stops,
restarts or reboots anything: the lifecycle by hand is in docs/deploy.md.
"""

from __future__ import annotations

import json
import os
import time

from llmux.check.context import PRODUCTION_MODELS, Context
from llmux.check.rows import Row, failed, passed, skipped

GIB = 1024**3
# Run inside the container: what the image was built with, and what it sees of the GPU.
IMAGE_PROBE = """
import json, torch, llama_cpp
print(json.dumps({
    "torch": torch.__version__, "cuda": torch.version.cuda,
    "llama_offload": bool(llama_cpp.llama_supports_gpu_offload()),
    "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    "capability": list(torch.cuda.get_device_capability(0)) if torch.cuda.is_available() else None,
}))
"""
MOUNT_PROBE = """
for dir in /models /config; do
  if touch "$dir/.llmux-check" 2>/dev/null; then rm -f "$dir/.llmux-check"; echo "$dir writable"
  else echo "$dir read-only"; fi
done
echo "models $(ls -A /models | wc -l)"
for file in models.yaml api_keys.yaml; do
  if test -r "/config/$file"; then echo "$file readable"; else echo "$file unreadable"; fi
done
"""


def _probe_image(ctx: Context) -> dict[str, object] | str:
    """IMAGE_PROBE's answer from the running container, or why there is none."""
    ran = ctx.in_container("python", "-c", IMAGE_PROBE)
    if ran.returncode != 0:
        return f"podman exec {ctx.options.container} python failed: {ran.stderr.strip()[-300:]}"
    found: dict[str, object] = json.loads(ran.stdout.strip().splitlines()[-1])
    return found


def image(ctx: Context) -> Row:
    """TST-001: the image exists and carries a CUDA torch and a llama.cpp built with CUDA."""
    if ctx.pod_missing:
        return ctx.absent(ctx.pod_missing)
    if ctx.command("podman", "image", "exists", ctx.options.image).returncode != 0:
        return failed(f"no image {ctx.options.image} in this user's storage (deploy.md step 6)")
    probe = _probe_image(ctx)
    if isinstance(probe, str):
        return failed(probe)
    figures = (
        f"{ctx.options.image}: torch {probe['torch']} (CUDA {probe['cuda']}), llama.cpp GPU "
        f"offload {'yes' if probe['llama_offload'] else 'no'}"
    )
    if not probe["cuda"]:
        return failed("torch in the image is a CPU build", figures)
    if not probe["llama_offload"]:
        return failed("llama-cpp-python in the image was built without CUDA", figures)
    return passed(figures)


def gpu_inside(ctx: Context) -> Row:
    """TST-002: the container sees the GPU (torch there, else the server's own NVML reading)."""
    if not ctx.pod_missing:
        probe = _probe_image(ctx)
        if isinstance(probe, str):
            return failed(probe)
        if not probe["gpu"]:
            return failed(f"torch inside {ctx.options.container} sees no CUDA device")
        capability = probe["capability"]
        major, minor = capability if isinstance(capability, list) else ("?", "?")
        smi = ctx.in_container("nvidia-smi", "-L").stdout.strip().splitlines()
        return passed(
            f"{probe['gpu']} (compute capability {major}.{minor})"
            + (f"; nvidia-smi: {smi[0]}" if smi else "")
        )
    used = ctx.health()["device_used_bytes"]
    if used is not None:
        return passed(f"the server's NVML reads a GPU ({used / GIB:.1f} GB in use)")
    if ctx.expect_gpu:
        where = f" (this host has {ctx.host_gpu})" if ctx.host_gpu else ""
        return failed(f"llmux sees no GPU: NVML reads none inside{where}")
    return skipped("no GPU: the server's NVML reads none")


def mounts(ctx: Context) -> Row:
    """TST-003: /models and /config readable inside, and read-only."""
    if ctx.pod_missing:
        return ctx.absent(ctx.pod_missing)
    ran = ctx.in_container("sh", "-c", MOUNT_PROBE)
    if ran.returncode != 0:
        return failed(f"podman exec {ctx.options.container} sh failed: {ran.stderr.strip()}")
    lines = ran.stdout.split("\n")
    found = dict(line.split(" ", 1) for line in lines if " " in line)
    problems = [
        f"{name} is {state}" for name, state in found.items() if state in ("writable", "unreadable")
    ]
    if found.get("models", "0").strip() == "0":
        problems.append("/models is empty")
    figures = (
        f"/models ({found.get('models', '?').strip()} entries) and /config read-only, "
        "models.yaml and api_keys.yaml readable"
    )
    return failed("; ".join(problems)) if problems else passed(figures)


def port(ctx: Context) -> Row:
    """TST-004: /health answers at the URL; on this machine, only on loopback."""
    started = time.perf_counter()
    health = ctx.health()
    figures = f"GET /health: {health['status']} in {(time.perf_counter() - started) * 1000:.0f} ms"
    if not ctx.local or ctx.command("ss", "-V").returncode != 0:
        return passed(figures)
    port_number = ctx.options.url.rstrip("/").rsplit(":", 1)[-1]
    listening = ctx.command("ss", "-ltnH").stdout.splitlines()
    addresses = sorted(
        {
            line.split()[3].rsplit(":", 1)[0]
            for line in listening
            if len(line.split()) > 3 and line.split()[3].rsplit(":", 1)[-1] == port_number
        }
    )
    exposed = [a for a in addresses if a.strip("[]") not in ("127.0.0.1", "::1")]
    figures += f"; listening on {', '.join(addresses) or '?'} port {port_number}"
    if exposed:
        return failed(f"port {port_number} also listens on {', '.join(exposed)}", figures)
    return passed(figures)


def model_list(ctx: Context) -> Row:
    """TST-005: GET /v1/models lists the 16 virtual models (what Open WebUI shows)."""
    names = [m["id"] for m in ctx.models]
    expected = set(PRODUCTION_MODELS)
    figures = f"{len(names)} models listed"
    if not expected & set(names):
        return ctx.absent(
            f"not the production registry: none of its {len(expected)} models is listed",
            f"{figures}: {', '.join(names)}",
        )
    missing = [n for n in PRODUCTION_MODELS if n not in names]
    extra = [n for n in names if n not in expected]
    if missing or extra:
        return failed(
            "; ".join(
                part
                for part in (
                    f"missing: {', '.join(missing)}" if missing else "",
                    f"not in the plan: {', '.join(extra)}" if extra else "",
                )
                if part
            ),
            figures,
        )
    return passed(f"all {len(names)} models of the production registry")


def traefik(ctx: Context) -> Row:
    """TST-006: the public URL (Traefik on the WireGuard entry point) reaches the same llmux."""
    public = ctx.options.public_url
    if not public:
        return skipped(
            "not asked: give --public-url http://kidirekt.kischdle.com (from a WireGuard "
            "client, or on the box if the name resolves there)"
        )
    from llmux.check.http import Server

    through = Server(public, ctx.options.key)
    status = through.get("/health", key=False)["status"]
    names = [m["id"] for m in through.get("/v1/models")["data"]]
    local = [m["id"] for m in ctx.models]
    figures = f"{public}: /health {status}, {len(names)} models"
    if names != local:
        return failed(f"{public} lists other models than {ctx.options.url}", figures)
    return passed(figures)


def systemd(ctx: Context) -> Row:
    """TST-007: the units are enabled and active, and linger keeps them across reboots. (Stop,
    start and reboot are done by hand: deploy.md step 12.)"""
    if ctx.pod_missing:
        return ctx.absent(ctx.pod_missing)
    pod_unit = f"pod-{ctx.options.pod}.service"
    container_unit = f"container-{ctx.options.container}.service"
    enabled = ctx.command("systemctl", "--user", "is-enabled", pod_unit).stdout.strip()
    active = {
        unit: ctx.command("systemctl", "--user", "is-active", unit).stdout.strip() or "unknown"
        for unit in (pod_unit, container_unit)
    }
    user = os.environ.get("USER") or os.environ.get("LOGNAME") or ""
    linger = ctx.command("loginctl", "show-user", user, "--property=Linger").stdout.strip()
    figures = (
        f"{pod_unit} {enabled or 'unknown'}, "
        + ", ".join(f"{unit} {state}" for unit, state in active.items())
        + f", {linger or 'Linger unknown'}"
    )
    problems = []
    if enabled != "enabled":
        problems.append(f"{pod_unit} is not enabled")
    problems += [f"{unit} is {state}" for unit, state in active.items() if state != "active"]
    if linger != "Linger=yes":
        problems.append(f"linger is off for {user or 'this user'}: the pod would not start at boot")
    return failed("; ".join(problems), figures) if problems else passed(figures)

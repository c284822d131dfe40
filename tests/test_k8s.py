"""deploy/k8s renders with `kubectl kustomize` and says what the service needs: the kinds, the GPU,
the probes on paths and the port the service really serves, a non-root user that can read its
keys, read-only weights, and copies of the registry and download scripts that match the repo."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
K8S = REPO / "deploy" / "k8s"
IMAGE_UID = 1034  # the bento image's user, bentoml (BentoML's Dockerfile template)

# CI has kubectl (the issue asks for the render in CI): there a missing one fails; elsewhere skip.
pytestmark = pytest.mark.skipif(
    shutil.which("kubectl") is None and not os.environ.get("CI"),
    reason="kubectl not installed (CI fails instead of skipping)",
)


@pytest.fixture(scope="module")
def rendered() -> dict[tuple[str, str], dict[str, Any]]:
    out = subprocess.run(
        ["kubectl", "kustomize", str(K8S)], capture_output=True, text=True, check=True, timeout=60
    ).stdout
    docs = [d for d in yaml.safe_load_all(out) if d]
    for doc in docs:
        assert {"apiVersion", "kind", "metadata"} <= doc.keys(), doc
        assert doc["metadata"].get("name"), doc
    by_kind = {(d["kind"], d["metadata"]["name"].rsplit("-", 1)[0]): d for d in docs}
    by_kind.update({(d["kind"], d["metadata"]["name"]): d for d in docs})
    return by_kind


def _pod(rendered: dict[tuple[str, str], dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    return rendered[(kind, name)]["spec"]["template"]["spec"]  # type: ignore[no-any-return]


def test_the_manifests_hold_every_kind_in_one_namespace(
    rendered: dict[tuple[str, str], dict[str, Any]],
) -> None:
    kinds = {kind for kind, _ in rendered}
    assert kinds == {
        "Namespace",
        "ConfigMap",
        "Service",
        "StatefulSet",
        "Deployment",
        "Job",
        "Ingress",
    }
    for (kind, _), doc in rendered.items():
        if kind != "Namespace":
            assert doc["metadata"]["namespace"] == "llmux", doc["metadata"]


def test_each_replica_takes_one_gpu_and_serves_the_port_the_image_listens_on(
    rendered: dict[tuple[str, str], dict[str, Any]],
) -> None:
    bentofile = yaml.safe_load((REPO / "bentofile.yaml").read_text())
    image_env = bentofile["docker"]["env"]
    sts = rendered[("StatefulSet", "llmux")]
    pod = sts["spec"]["template"]["spec"]
    assert sts["spec"]["serviceName"] == "llmux-replicas"
    assert pod["runtimeClassName"] == "nvidia"
    (ctr,) = pod["containers"]
    assert ctr["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert ctr["resources"]["requests"]["nvidia.com/gpu"] == 1
    port = {p["name"]: p["containerPort"] for p in ctr["ports"]}["http"]
    assert port == int(image_env["BENTOML_PORT"])
    env = {e["name"]: e.get("value") for e in ctr["env"]}
    for name in ("LLMUX_CONFIG_DIR", "LLMUX_MODELS_DIR", "HF_HUB_OFFLINE", "BENTOML_PORT"):
        assert env[name] == str(image_env[name]), name
    # Readiness and start-up from /health, liveness from BentoML's /livez, on the served port.
    assert ctr["readinessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    assert ctr["startupProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    assert ctr["livenessProbe"]["httpGet"] == {"path": "/livez", "port": "http"}
    # The image drains for 25 s after SIGTERM; the kubelet must wait longer than that.
    assert pod["terminationGracePeriodSeconds"] >= 25 + 1
    for svc in ("llmux", "llmux-replicas"):
        (svc_port,) = rendered[("Service", svc)]["spec"]["ports"]
        assert svc_port["targetPort"] == "http" and svc_port["port"] == port
        assert (
            rendered[("Service", svc)]["spec"]["selector"] == sts["spec"]["selector"]["matchLabels"]
        )
    assert rendered[("Service", "llmux-replicas")]["spec"]["clusterIP"] == "None"


def test_the_probe_paths_are_ones_the_app_serves() -> None:
    from llmux.routes.health import router

    served = {route.path for route in router.routes}  # type: ignore[attr-defined]
    assert "/health" in served
    # /livez is BentoML's own probe, kept by the app (README, API table).
    assert "/livez" in (REPO / "README.md").read_text()


def test_the_pod_runs_as_the_image_user_and_reads_its_keys_through_fsgroup(
    rendered: dict[tuple[str, str], dict[str, Any]],
) -> None:
    pod = _pod(rendered, "StatefulSet", "llmux")
    sec = pod["securityContext"]
    assert sec["runAsNonRoot"] is True
    assert sec["runAsUser"] == sec["runAsGroup"] == sec["fsGroup"] == IMAGE_UID
    (ctr,) = pod["containers"]
    assert ctr["securityContext"]["allowPrivilegeEscalation"] is False
    assert ctr["securityContext"]["capabilities"]["drop"] == ["ALL"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    keys = volumes["keys"]["secret"]
    assert keys["secretName"] == "llmux-keys"
    assert keys["defaultMode"] & 0o077 == 0o040  # group read for fsGroup, nothing for others
    assert keys["defaultMode"] & 0o222 == 0  # nobody writes
    mounts = {m["mountPath"]: m for m in ctr["volumeMounts"]}
    assert mounts["/config/api_keys.yaml"]["subPathExpr"] == "$(POD_NAME).yaml"
    assert mounts["/models"]["readOnly"] is True and mounts["/config/models.yaml"]["readOnly"]
    assert volumes["config"]["configMap"]["name"].startswith("llmux-config-")  # kustomize's hash
    assert {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}} in ctr[
        "env"
    ]


def test_the_download_job_runs_the_repo_script_onto_the_volume_the_replicas_read(
    rendered: dict[tuple[str, str], dict[str, Any]],
) -> None:
    job = rendered[("Job", "llmux-download")]
    pod = job["spec"]["template"]["spec"]
    (ctr,) = pod["containers"]
    assert ctr["command"] == ["bash", "/scripts/download_models.sh"]
    assert ctr["args"][ctr["args"].index("--models-dir") + 1] == "/models"
    job_models = {v["name"]: v for v in pod["volumes"]}["models"]["hostPath"]["path"]
    replica = _pod(rendered, "StatefulSet", "llmux")
    assert {v["name"]: v for v in replica["volumes"]}["models"]["hostPath"]["path"] == job_models
    assert pod["securityContext"]["runAsUser"] == IMAGE_UID
    assert job["spec"]["completionMode"] == "Indexed"


def test_the_ingress_streams_and_waits_for_swaps(
    rendered: dict[tuple[str, str], dict[str, Any]],
) -> None:
    notes = rendered[("Ingress", "llmux")]["metadata"]["annotations"]
    assert notes["nginx.ingress.kubernetes.io/proxy-buffering"] == "off"
    assert int(notes["nginx.ingress.kubernetes.io/proxy-read-timeout"]) >= 300
    backend = rendered[("Ingress", "llmux")]["spec"]["rules"][0]["http"]["paths"][0]["backend"]
    assert backend["service"] == {"name": "litellm", "port": {"name": "http"}}


def test_litellm_reaches_every_replica_by_its_own_name_with_its_own_key(
    rendered: dict[tuple[str, str], dict[str, Any]],
) -> None:
    sts = rendered[("StatefulSet", "llmux")]
    ns = sts["metadata"]["namespace"]
    names = [
        f"llmux-{i}.{sts['spec']['serviceName']}.{ns}.svc" for i in range(sts["spec"]["replicas"])
    ]
    config = yaml.safe_load((REPO / "deploy" / "litellm" / "config.yaml").read_text())
    bases = {d["litellm_params"]["api_base"] for d in config["model_list"]}
    assert bases == {f"http://{name}:8081/v1" for name in names}
    assert len({d["litellm_params"]["api_key"] for d in config["model_list"]}) == len(names)
    pod = _pod(rendered, "Deployment", "litellm")
    (ctr,) = pod["containers"]
    assert ctr["args"][:2] == ["--config", "/app/llmux/config.yaml"]
    assert {m["mountPath"] for m in ctr["volumeMounts"]} >= {"/app/llmux"}
    assert {v["name"]: v for v in pod["volumes"]}["config"]["configMap"]["name"] == "litellm-config"
    assert config["litellm_settings"]["callbacks"] == "llmux_litellm.proxy_handler_instance"
    assert ctr["readinessProbe"]["httpGet"]["path"] == "/health/readiness"
    assert pod["securityContext"]["runAsNonRoot"] is True
    (svc_port,) = rendered[("Service", "litellm")]["spec"]["ports"]
    assert svc_port["targetPort"] == "http"


@pytest.mark.parametrize(
    ("copy", "original"),
    [
        ("models.yaml", "config/models.yaml"),
        ("download_models.sh", "scripts/download_models.sh"),
        ("download_plan.py", "scripts/download_plan.py"),
    ],
)
def test_the_copies_kustomize_needs_match_the_repo(copy: str, original: str) -> None:
    # kustomize refuses files outside deploy/k8s (symlinks too), so these are copies.
    assert (K8S / copy).read_bytes() == (REPO / original).read_bytes(), (
        f"deploy/k8s/{copy} differs from {original}: cp {original} deploy/k8s/{copy}"
    )

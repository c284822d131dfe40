"""create_pod_llmux.sh against the real Debian podman (4.3.1), not a fake.

Debian's podman installs here (make setup-dev) and can create pods and containers and generate
units; it cannot start a container on this machine, let alone a GPU one. So the only call faked
is `podman run` (the GPU preflight); everything else goes to /usr/bin/podman, in a storage of the
test's own. The generated units are then checked with `systemd-analyze verify` and read for what
production depends on: the GPU device, the user, the read-only mounts and the loopback port.
systemctl, journalctl and curl stay fakes: no user manager runs here.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from tests.test_scripts import CTR_UNIT, IMAGE, POD_UNIT, Host, make_host

PODMAN = Path("/usr/bin/podman")
pytestmark = pytest.mark.slow


@pytest.fixture
def host(tmp_path: Path) -> Host:
    """A host with the real podman (storage under tmp_path) and a tiny local image."""
    if not PODMAN.exists():
        pytest.fail("podman is not installed: `make setup-dev` installs Debian's podman")
    host = make_host(tmp_path, without=("podman",))
    shim = tmp_path / "bin" / "podman"
    shim.write_text(
        "#!/usr/bin/env bash\n"
        "# Real podman, except starting a container (the GPU preflight), which cannot run here.\n"
        'source "$(dirname "$0")/_record.sh"\n'
        "[[ $1 == run ]] && exit 0\n"
        f'exec {PODMAN} "$@"\n'
    )
    shim.chmod(0o755)
    store = tmp_path / "containers"
    (store / "storage.conf").parent.mkdir()
    (store / "storage.conf").write_text(
        f'[storage]\ndriver = "vfs"\ngraphroot = "{store}/root"\nrunroot = "{store}/run"\n'
    )
    (store / "containers.conf").write_text(
        '[engine]\ncgroup_manager = "cgroupfs"\nevents_logger = "file"\n'
        f'events_logfile_path = "{store}/events.log"\n'
    )
    host.env.update(
        CONTAINERS_STORAGE_CONF=str(store / "storage.conf"),
        CONTAINERS_CONF=str(store / "containers.conf"),
    )
    Path(host.env["XDG_RUNTIME_DIR"]).mkdir(mode=0o700)

    # The smallest image podman accepts: one file and an entrypoint (never started here), under
    # the production tag.
    layer = tmp_path / "layer.tar"
    (tmp_path / "README").write_text("llmux test image\n")
    with tarfile.open(layer, "w") as tar:
        tar.add(tmp_path / "README", arcname="README")
    podman(host, "import", "--change", 'ENTRYPOINT ["/README"]', str(layer), IMAGE)

    (host.models / "qwen3.5-4b").mkdir(parents=True)
    keys = host.config / "api_keys.yaml"
    keys.write_text("api_keys: [{key: sk-test, name: openwebui}]\n")
    keys.chmod(0o600)
    host.set_state("linger")
    return host


def podman(host: Host, *args: str) -> str:
    result = subprocess.run(
        [str(PODMAN), *args], env=host.env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def command(unit: str, key: str, containing: str) -> str:
    """The unit's `key=` command line (continuation lines joined) that contains `containing`."""
    joined = re.sub(r"\\\n\s*", " ", unit)
    lines = [v for v in re.findall(rf"^{key}=(.*)$", joined, re.MULTILINE) if containing in v]
    assert len(lines) == 1, unit
    return str(lines[0])


def test_the_pod_script_creates_real_units_that_systemd_accepts(host: Host) -> None:
    result = host.run("create_pod_llmux.sh")
    assert result.returncode == 0, result.stdout + result.stderr

    pod_unit = (host.units / POD_UNIT).read_text()
    ctr_unit = (host.units / CTR_UNIT).read_text()

    # systemd parses both units as the user manager would, ExecStart binaries included.
    verify = subprocess.run(
        ["systemd-analyze", "verify", "--user", str(host.units / POD_UNIT),
         str(host.units / CTR_UNIT)],
        env=host.env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert verify.stderr.strip() == "", verify.stderr

    pod_create = command(pod_unit, "ExecStartPre", " pod create ")
    assert pod_create.startswith(f"{PODMAN} pod create ")
    assert "--publish 127.0.0.1:8081:8081" in pod_create
    ctr_start = command(ctr_unit, "ExecStart", " run ")
    assert ctr_start.startswith(f"{PODMAN} run ")
    assert "--device nvidia.com/gpu=all" in ctr_start
    assert "--user 0:0" in ctr_start
    assert f"-v {host.models}:/models:ro" in ctr_start or (
        f"--volume {host.models}:/models:ro" in ctr_start
    )
    assert f"{host.config}:/config:ro" in ctr_start
    assert ctr_start.rstrip().endswith(IMAGE)
    # podman stop waits 30 s before SIGKILL: llmux's bounded shutdown fits inside it.
    assert "--ignore -t 30" in re.sub(r"\\\n\s*", " ", ctr_unit)
    for unit in (pod_unit, ctr_unit):
        assert "RestartSec=10" in unit
        assert "Restart=on-failure" in unit

    # The pod made to generate the units is gone: systemd owns the one that runs.
    assert (
        subprocess.run(
            [str(PODMAN), "pod", "exists", "llmux_pod"], env=host.env, timeout=60
        ).returncode
        == 1
    )


def test_a_second_run_keeps_the_real_units(host: Host) -> None:
    assert host.run("create_pod_llmux.sh").returncode == 0
    first = {unit: (host.units / unit).read_text() for unit in (POD_UNIT, CTR_UNIT)}
    result = host.run("create_pod_llmux.sh")
    assert result.returncode == 0, result.stdout + result.stderr
    assert {unit: (host.units / unit).read_text() for unit in (POD_UNIT, CTR_UNIT)} == first


@pytest.fixture(autouse=True)
def _no_leftover_storage(tmp_path: Path):  # type: ignore[no-untyped-def]
    yield
    # vfs layers are plain directories, some read-only: make them removable for tmp_path cleanup.
    root = tmp_path / "containers" / "root"
    if root.exists():
        subprocess.run(["chmod", "-R", "u+w", str(root)], check=False)
        shutil.rmtree(root, ignore_errors=True)

"""How many CPU threads a backend should compute with: the physical cores this process may use.

llama-cpp-python defaults to half the logical CPUs for generation (1 thread on a 2-core laptop,
half the cores of a host without SMT) and all of them for prompts; llama.cpp's own tools use the
physical cores, since two threads on one core's SMT siblings share its arithmetic units and only
contend. Counted over the CPUs the process may run on (its affinity, what `taskset` or a
container's cpuset leaves it), capped by a cgroup CPU quota (a Kubernetes CPU limit): more
threads than the quota only get throttled.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

SYSFS_CPUS = Path("/sys/devices/system/cpu")
CGROUP = Path("/sys/fs/cgroup")


def physical_cores(
    cpus: set[int] | None = None, *, sysfs: Path = SYSFS_CPUS, cgroup: Path = CGROUP
) -> int:
    """The physical cores among `cpus` (default: this process's affinity), at least 1.

    Cores are told apart by (package, core id) from sysfs; where that cannot be read (another OS,
    a sandbox hiding /sys) every usable CPU counts as a core."""
    usable = _affinity() if cpus is None else cpus
    cores: set[tuple[str, str]] = set()
    for cpu in usable:
        topology = sysfs / f"cpu{cpu}" / "topology"
        try:
            package = (topology / "physical_package_id").read_text().strip()
            core = (topology / "core_id").read_text().strip()
        except OSError:
            cores = set()
            break
        cores.add((package, core))
    count = len(cores) if cores else len(usable)
    quota = _cgroup_cpus(cgroup)
    if quota is not None:
        count = min(count, quota)
    return max(count, 1)


def _affinity() -> set[int]:
    if hasattr(os, "sched_getaffinity"):
        return set(os.sched_getaffinity(0))
    return set(range(os.cpu_count() or 1))


def _cgroup_cpus(root: Path) -> int | None:
    """The CPU quota of this process's cgroup in whole CPUs (rounded up), or None without one.
    cgroup v2 writes `cpu.max` as "<quota> <period>" ("max" for none); v1 has two files."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
    except (OSError, ValueError):
        try:
            quota = (root / "cpu" / "cpu.cfs_quota_us").read_text().strip()
            period = (root / "cpu" / "cpu.cfs_period_us").read_text().strip()
        except OSError:
            return None
    try:
        quota_us, period_us = int(quota), int(period)
    except ValueError:  # "max": no quota
        return None
    if quota_us <= 0 or period_us <= 0:  # v1 writes -1 for none
        return None
    return max(1, math.ceil(quota_us / period_us))

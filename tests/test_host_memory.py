"""The worker's glibc allocator policy (`runners.base.pin_malloc_thresholds`): the blocks a CPU
forward pass allocates and frees at every step come from the heap, not a fresh mapping each
time, and stay there for the next operation; large blocks are still mapped on their own; a freed
top beyond the trim threshold goes back; a large free does not raise the thresholds.

Each case runs in a fresh interpreter, so that neither this process's allocator state nor the
policy set here leaks between them. glibc only: the policy is a no-op elsewhere."""

from __future__ import annotations

import ctypes
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
MiB = 1024 * 1024

try:
    ctypes.CDLL("libc.so.6").mallinfo2  # noqa: B018
except (OSError, AttributeError):
    pytestmark = pytest.mark.skip(reason="glibc 2.33 or later only (a no-op elsewhere)")

# Runs in the child: pins the policy, then mallocs and frees blocks of the sizes given and
# reports, for each, how many more blocks glibc holds as mappings of their own while it is held,
# and how much the heap has grown once it is freed.
PROBE = """
import ctypes, json, resource, sys, threading
from runners.base import pin_malloc_thresholds

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
libc.mallinfo2.restype = MallInfo2

def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt

def probe():
    for step in json.loads(sys.argv[1]):
        before = libc.mallinfo2()
        block = libc.malloc(step["bytes"])
        ctypes.memset(block, 1, step["bytes"])  # touched, as a tensor's output is
        mapped = libc.mallinfo2().hblks - before.hblks
        libc.free(block)
        grown = libc.mallinfo2().arena - before.arena
        # The same size again, as the next operation or step asks for it: pages still in the
        # heap are reused as they are; pages given back fault in (and are zeroed) again.
        counted = faults()
        block = libc.malloc(step["bytes"])
        ctypes.memset(block, 1, step["bytes"])
        refaulted = faults() - counted
        libc.free(block)
        report.append({
            "mapped_while_held": mapped,
            "heap_grown_after_free": grown,
            "faults_on_reuse": refaulted,
        })

pin_malloc_thresholds()
report = []
# On a thread of its own, as a batch loop or a generation runs: its blocks come from a thread
# arena, which glibc trims by the same threshold as the main heap.
worker = threading.Thread(target=probe)
worker.start()
worker.join()
print(json.dumps(report))
"""


def _run(sizes: list[int]) -> list[dict[str, Any]]:
    done = subprocess.run(
        [sys.executable, "-c", PROBE, json.dumps([{"bytes": n} for n in sizes])],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return json.loads(done.stdout)


def test_a_forward_pass_sized_block_comes_from_the_heap_not_a_mapping_of_its_own() -> None:
    # A step of a 0.5B model on the CPU allocates and frees blocks from hundreds of KiB (a row
    # of logits: 600 KB) to some MiB (a prefill chunk's MLP activations) at every layer. Each
    # mapping of its own is an mmap, page faults that zero every page, and an munmap: measured,
    # 5-25 % of the model's compute. (Before the fix, everything from 128 KiB up was mapped.)
    report = _run([600 * 1024, 4 * MiB, 20 * MiB])
    assert [r["mapped_while_held"] for r in report] == [0, 0, 0]


def test_a_step_sized_block_freed_and_asked_for_again_is_not_faulted_in_again() -> None:
    # The activations of one operation are freed and the next operation (or step) asks for as
    # much again. Given back to the OS in between (the trim threshold at 128 KiB, as it was),
    # every page faulted in and was zeroed again: 20,000 faults and 70 ms of system time per
    # request of a 0.5B model on the CPU (its first token: about 600 ms).
    report = _run([600 * 1024, 4 * MiB, 6 * MiB])
    assert [r["faults_on_reuse"] < 64 for r in report] == [True, True, True], report


def test_a_block_larger_than_any_step_allocates_is_still_mapped_on_its_own() -> None:
    # A model's weights or a cache are loaded once; as mappings of their own they go back to
    # the OS whole when freed, whichever thread freed them.
    report = _run([64 * MiB])
    assert report[0]["mapped_while_held"] == 1


def test_the_freed_top_of_the_heap_goes_back_to_the_os() -> None:
    # The trim threshold bounds what an arena keeps: 20 MiB taken from the heap (not mapped on
    # its own, which would leave the heap untouched and prove nothing), more than the 8 MiB an
    # arena may keep, is not kept resident once freed.
    report = _run([20 * MiB])
    assert report[0]["mapped_while_held"] == 0
    assert report[0]["heap_grown_after_free"] < 1 * MiB


def test_large_frees_leave_the_policy_as_it_was() -> None:
    # Unpinned, glibc moves its thresholds when a mapped block is freed (the trim threshold to
    # twice its size). Pinned: after a 64 MiB and a 48 MiB free, 48 MiB is still mapped on its
    # own, and a 20 MiB block still comes from the heap and goes back to the OS when freed.
    report = _run([64 * MiB, 48 * MiB, 20 * MiB])
    assert [r["mapped_while_held"] for r in report[:2]] == [1, 1]
    assert report[2]["mapped_while_held"] == 0
    assert report[2]["heap_grown_after_free"] < 1 * MiB

"""Swaps and loads: A->B->A time to first token split into unload, load and first token, and the
cold load of a GGUF against the time to read its bytes from the disk.

The split comes from llmux's own /metrics: `llmux_model_load_seconds` (the load) and
`llmux_swap_seconds` (the whole swap: the evictions and the load), read before and after each
request. "Cold" means the file's pages were dropped from the page cache first
(posix_fadvise DONTNEED, which needs no root); the share still cached is read with mincore and
reported, since pages another process maps cannot be dropped.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import time
from pathlib import Path
from typing import Any

from bench.clients import StreamResult, Streams, stream_chat
from bench.context import (
    MAIN_GGUF,
    MAIN_LLM,
    MAIN_PHYSICAL,
    SECOND_GGUF,
    SECOND_LLM,
    SECOND_PHYSICAL,
    TINY_LLM,
    TINY_PHYSICAL,
    Bench,
)
from bench.servers import KEY
from bench.stats import Section, difference, median, ratio

MB = 1024 * 1024
NOT_COLD = 0.1  # above this share of the file still cached, a load is not called cold
LOAD = "llmux_model_load_seconds"
SWAP = "llmux_swap_seconds"
UNPARK = "llmux_model_unpark_seconds"


def drop_from_page_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def cached_share(path: Path) -> float | None:
    """The share of the file's pages in the page cache (mincore), None where it cannot tell."""
    size = path.stat().st_size
    if size == 0:
        return None
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [
        ctypes.c_void_p,
        ctypes.c_size_t,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_long,
    ]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    fd = os.open(path, os.O_RDONLY)
    try:
        address = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if address in (None, ctypes.c_void_p(-1).value):
            return None
        try:
            pages = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
            vector = (ctypes.c_ubyte * pages)()
            if libc.mincore(address, size, vector) != 0:
                return None
            return sum(b & 1 for b in bytes(vector)) / pages
        finally:
            libc.munmap(address, size)
    finally:
        os.close(fd)


def read_seconds(path: Path) -> float:
    buffer = bytearray(16 * MB)
    started = time.perf_counter()
    with path.open("rb", buffering=0) as f:
        while f.readinto(buffer):
            pass
    return time.perf_counter() - started


def _delta(before: dict[Any, float], after: dict[Any, float], key: Any) -> float | None:
    if key not in after:
        return None
    return after[key] - before.get(key, 0.0)


def _short(model: str) -> dict[str, Any]:
    return {
        "model": model,
        "messages": [{"role": "user", "content": "Say hello."}],
        "max_tokens": 4,
        "temperature": 0,
    }


def swap(bench: Bench) -> Section:
    a, b = (MAIN_LLM, MAIN_PHYSICAL), (SECOND_LLM, SECOND_PHYSICAL)
    rows: dict[str, list[dict[str, float | None]]] = {
        f"{a[0]} warm": [],
        f"{a[0]} -> {b[0]}": [],
        f"{b[0]} warm": [],
        f"{b[0]} -> {a[0]}": [],
    }
    errors: list[str] = []

    def timed(client: Streams, target: tuple[str, str]) -> dict[str, float | None]:
        before = bench.metric_sums()
        result: StreamResult = stream_chat(client, bench.llmux.base, KEY, _short(target[0]))
        after = bench.metric_sums()
        if result.error:
            errors.append(result.error)
        load = _delta(before, after, (LOAD, target[1]))
        whole = _delta(before, after, (SWAP, target[1]))
        return {
            "ttft": result.ttft_s,
            "load": load,
            "unload": difference(whole, load),
            "first": difference(result.ttft_s, whole),
        }

    bench.admin("POST", f"/models/{a[0]}/load")
    with Streams() as client:
        stream_chat(client, bench.llmux.base, KEY, _short(a[0]))
        for _ in range(bench.options.rounds):
            rows[f"{a[0]} warm"].append(timed(client, a))
            rows[f"{a[0]} -> {b[0]}"].append(timed(client, b))
            rows[f"{b[0]} warm"].append(timed(client, b))
            rows[f"{b[0]} -> {a[0]}"].append(timed(client, a))
    section = Section(
        "swap",
        f"swap A->B->A: {a[0]} and {b[0]} (one LLM resident at a time)",
        ["request", "TTFT ms", "x warm", "unload ms", "load ms", "first token ms"],
    )
    warm = {a[0]: median(r["ttft"] for r in rows[f"{a[0]} warm"])}
    warm[b[0]] = median(r["ttft"] for r in rows[f"{b[0]} warm"])

    def ms(value: float | None) -> float | None:
        return None if value is None else value * 1000

    for name, runs in rows.items():
        target = name.split(" -> ")[-1].removesuffix(" warm")
        swapped = "->" in name
        ttft = median(r["ttft"] for r in runs)
        section.rows.append(
            {
                "request": name,
                "TTFT ms": ms(ttft),
                "x warm": ratio(ttft, warm[target]),
                "unload ms": ms(median(r["unload"] for r in runs)) if swapped else None,
                "load ms": ms(median(r["load"] for r in runs)) if swapped else None,
                "first token ms": ms(median(r["first"] for r in runs)) if swapped else ms(ttft),
            }
        )
    ab = median(r["ttft"] for r in rows[f"{a[0]} -> {b[0]}"])
    ba = median(r["ttft"] for r in rows[f"{b[0]} -> {a[0]}"])
    section.figures["a_to_b_ttft_s"] = ab
    section.figures["b_to_a_ttft_s"] = ba
    section.figures["a_to_b_over_warm"] = ratio(ab, warm[b[0]])
    section.figures["b_to_a_over_warm"] = ratio(ba, warm[a[0]])
    section.notes.append(
        "unload: the swap less the load (evicting the other LLM, preflight, freeing memory); "
        "load and swap from llmux's /metrics; first token: TTFT less the swap"
    )
    if errors:
        section.notes.append(f"{len(errors)} request(s) failed: {errors[0]}")
    return section


def cold_load(bench: Bench) -> Section:
    section = Section(
        "cold_load",
        "cold load: load time against reading the file's bytes from the disk",
        [
            "model",
            "MB",
            "cached before %",
            "disk MB/s",
            "read s",
            "cold load s",
            "x read",
            "warm load s",
            "cached after load %",
        ],
    )
    rounds = max(1, min(bench.options.rounds, 3))
    for virtual, physical, relative in (
        (MAIN_LLM, MAIN_PHYSICAL, MAIN_GGUF),
        (SECOND_LLM, SECOND_PHYSICAL, SECOND_GGUF),
    ):
        path = bench.models_dir / relative
        size = path.stat().st_size
        runs: list[dict[str, float | None]] = []
        for _ in range(rounds):
            bench.unload_all()
            drop_from_page_cache(path)
            before_read = cached_share(path)
            read = read_seconds(path)
            drop_from_page_cache(path)
            before = cached_share(path)
            sums = bench.metric_sums()
            bench.admin("POST", f"/models/{virtual}/load")
            cold = _delta(sums, bench.metric_sums(), (LOAD, physical))
            after = cached_share(path)
            bench.unload_all()
            sums = bench.metric_sums()
            bench.admin("POST", f"/models/{virtual}/load")
            warm = _delta(sums, bench.metric_sums(), (LOAD, physical))
            bench.unload_all()
            runs.append(
                {
                    "cached_read": before_read,
                    "cached": before,
                    "read": read,
                    "cold": cold,
                    "warm": warm,
                    "after": after,
                }
            )
        read_s = median(r["read"] for r in runs)
        cold = median(r["cold"] for r in runs)
        cached = median(r["cached"] for r in runs)
        if cached is not None and cached > NOT_COLD:
            # Another process maps the file: its pages could not be dropped, the load was warm.
            section.notes.append(
                f"{physical}: {cached:.0%} of the file stayed in the page cache (another "
                "process maps it), so its load was not cold and is not compared with the read"
            )
            cold = None

        def percent(key: str, runs: list[dict[str, float | None]] = runs) -> float | None:
            share = median(r[key] for r in runs)
            return None if share is None else share * 100

        section.rows.append(
            {
                "model": physical,
                "MB": size / MB,
                "cached before %": percent("cached"),
                "disk MB/s": None if not read_s else size / MB / read_s,
                "read s": read_s,
                "cold load s": cold,
                "x read": ratio(cold, read_s),
                "warm load s": median(r["warm"] for r in runs),
                "cached after load %": percent("after"),
            }
        )
        section.figures[f"{physical}_cold_load_over_read"] = ratio(cold, read_s)
    section.notes.append(
        f"{rounds} round(s); load seconds from llmux's /metrics; 'cached before' is the share of "
        "the file in the page cache after dropping it (above 0: another process maps it, so "
        "the load was not fully cold); a load far below the read time with little cached after "
        "it means the weights are mapped lazily and read at the first tokens instead"
    )
    return section


def warm_tier(bench: Bench) -> Section:
    """A parkable model back from the warm tier against a cold load of it: the tiny transformers
    model, evicted by the GGUF LLM (one LLM at a time) and so parked in host RAM, then asked for
    again, once the GGUF is unloaded too. Cold: dropped first by the operator's unload, which
    sends it to disk. Either way no LLM is resident when the timed request comes, so neither
    TTFT includes an eviction. llama.cpp
    cannot park (its weights are not torch tensors); its reload with the GGUF in the page cache
    is the cold-load section's "warm load"."""
    rows: dict[str, list[dict[str, float | None]]] = {"cold load": [], "unpark": []}
    errors: list[str] = []
    llm_resident = 0  # timed requests that found an LLM resident (their TTFT has an eviction)

    def timed(client: Streams, series: str) -> dict[str, float | None]:
        nonlocal llm_resident
        resident = [
            name
            for name, model in (bench.health().get("loaded_models") or {}).items()
            if model.get("type") == "llm"
        ]
        if resident:
            llm_resident += 1
            errors.append(f"{', '.join(resident)} resident before a timed request")
        before = bench.metric_sums()
        result = stream_chat(client, bench.llmux.base, KEY, _short(TINY_LLM))
        after = bench.metric_sums()
        if result.error:
            errors.append(result.error)
        return {"ttft": result.ttft_s, "seconds": _delta(before, after, (series, TINY_PHYSICAL))}

    with Streams() as client:
        stream_chat(client, bench.llmux.base, KEY, _short(TINY_LLM))  # first load: warm-up
        for _ in range(max(1, bench.options.rounds)):
            bench.admin("POST", f"/models/{TINY_LLM}/unload")  # to disk, not to the warm tier
            rows["cold load"].append(timed(client, LOAD))
            stream_chat(client, bench.llmux.base, KEY, _short(MAIN_LLM))  # evicts it: parked
            # As before the cold load, no LLM is resident: the unpark's TTFT evicts nothing.
            bench.admin("POST", f"/models/{MAIN_LLM}/unload")
            if TINY_PHYSICAL not in (bench.health().get("warm_models") or {}):
                errors.append(
                    f"{TINY_PHYSICAL} was not parked warm after {MAIN_LLM} evicted it and was "
                    "unloaded"
                )
            rows["unpark"].append(timed(client, UNPARK))
    section = Section(
        "warm_tier",
        f"warm tier: {TINY_LLM} back from host RAM against a cold load (tiny random model)",
        ["path", "seconds", "TTFT ms", "x cold"],
    )
    cold = median(r["seconds"] for r in rows["cold load"])
    for name, runs in rows.items():
        seconds = median(r["seconds"] for r in runs)
        ttft = median(r["ttft"] for r in runs)
        section.rows.append(
            {
                "path": name,
                "seconds": seconds,
                "TTFT ms": None if ttft is None else ttft * 1000,
                "x cold": ratio(seconds, cold),
            }
        )
    section.figures["cold_load_s"] = cold
    section.figures["unpark_s"] = median(r["seconds"] for r in rows["unpark"])
    section.figures["unpark_over_cold"] = ratio(section.figures["unpark_s"], cold)
    section.figures["llm_resident_before_timed"] = llm_resident
    section.notes.append(
        "seconds: llmux_model_load_seconds against llmux_model_unpark_seconds from /metrics; on "
        "a machine without a GPU an unpark moves no weights, and restarts the model's batch "
        "loop with its cache, as a load ends by doing; on a GPU it is also a host-to-device "
        "copy (bench it there against bytes / PCIe bandwidth). TTFT: no LLM is resident before "
        "either request, so neither includes an eviction"
    )
    if errors:
        section.notes.append(f"{len(errors)} problem(s): {errors[0]}")
    return section

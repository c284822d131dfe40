"""Start-up, idle memory and the cheap endpoints: llmux against a bare Starlette app under the
same server (bench/bare_service.py), started and hammered in turn."""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx

from bench.clients import requests_per_second
from bench.context import Bench
from bench.servers import KEY, Served, start_bare, start_llmux, start_uvicorn_bare
from bench.stats import Section, interleave, median, ratio

MB = 1024 * 1024
SETTLE_S = 2.0
BARE = "bare Starlette"
UVICORN = "bare Starlette, plain uvicorn"


def start_both(work: Path, config: Path, rounds: int) -> tuple[Section, Served, Served]:
    """Start llmux and the bare app `rounds` times each, in turn; time each start from the spawn
    to /health's first 200, and read each one's memory with nothing loaded. The last two stay
    up for the rest of the run (stopped here only if something fails)."""
    starts: dict[str, list[float]] = {"llmux": [], BARE: []}
    rss: dict[str, list[tuple[int, int]]] = {"llmux": [], BARE: []}
    kept: dict[str, Served] = {}
    running: list[Served] = []
    try:
        for index in range(rounds):
            for name in interleave(list(starts), index):
                served = (
                    start_llmux(work, config, run=index)
                    if name == "llmux"
                    else start_bare(work, work / "bare-bodies.json", run=index)
                )
                running.append(served)
                starts[name].append(served.startup_s)
                time.sleep(SETTLE_S)
                httpx.get(served.base + "/health", timeout=30)
                rss[name].append(served.rss())
                if index < rounds - 1:
                    served.stop()
                    running.remove(served)
                else:
                    kept[name] = served
        write_bare_bodies(work / "bare-bodies.json", kept["llmux"])
    except BaseException:
        for served in running:
            served.stop()
        raise
    section = Section(
        "startup",
        f"start-up to /health 200 and idle memory ({rounds} start(s) each)",
        ["server", "start-up s", "x bare", "idle RSS worker MB", "idle RSS all MB", "x bare RSS"],
    )
    bare_start = median(starts[BARE])
    bare_rss = median(r[0] for r in rss[BARE])
    for name in starts:
        start = median(starts[name])
        worker = median(r[0] for r in rss[name])
        section.rows.append(
            {
                "server": name,
                "start-up s": start,
                "x bare": ratio(start, bare_start),
                "idle RSS worker MB": None if worker is None else worker / MB,
                "idle RSS all MB": median(r[1] / MB for r in rss[name]),
                "x bare RSS": ratio(worker, bare_rss),
            }
        )
    section.figures["llmux_startup_s"] = median(starts["llmux"])
    section.figures["llmux_idle_rss_mb"] = median(r[0] / MB for r in rss["llmux"])
    section.figures["startup_ratio"] = ratio(median(starts["llmux"]), bare_start)
    section.figures["idle_rss_ratio"] = ratio(median(r[0] for r in rss["llmux"]), bare_rss)
    section.notes.append(
        "both are `bentoml serve` of one worker; RSS of the worker (the largest process) and of "
        f"all of the server's processes, {SETTLE_S:.0f} s after /health first answered, no "
        "model loaded"
    )
    return section, kept["llmux"], kept[BARE]


def write_bare_bodies(path: Path, llmux: Served) -> None:
    """What llmux answers on the cheap endpoints, for the bare app to answer alike."""
    models = httpx.get(
        llmux.base + "/v1/models", headers={"Authorization": f"Bearer {KEY}"}, timeout=30
    )
    bodies = {"/health": httpx.get(llmux.base + "/health", timeout=30).json()}
    path.write_text(json.dumps({**bodies, "/v1/models": models.json()}))


def cheap_endpoints(bench: Bench) -> Section:
    opts = bench.options
    assert bench.bare is not None
    uvicorn = start_uvicorn_bare(bench.work, bench.work / "bare-bodies.json")
    bases = {"llmux": bench.llmux.base, BARE: bench.bare.base, UVICORN: uvicorn.base}
    names = [(server, path) for server in bases for path in ("/v1/models", "/health")]
    rates: dict[tuple[str, str], list[float]] = {name: [] for name in names}
    failed: dict[tuple[str, str], int] = dict.fromkeys(names, 0)
    try:
        for server, path in names:  # warm-up
            requests_per_second(bases[server], path, bench.auth, 0.2, opts.connections)
        for index in range(opts.rounds):
            for server, path in interleave(names, index):
                rate, bad = requests_per_second(
                    bases[server], path, bench.auth, opts.endpoint_seconds, opts.connections
                )
                rates[(server, path)].append(rate)
                failed[(server, path)] += bad
    finally:
        uvicorn.stop()
    section = Section(
        "endpoints",
        f"cheap endpoints: {opts.connections} keep-alive connections, "
        f"{opts.endpoint_seconds:g} s bursts",
        ["server", "path", "req/s", "x bare", "not 200"],
    )
    for name in names:
        rps = median(rates[name])
        section.rows.append(
            {
                "server": name[0],
                "path": name[1],
                "req/s": rps,
                "x bare": ratio(rps, median(rates[(BARE, name[1])])),
                "not 200": failed[name],
            }
        )
    for path, slug in (("/v1/models", "models"), ("/health", "health")):
        mine = median(rates[("llmux", path)])
        section.figures[f"llmux_{slug}_rps"] = mine
        section.figures[f"{slug}_ratio"] = ratio(mine, median(rates[(BARE, path)]))
        section.figures[f"bare_{slug}_rps"] = median(rates[(BARE, path)])
        section.figures[f"uvicorn_{slug}_rps"] = median(rates[(UVICORN, path)])
    section.notes.append(
        "'bare Starlette' answers the bodies llmux gave, serialised per request, under "
        "`bentoml serve` with llmux's service settings (the comparison); the same app under "
        "plain uvicorn shows what BentoML's server costs; the load generator is one Python "
        "process on this machine too, so on few cores it competes with the server"
    )
    return section

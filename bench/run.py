"""`python -m bench`: start the servers, run every section, print the tables and the targets,
write the JSON.

    python -m bench [--quick] [--rounds N] [--tokens N] [--tools N] [--only a,b] [--json PATH]

Exit status: 0 when every section measured something (whatever the targets say), 1 when one
could not be measured (its error is in the report), 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench import endpoints, gateway, openwebui, qwen_transformers, residency, speech
from bench.context import MAIN_GGUF, Bench, Options
from bench.inprocess import run_isolated
from bench.machine import describe, load_average
from bench.qwen_transformers import convert_gguf
from bench.report import render
from bench.servers import REPO, models_dir, start_llmux, write_llmux_config
from bench.stats import Section
from bench.targets import evaluate
from bench.tiny import build_tiny_chat_model

SECTIONS: dict[str, tuple[str, Callable[[Bench], Section]]] = {
    "cold_load": ("cold load", residency.cold_load),
    "endpoints": ("cheap endpoints", endpoints.cheap_endpoints),
    "gateway_llamacpp": ("gateway overhead, llama.cpp", gateway.gateway_llamacpp),
    "concurrency_llamacpp": (
        "concurrency, llama.cpp",
        lambda bench: gateway.concurrency(bench, "llamacpp"),
    ),
    "openwebui": ("Open WebUI pattern", openwebui.openwebui),
    "swap": ("swap A->B->A", residency.swap),
    "warm_tier": ("warm tier", residency.warm_tier),
    "gateway_transformers": ("gateway overhead, transformers", gateway.gateway_transformers),
    "gateway_transformers_tiny": (
        "gateway overhead, transformers, tiny model",
        gateway.gateway_transformers_tiny,
    ),
    "concurrency_transformers": (
        "concurrency, transformers",
        lambda bench: gateway.concurrency(bench, "transformers"),
    ),
    "speech": ("speech real-time factors", speech.speech),
}


# Sections that use the tiny transformers model (bench/tiny.py).
TINY_SECTIONS = {"gateway_transformers_tiny", "concurrency_transformers", "warm_tier", "openwebui"}


# Left out of `--quick` unless named in `--only`: the real model's transformers rows need its
# GGUF dequantized (about 90 s the first time) and four processes loading 2.4 GB of float32
# weights, minutes of CI for the figures the tiny model's section already exercises the code of.
NOT_QUICK = ("gateway_transformers",)


# Sections run on a freshly started llmux: on the busy 2-core laptop, a process that had loaded
# llama.cpp ran the tiny transformers model 5-10 times faster than a clean one (OpenMP state,
# not llmux), which would make the comparison with a clean in-process contender meaningless.
# The concurrency section that follows shares that fresh worker.
FRESH_SERVER = {"gateway_transformers", "gateway_transformers_tiny"}


def parse(argv: list[str] | None) -> tuple[Options, list[str], Path]:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a very short run (CI)")
    parser.add_argument("--rounds", type=int, help="rounds per comparison (default 5)")
    parser.add_argument("--tokens", type=int, help="tokens per streamed answer (default 64)")
    parser.add_argument("--tools", type=int, help="Open WebUI tools sent, up to 36 (default 36)")
    parser.add_argument("--only", help="comma-separated sections: " + ", ".join(SECTIONS))
    parser.add_argument("--json", type=Path, default=REPO / "build" / "bench.json")
    args = parser.parse_args(argv)
    options = Options.quick_run() if args.quick else Options()
    changes: dict[str, Any] = {}
    for name in ("rounds", "tokens", "tools"):
        value = getattr(args, name)
        if value is not None:
            if value < 1:
                parser.error(f"--{name} must be at least 1")
            changes[name] = value
    options = dataclasses.replace(options, **changes)
    if args.only:
        only = [s.strip() for s in args.only.split(",")]
    else:
        only = [s for s in SECTIONS if not (options.quick and s in NOT_QUICK)]
    unknown = [s for s in only if s not in SECTIONS]
    if unknown:
        parser.error(f"unknown sections {unknown}; known: {', '.join(SECTIONS)}")
    return options, only, args.json


def say(message: str, started: float) -> None:
    print(f"bench [{time.perf_counter() - started:5.0f} s] {message}", file=sys.stderr, flush=True)


def run(options: Options, only: list[str], started: float) -> dict[str, Any]:
    machine = describe(REPO)
    sections: dict[str, Section] = {}
    with tempfile.TemporaryDirectory(prefix="llmux-bench-") as tmp:
        work = Path(tmp)
        tiny: Path | None = None
        if TINY_SECTIONS & set(only):
            say("building the tiny transformers model", started)
            tiny = run_isolated(build_tiny_chat_model, work / "tiny-transformers")
        qwen: Path | None = None
        if "gateway_transformers" in only:
            say("converting the Qwen GGUF for transformers (kept under build/)", started)
            qwen = run_isolated(
                convert_gguf, models_dir() / MAIN_GGUF, REPO / "build" / qwen_transformers.PHYSICAL
            )
        config = write_llmux_config(work, tiny, qwen)
        say(f"starting llmux and the bare app ({options.startup_rounds} time(s) each)", started)
        sections["startup"], llmux, bare = endpoints.start_both(
            work, config, options.startup_rounds
        )
        bench = Bench(options, work, models_dir(), llmux, bare, tiny, qwen)
        try:
            for key in only:
                title, measure = SECTIONS[key]
                if key in FRESH_SERVER and key != only[0]:
                    say("restarting llmux, so that its worker holds no other backend", started)
                    bench.llmux.stop()
                    bench.llmux = llmux = start_llmux(work, config, run=len(sections))
                say(title, started)
                try:
                    sections[key] = measure(bench)
                except Exception as exc:
                    traceback.print_exc()
                    sections[key] = Section(key, title, [], error=f"{type(exc).__name__}: {exc}")
                if key == "endpoints" and bench.bare is not None:
                    bench.bare.stop()  # its CPU and memory are not needed any more
                    bench.bare = None
                bench.unload_all()
        finally:
            llmux.stop()
            bare.stop()
    machine["load_average_at_end"] = load_average()
    report: dict[str, Any] = {
        "machine": machine,
        "settings": dataclasses.asdict(options),
        "sections": {key: section.as_json() for key, section in sections.items()},
    }
    report["targets"] = evaluate(report["sections"])
    report["elapsed_s"] = time.perf_counter() - started
    return report


def main(argv: list[str] | None = None) -> int:
    options, only, json_path = parse(argv)
    started = time.perf_counter()
    report = run(options, only, started)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    print(render(report))
    print(f"JSON: {json_path}")
    return 1 if any(s["error"] for s in report["sections"].values()) else 0

"""`llmux check`: the acceptance plan (TST-001..022) run against a running llmux, as one table.

Each row is a small function of a `Context` (the server, the options, the host's commands)
returning a `Row`: pass, fail or skipped, the figures it measured, and the reason for a failure
or a skip. A row that raises fails with the error as its reason; the rest still run. Rows whose
subject is absent here (the pod, a GPU, a model of the production registry) are skipped saying
why, or failed with --production, where the whole plan must hold. docs/deploy.md section 12
maps every row to what it proves on the box.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable

from llmux.check import api, bench, host, residency
from llmux.check.context import Context, Options
from llmux.check.http import HttpError, Unreachable
from llmux.check.rows import Row, failed, summary, table

__all__ = ["IDS", "PLAN", "Options", "run", "run_row"]
Check = Callable[[Context], Row]

PLAN: list[tuple[str, str, Check]] = [
    ("TST-001", "image built with CUDA", host.image),
    ("TST-002", "GPU visible inside", host.gpu_inside),
    ("TST-003", "mounts readable, read-only", host.mounts),
    ("TST-004", "port reachable", host.port),
    ("TST-005", "16 models listed", host.model_list),
    ("TST-006", "routing through Traefik", host.traefik),
    ("TST-007", "systemd units and linger", host.systemd),
    ("TST-008", "401 without a key", api.keys),
    ("TST-009", "a chat per virtual LLM", api.chat_every_llm),
    ("TST-010", "streaming token by token", api.streaming),
    ("TST-011", "English dictation", lambda ctx: api.dictation(ctx, "en")),
    ("TST-012", "German dictation", lambda ctx: api.dictation(ctx, "de")),
    ("TST-013", "speech", api.speech),
    ("TST-014", "vision", api.vision),
    ("TST-015", "a tool call per model", api.tool_calls),
    ("TST-016", "ASR + TTS + LLM together", residency.asr_tts_llm),
    ("TST-017", "switching LLMs", residency.switch_llm),
    ("TST-018", "a big LLM evicts the rest", residency.big_llm),
    ("TST-019", "ASR evicts the big LLM", residency.asr_after_big),
    ("TST-020", "GPU 5x CPU: transformers", bench.transformers_models),
    ("TST-021", "GPU 5x CPU: GGUF", bench.gguf_models),
    ("TST-022", "TTS faster than real time", bench.speech_models),
]
IDS = [check_id for check_id, _, _ in PLAN]


def run_row(ctx: Context, check_id: str, name: str, check: Check) -> Row:
    try:
        row = check(ctx)
    except HttpError as exc:
        reason = str(exc)
        if exc.code == "admin_key_required":
            reason += " (give llmux check an admin key: llmux keys --admin NAME)"
        row = failed(reason)
    except Unreachable as exc:
        row = failed(str(exc))
    except Exception as exc:  # a check's own bug or an answer of the wrong shape: one row fails
        row = failed(f"the check could not run: {type(exc).__name__}: {exc}")
    row.id, row.name = check_id, name
    return row


def run(options: Options, *, only: list[str] | None = None, as_json: bool = False) -> int:
    """Run the plan (or the rows `only` names) and print the table; 1 if any row failed."""
    ctx = Context(options)
    rows = []
    for check_id, name, check in PLAN:
        if only and check_id not in only:
            continue
        print(f"llmux check: {check_id} {name} ...", file=sys.stderr, flush=True)
        started = time.perf_counter()
        rows.append(run_row(ctx, check_id, name, check))
        print(
            f"llmux check: {check_id} {rows[-1].status} ({time.perf_counter() - started:.1f} s)",
            file=sys.stderr,
            flush=True,
        )
    if as_json:
        print(json.dumps({"url": options.url, "rows": [row.as_dict() for row in rows]}, indent=2))
    else:
        print(f"llmux check against {options.url}\n")
        print(table(rows))
        print(f"\n{summary(rows)}")
    return 1 if any(row.status == "fail" for row in rows) else 0

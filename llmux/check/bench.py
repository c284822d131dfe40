"""GPU against CPU (TST-020..022), through the admin benchmark (POST /admin/models/{id}/bench):
each model's fixed workload timed on a CPU copy and on the GPU through residency.

- TST-020: every model on transformers is at least 5x faster on the GPU.
- TST-021: every GGUF model on llama.cpp (n_gpu_layers -1 against 0) is at least 5x faster.
- TST-022: every text-to-speech model synthesizes faster than the audio plays, on the GPU.

Without a GPU the server runs only the CPU half: the rows show its figures and are skipped with
"no GPU" (failed where a GPU is expected: --production, --gpu, or a GPU on this host).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from llmux.check.context import Context
from llmux.check.http import HttpError
from llmux.check.rows import Row, failed, passed, skipped

SPEEDUP = 5.0
UNITS = {"tokens": "tokens/s", "audio seconds": "audio s/s", "texts": "texts/s"}


def _bench(ctx: Context, model: str) -> dict[str, Any]:
    result: dict[str, Any] = ctx.server.post(f"/admin/models/{model}/bench")
    return result


def _speed(run: dict[str, Any]) -> str:
    text = f"{run['device'].upper()} {run['seconds']:.2f} s ({run['rate']:.1f} {UNITS[run['unit']]}"
    if run.get("realtime_factor") is not None:
        text += f", {run['realtime_factor']:.2f} s per audio second"
    return text + ")"


def _rows(
    ctx: Context,
    models: list[dict[str, Any]],
    what: str,
    judge: Callable[[dict[str, Any]], str | None],
    goal: str,
) -> Row:
    """Bench each model; `judge` returns a problem with a result that has a GPU run, or None."""
    if not models:
        return ctx.absent(f"no {what} in this registry")
    details, problems, no_gpu = [], [], None
    for model in models:
        try:
            result = _bench(ctx, model["id"])
        except HttpError as exc:
            problems.append(f"{model['id']}: {exc}")
            details.append(f"{model['id']}: {exc}")
            continue
        line = f"{model['id']}: {_speed(result['cpu'])}"
        if result["gpu"] is None:
            no_gpu = result["gpu_missing"]
            details.append(f"{line}; no GPU run")
            continue
        details.append(f"{line}, {_speed(result['gpu'])}, speed-up {result['speedup']:.1f}x")
        if problem := judge(result):
            problems.append(f"{model['id']}: {problem}")
    figures = f"{len(models)} model{'s' if len(models) > 1 else ''}; {goal}"
    if problems:
        return failed("; ".join(problems), figures, details)
    if no_gpu is not None:
        if ctx.expect_gpu:
            return failed(f"{no_gpu}, but a GPU is expected here", figures, details)
        return skipped(no_gpu, figures, details)
    return passed(figures, details)


def _at_least_5x(result: dict[str, Any]) -> str | None:
    if (result["speedup"] or 0) < SPEEDUP:
        return f"only {result['speedup']:.1f}x faster on the GPU"
    return None


def transformers_models(ctx: Context) -> Row:
    """TST-020."""
    models = [m for m in ctx.admin_models if m["backend"] == "transformers"]
    return _rows(ctx, models, "transformers model", _at_least_5x, f"GPU >= {SPEEDUP:.0f}x CPU")


def gguf_models(ctx: Context) -> Row:
    """TST-021."""
    models = [m for m in ctx.admin_models if m["backend"] == "llamacpp"]
    return _rows(ctx, models, "GGUF model", _at_least_5x, f"GPU >= {SPEEDUP:.0f}x CPU")


def speech_models(ctx: Context) -> Row:
    """TST-022."""

    def faster_than_playback(result: dict[str, Any]) -> str | None:
        factor = result["gpu"]["realtime_factor"]
        return None if factor < 1 else f"{factor:.2f} s of synthesis per second of audio"

    models = [m for m in ctx.admin_models if m["type"] == "tts"]
    return _rows(
        ctx, models, "text-to-speech model", faster_than_playback, "GPU synthesis < audio length"
    )

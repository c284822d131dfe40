"""The residency scenarios (TST-016..019), driven with the admin loads and read from /health.

The models play roles picked from what the server has (GET /admin/models): the first
speech-to-text and text-to-speech models, the two smallest LLMs, and the largest LLM if it cannot
sit beside the other two kinds within the budget. On the production registry those are
cohere-transcribe, Chatterbox Turbo, Qwen3.5-4B, a Qwen3.5-9B and a GPT-OSS-20B, the models of the
scenario table in docs/residency.md. The scenarios change what is resident: they load and evict
as requests would.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from llmux.check.context import Context
from llmux.check.rows import Row, failed, passed

GIB = 1024**3


@dataclass(frozen=True)
class Roles:
    asr: dict[str, Any] | None
    tts: dict[str, Any] | None
    llms: list[dict[str, Any]]  # smallest first
    budget_bytes: int

    @staticmethod
    def of(ctx: Context) -> Roles:
        rows = ctx.admin_models
        first = {k: next((r for r in rows if r["type"] == k), None) for k in ("asr", "tts")}
        llms = sorted((r for r in rows if r["type"] == "llm"), key=lambda r: r["footprint_bytes"])
        return Roles(first["asr"], first["tts"], llms, int(ctx.health()["budget_bytes"]))

    def missing(self, llms: int) -> str | None:
        lacking = [
            what
            for what, here in (
                ("a speech-to-text model", self.asr),
                ("a text-to-speech model", self.tts),
                (f"{llms} LLMs", len(self.llms) >= llms or None),
            )
            if not here
        ]
        return f"not in this registry: needs {', '.join(lacking)}" if lacking else None

    def big(self) -> dict[str, Any] | None:
        """The largest LLM, when it cannot sit beside ASR and TTS within the budget."""
        assert self.asr is not None and self.tts is not None
        if not self.llms:
            return None
        largest = self.llms[-1]
        together = largest["footprint_bytes"] + self.asr["footprint_bytes"]
        return largest if together + self.tts["footprint_bytes"] > self.budget_bytes else None


def _load(ctx: Context, model: dict[str, Any]) -> None:
    ctx.server.post(f"/admin/models/{model['id']}/load")


def _resident(ctx: Context) -> tuple[set[str], str]:
    health = ctx.health()
    used = f"{health['used_bytes'] / GIB:.1f} of {health['budget_bytes'] / GIB:.1f} GB"
    return set(health["loaded_models"]), used


def _expect(
    ctx: Context, present: list[dict[str, Any]], absent: list[dict[str, Any]], what: str
) -> Row:
    resident, used = _resident(ctx)
    figures = f"resident: {', '.join(sorted(resident)) or 'nothing'} ({used})"
    missing = [m["id"] for m in present if m["id"] not in resident]
    stayed = [m["id"] for m in absent if m["id"] in resident]
    if missing or stayed:
        problems = [f"{', '.join(missing)} not resident"] if missing else []
        problems += [f"{', '.join(stayed)} still resident"] if stayed else []
        return failed(f"{what}: " + "; ".join(problems), figures)
    return passed(f"{what}: {figures}")


def asr_tts_llm(ctx: Context) -> Row:
    """TST-016: ASR, TTS and the smallest LLM resident together."""
    roles = Roles.of(ctx)
    if reason := roles.missing(llms=1):
        return ctx.absent(reason)
    assert roles.asr and roles.tts
    for model in (roles.asr, roles.tts, roles.llms[0]):
        _load(ctx, model)
    together = [roles.asr, roles.tts, roles.llms[0]]
    return _expect(ctx, together, [], " + ".join(m["id"] for m in together) + " together")


def switch_llm(ctx: Context) -> Row:
    """TST-017: the next LLM replaces the first (one LLM at a time) and sits beside ASR and TTS."""
    roles = Roles.of(ctx)
    if reason := roles.missing(llms=2):
        return ctx.absent(reason)
    assert roles.asr and roles.tts
    first, second = roles.llms[0], roles.llms[1]
    for model in (roles.asr, roles.tts, first, second):
        _load(ctx, model)
    return _expect(
        ctx, [roles.asr, roles.tts, second], [first], f"{second['id']} replaced {first['id']}"
    )


def big_llm(ctx: Context) -> Row:
    """TST-018: an LLM too big to sit beside ASR and TTS evicts them (and the other LLM)."""
    roles = Roles.of(ctx)
    if reason := roles.missing(llms=1):
        return ctx.absent(reason)
    big = roles.big()
    if big is None:
        return ctx.absent(_no_big(roles))
    assert roles.asr and roles.tts
    for model in (roles.asr, roles.tts, big):
        _load(ctx, model)
    others = [m for m in roles.llms if m is not big]
    return _expect(
        ctx, [big], [roles.asr, roles.tts, *others], f"{big['id']} evicted ASR, TTS and LLMs"
    )


def asr_after_big(ctx: Context) -> Row:
    """TST-019: an ASR request while the big LLM is resident evicts the LLM first."""
    roles = Roles.of(ctx)
    if reason := roles.missing(llms=1):
        return ctx.absent(reason)
    big = roles.big()
    if big is None:
        return ctx.absent(_no_big(roles))
    assert roles.asr
    for model in (big, roles.asr):
        _load(ctx, model)
    return _expect(ctx, [roles.asr], [big], f"{roles.asr['id']} evicted {big['id']}")


def _no_big(roles: Roles) -> str:
    assert roles.asr and roles.tts
    largest = roles.llms[-1]
    total = largest["footprint_bytes"] + roles.asr["footprint_bytes"] + roles.tts["footprint_bytes"]
    return (
        f"not in this registry: no LLM too big to sit beside ASR and TTS (the largest, "
        f"{largest['id']}, with them takes {total / GIB:.1f} of {roles.budget_bytes / GIB:.1f} GB)"
    )

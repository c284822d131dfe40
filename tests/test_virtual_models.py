"""Every production LLM virtual name reaches its chat template with the right settings.

The production registry (config/models.yaml) is loaded as it is; only its LLMs' weights are
swapped for the small Gemma GGUF with templates that print what they were given the way the real
ones decide on it (Qwen3.5: the generation prompt ends in `<think>` when thinking is on, in an
empty think block when off; gpt-oss: a `Reasoning:` line from `reasoning_effort`).
"""

from __future__ import annotations

import pytest

from llmux.core.config import Registry, load_registry
from llmux.services.chat_request import prepare_chat
from llmux.wire.chat import ChatCompletionRequest
from runners.llamacpp import LlamaCppChatRunner
from tests.conftest import GEMMA, REPO, real_models

pytestmark = real_models(GEMMA)

QWEN_LIKE = """{%- for m in messages %}<|im_start|>{{ m.role }}
{{ m.content }}<|im_end|>
{% endfor -%}
{%- if add_generation_prompt %}<|im_start|>assistant
{% if enable_thinking is defined and enable_thinking is false %}<think>

</think>

{% else %}<think>
{% endif %}{% endif %}"""
HARMONY_LIKE = """<|start|>system<|message|>Reasoning: {{ reasoning_effort | default('medium') }}\
<|end|>
{%- for m in messages %}<|start|>{{ m.role }}<|message|>{{ m.content }}<|end|>{% endfor -%}
<|start|>assistant"""

EXPECTED = {
    "Qwen3.5-9B-FP8-Thinking": "think-on",
    "Qwen3.5-9B-FP8-Instruct": "think-off",
    "Qwen3.5-9B-FP8-Uncensored-Thinking": "think-on",
    "Qwen3.5-9B-FP8-Uncensored-Instruct": "think-off",
    "Qwen3.5-4B-Thinking": "think-on",
    "Qwen3.5-4B-Instruct": "think-off",
    "GPT-OSS-20B-Low": "low",
    "GPT-OSS-20B-Medium": "medium",
    "GPT-OSS-20B-High": "high",
    "GPT-OSS-20B-Uncensored-Low": "low",
    "GPT-OSS-20B-Uncensored-Medium": "medium",
    "GPT-OSS-20B-Uncensored-High": "high",
}


@pytest.fixture(scope="module")
def registry() -> Registry:
    return load_registry(REPO / "config" / "models.yaml")


@pytest.fixture(scope="module")
def runners(registry: Registry, tmp_path_factory: pytest.TempPathFactory) -> dict:  # type: ignore[type-arg]
    templates = tmp_path_factory.mktemp("templates")
    (templates / "qwen.jinja").write_text(QWEN_LIKE)
    (templates / "harmony.jinja").write_text(HARMONY_LIKE)
    out = {}
    for physical_id, spec in registry.physical_models.items():
        if spec.type != "llm":
            continue
        template = "harmony.jinja" if "gpt-oss" in physical_id else "qwen.jinja"
        stand_in = spec.model_copy(
            update={
                "backend": "llamacpp",
                "model_file": GEMMA.name,
                "mmproj_file": None,
                "chat_template": str(templates / template),
                "context_length": 512,
            }
        )
        runner = LlamaCppChatRunner(physical_id, stand_in, GEMMA.parent)
        runner.load()
        out[physical_id] = runner
    yield out
    for runner in out.values():
        runner.unload()


def rendered(registry: Registry, runners: dict, name: str, **extra: object) -> str:  # type: ignore[type-arg]
    physical_id, physical, virtual = registry.resolve(name)  # type: ignore[misc]
    body = ChatCompletionRequest(model=name, messages=[{"role": "user", "content": "Hi"}], **extra)
    prepared = prepare_chat(body, physical_id, physical, virtual)
    return str(runners[physical_id].render_prompt(prepared.generation))


def test_all_twelve_llm_names_are_covered(registry: Registry) -> None:
    llm_names = {
        n
        for n, v in registry.virtual_models.items()
        if registry.physical_models[v.physical].type == "llm"
    }
    assert llm_names == set(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_virtual_name_reaches_its_template(registry: Registry, runners: dict, name: str) -> None:  # type: ignore[type-arg]
    prompt = rendered(registry, runners, name)
    expected = EXPECTED[name]
    if expected == "think-on":
        assert prompt.endswith("<|im_start|>assistant\n<think>\n")
    elif expected == "think-off":
        assert prompt.endswith("<think>\n\n</think>\n\n")
    else:
        assert f"Reasoning: {expected}<|end|>" in prompt


def test_request_reasoning_effort_overrides_the_virtual_level(
    registry: Registry, runners: dict
) -> None:  # type: ignore[type-arg]
    assert "Reasoning: high" in rendered(
        registry, runners, "GPT-OSS-20B-Low", reasoning_effort="high"
    )


def test_client_template_kwargs_win(registry: Registry, runners: dict) -> None:  # type: ignore[type-arg]
    prompt = rendered(
        registry, runners, "Qwen3.5-4B-Thinking", chat_template_kwargs={"enable_thinking": False}
    )
    assert prompt.endswith("<think>\n\n</think>\n\n")


def test_forced_tool_call_turns_thinking_off(registry: Registry, runners: dict) -> None:  # type: ignore[type-arg]
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    prompt = rendered(
        registry, runners, "Qwen3.5-9B-FP8-Thinking", tools=[tool], tool_choice="required"
    )
    assert prompt.endswith("<think>\n\n</think>\n\n")

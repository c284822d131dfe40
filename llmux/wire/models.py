"""GET /v1/models: OpenAI's list format, plus what each model is and can do."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel

from llmux.core.config import ModelType, Registry


class ModelCapabilities(BaseModel):
    chat: bool
    vision: bool
    tools: bool
    transcription: bool
    speech: bool
    embeddings: bool


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "llmux"
    type: ModelType
    physical_model: str
    capabilities: ModelCapabilities


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


def model_card(registry: Registry, name: str, created: int) -> ModelCard:
    virtual = registry.virtual_models[name]
    physical = registry.physical_models[virtual.physical]
    return ModelCard(
        id=name,
        created=created,
        type=physical.type,
        physical_model=virtual.physical,
        capabilities=ModelCapabilities(
            chat=physical.type == "llm",
            vision=physical.type == "llm" and physical.supports_vision,
            tools=physical.type == "llm" and physical.supports_tools,
            transcription=physical.type == "asr",
            speech=physical.type == "tts",
            embeddings=physical.type == "embedding",
        ),
    )

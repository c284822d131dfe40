"""The model registry file (models.yaml), validated when llmux starts.

Every field is described here; a bad file stops start-up with one message that names the file, the
entry and the field (`ConfigError`). Nothing here imports a backend: the registry is read by the
BentoML parent process too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from llmux.core.errors import BadRequest, ModelNotFound

ModelType = Literal["llm", "asr", "tts", "embedding"]

# Which backends exist and which model types each one can serve. A backend is a module in
# `runners/`.
BACKENDS: dict[str, frozenset[str]] = {
    "transformers": frozenset({"llm", "asr", "embedding"}),
    "llamacpp": frozenset({"llm"}),
    "faster_whisper": frozenset({"asr"}),
    "chatterbox": frozenset({"tts"}),
    "piper": frozenset({"tts"}),
}

# Output parser families for chat models (see llmux/parsers). `None` in the file picks the default
# for the model's name (qwen2* -> qwen2.5, qwen* -> qwen3.5, gpt-oss* -> harmony, else plain).
ParserName = Literal["plain", "qwen3.5", "qwen3", "qwen2.5", "harmony"]
ReasoningEffort = Literal["low", "medium", "high"]

GIB = 1024**3
ENDPOINT_BY_TYPE = {
    "llm": "/v1/chat/completions",
    "asr": "/v1/audio/transcriptions",
    "tts": "/v1/audio/speech",
    "embedding": "/v1/embeddings",
}
KIND_NAMES = {
    "llm": "chat",
    "asr": "speech-to-text",
    "tts": "text-to-speech",
    "embedding": "embedding",
}


class ConfigError(Exception):
    """A configuration file is unusable. The message names the file, the entry and the field."""


class StrictModel(BaseModel):
    """A config file's section: unknown keys are errors, values are read-only once loaded."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class PhysicalModel(StrictModel):
    """One set of weights that llmux can load onto the GPU."""

    type: ModelType = Field(
        description="llm (chat), asr (speech-to-text), tts (text-to-speech) or embedding."
    )
    backend: str = Field(description="Runner that loads it: " + ", ".join(sorted(BACKENDS)) + ".")
    model_id: str | None = Field(
        None, description="Hugging Face repository id; the download script fetches it."
    )
    path: str | None = Field(
        None,
        description="Where the weights are, relative to LLMUX_MODELS_DIR (or absolute). "
        "Default: the physical model's id.",
    )
    model_file: str | None = Field(
        None, description="llamacpp/piper: the weights file inside the model's directory."
    )
    mmproj_file: str | None = Field(
        None, description="llamacpp: the multimodal projector (vision) GGUF inside the directory."
    )
    estimated_vram_gb: float = Field(
        gt=0,
        description="Declared GPU footprint, used until a load on a GPU measures the real one.",
    )
    idle_ttl_s: float | None = Field(
        None, gt=0, description="Unload this model after it sat idle this long (seconds)."
    )
    supports_vision: bool = Field(False, description="Accepts image_url content parts.")
    supports_tools: bool = Field(False, description="Accepts tools; otherwise tools are ignored.")
    default_language: str | None = Field(
        None, description="asr/tts: language used when a request names none (e.g. en)."
    )
    variant: str | None = Field(None, description="chatterbox: original, turbo or multilingual.")
    voice_variation: float | None = Field(
        None,
        ge=0,
        le=1,
        description="piper: how much of the voice's trained randomness (its noise_scale and "
        "noise_w) to keep: 1 (default) speaks as trained, 0 says the same text identically "
        "every time.",
    )
    parser: ParserName | None = Field(
        None, description="llm: output parser family (plain, qwen3.5, qwen3, qwen2.5, harmony)."
    )
    context_length: int | None = Field(
        None, gt=0, description="llm: context window in tokens (llamacpp n_ctx; prompt cap)."
    )
    n_gpu_layers: int | None = Field(
        None, description="llamacpp: layers offloaded to the GPU; -1 (default) offloads all."
    )
    chat_template: str | None = Field(
        None,
        description="llm: a Jinja chat template file (relative to the config dir, or absolute), "
        "for weights that carry none.",
    )
    n_threads: int | None = Field(
        None,
        gt=0,
        description="llamacpp: CPU threads for prompt and generation. Default: the machine's "
        "physical cores (those this process may run on, within its cgroup's CPU quota).",
    )
    n_batch: int | None = Field(
        None,
        gt=0,
        description="llamacpp: prompt tokens evaluated per batch (llama.cpp's default 512); "
        "larger prefills long prompts faster on a GPU.",
    )
    flash_attn: bool | None = Field(
        None,
        description="llamacpp: flash attention (faster, smaller KV on a GPU). Default: off, "
        "llama-cpp-python's default.",
    )
    prefix_cache_mb: float | None = Field(
        None,
        ge=0,
        description="llm: host memory (MB) kept for the model states of recent long prompts, so "
        "that the next message of a chat does not prefill its tools again; 0 turns it off. "
        "transformers: requests generated one at a time keep the state at a 256-token page "
        "boundary of prompts of 1,024 tokens or more, in host memory (default 1024 MB); batched "
        "requests on a model with full attention in every layer reuse whole pages inside the "
        "continuous-batching cache, which 0 also stops.",
    )
    max_batch_size: int | None = Field(
        None,
        gt=0,
        description="transformers llm: concurrent requests generated together in one batch "
        "(continuous batching); 1 generates one request at a time. Default 8, for a text-only "
        "model whose layers transformers can page (full or sliding attention, sdpa or flash); "
        "others always generate one at a time.",
    )
    batch_cache_contexts: int | None = Field(
        None,
        ge=2,
        description="transformers llm that batches: the batch cache's size, in full contexts "
        "(prompt plus answer) of tokens; default and least 2 (with sliding-window layers, one "
        "context's pages can hold less than one full-length request). On a model whose layers "
        "are all full attention a request joins the batch once its prompt and max_tokens (the "
        "rest of the context when it sets none) fit beside the running ones, so this is how "
        "many requests without max_tokens run together. Each context costs the model's KV "
        "bytes per token times context_length of GPU memory, counted in its measured footprint.",
    )

    @property
    def footprint_bytes(self) -> int:
        return int(self.estimated_vram_gb * GIB)

    @model_validator(mode="after")
    def _backend_serves_type(self) -> PhysicalModel:
        if self.backend not in BACKENDS:
            raise ValueError(
                f"backend {self.backend!r} does not exist; choose one of {sorted(BACKENDS)}"
            )
        if self.type not in BACKENDS[self.backend]:
            raise ValueError(f"backend {self.backend!r} cannot serve type {self.type!r}")
        if self.backend == "llamacpp" and not self.model_file:
            raise ValueError("a llamacpp model needs model_file (the GGUF inside its directory)")
        if self.backend == "chatterbox" and self.variant not in (
            "original",
            "turbo",
            "multilingual",
        ):
            raise ValueError("a chatterbox model needs variant: original, turbo or multilingual")
        return self

    def output_parser(self, physical_id: str) -> ParserName:
        """`parser` if set, else the family the model's id names (gpt-oss, qwen), else plain."""
        if self.parser:
            return self.parser
        if "gpt-oss" in physical_id:
            return "harmony"
        if "qwen2" in physical_id:
            return "qwen2.5"
        if "qwen" in physical_id:
            return "qwen3.5"
        return "plain"

    def weights_path(self, physical_id: str, models_dir: Path) -> Path:
        """Where this model's weights live: `path`, else `<models_dir>/<physical id>`."""
        return models_dir / (self.path or physical_id)


class VirtualParams(StrictModel):
    """Behaviour a virtual model adds to its physical model. Switching costs no load."""

    enable_thinking: bool | None = Field(
        None, description="Qwen-style templates: thinking on (True) or off (False)."
    )
    reasoning_effort: ReasoningEffort | None = Field(
        None, description="gpt-oss: the reasoning level passed to the chat template."
    )


class VirtualModel(StrictModel):
    """A name clients see, mapping to one physical model plus behaviour."""

    physical: str = Field(description="Id of a physical model in this file.")
    params: VirtualParams = Field(default_factory=VirtualParams)
    system_prompt: str | None = Field(
        None,
        description="llm: a system message put before the conversation when the client sends "
        "none (a client's own system message wins).",
    )
    temperature: float | None = Field(
        None, ge=0, le=2, description="llm: the sampling temperature when the client sets none."
    )


class Registry(StrictModel):
    """The whole models.yaml."""

    gpu_budget_gb: float | None = Field(
        None,
        gt=0,
        description="GPU memory llmux may fill; with a GPU, never more than the GPU's total less "
        "gpu_margin_gb. Default: the GPU's total less the margin (16 without a GPU).",
    )
    gpu_margin_gb: float = Field(
        1.0,
        ge=0,
        description="GPU memory kept free beside the models: the CUDA context, library "
        "workspaces and allocator fragmentation, which measured footprints do not cover.",
    )
    host_budget_gb: float | None = Field(
        None,
        ge=0,
        description="Host memory the warm tier may fill with models evicted from the GPU, kept "
        "there so that switching back skips the disk; 0 turns the warm tier off. Default: half "
        "the machine's memory, never more than what is available at start-up less 2 GB (and, "
        "without a GPU, less the GPU budget: the resident models are in host memory too).",
    )
    preload: list[str] = Field(
        default_factory=list,
        description="Physical models loaded, in this order, after start-up (through the "
        "residency rules, in the background: /health answers meanwhile).",
    )
    idle_ttl_s: float | None = Field(
        None,
        gt=0,
        description="Unload a model idle this long (seconds); per model with idle_ttl_s there. "
        "Default: none, a model stays until its room is needed.",
    )
    physical_models: dict[str, PhysicalModel]
    virtual_models: dict[str, VirtualModel]

    @model_validator(mode="after")
    def _virtuals_point_at_physicals(self) -> Registry:
        for name, virtual in self.virtual_models.items():
            if virtual.physical not in self.physical_models:
                raise ValueError(
                    f"virtual_models.{name}.physical: {virtual.physical!r} is not a physical model "
                    f"(known: {', '.join(sorted(self.physical_models))})"
                )
        for name in self.preload:
            if name not in self.physical_models:
                raise ValueError(
                    f"preload: {name!r} is not a physical model "
                    f"(known: {', '.join(sorted(self.physical_models))})"
                )
        return self

    def idle_ttl(self, physical_id: str) -> float | None:
        """How long `physical_id` may sit idle before it is unloaded; None: no limit."""
        own = self.physical_models[physical_id].idle_ttl_s
        return own if own is not None else self.idle_ttl_s

    def require(
        self, virtual_name: str, model_type: ModelType
    ) -> tuple[str, PhysicalModel, VirtualModel]:
        """`resolve` for an endpoint that serves `model_type`: ModelNotFound (404) for an unknown
        name, BadRequest (400) naming the right endpoint for a model of another type."""
        resolved = self.resolve(virtual_name)
        if resolved is None:
            raise ModelNotFound(virtual_name)
        if resolved[1].type != model_type:
            kind = resolved[1].type
            raise BadRequest(
                f"{virtual_name!r} is a {kind} model ({KIND_NAMES[kind]}): use "
                f"{ENDPOINT_BY_TYPE[kind]}.",
                param="model",
            )
        return resolved

    def resolve(self, virtual_name: str) -> tuple[str, PhysicalModel, VirtualModel] | None:
        """(physical id, physical model, virtual model) for a client-visible name, or None."""
        virtual = self.virtual_models.get(virtual_name)
        if virtual is None:
            return None
        return virtual.physical, self.physical_models[virtual.physical], virtual


class _UniqueKeyLoader(yaml.SafeLoader):
    """A YAML loader that refuses duplicate keys instead of silently keeping the last one."""


def _construct_unique_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    mapping: dict[Any, Any] = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node)
        if key in mapping:
            raise ConfigError(f"duplicate name {key!r} (line {key_node.start_mark.line + 1})")
        mapping[key] = loader.construct_object(value_node, deep=True)
    return mapping


_UniqueKeyLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_unique_mapping
)


def read_yaml(path: Path) -> Any:
    """Parse a YAML file, refusing duplicate keys; errors name the file."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from exc
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc


def describe_validation_error(path: Path, exc: ValidationError) -> str:
    """One line per problem: file, dotted location (entry and field), what is wrong."""
    lines = []
    for err in exc.errors():
        where = ".".join(str(part) for part in err["loc"])
        message = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            message = "unknown field"
        lines.append(f"{path}: {where}: {message}" if where else f"{path}: {message}")
    return "\n".join(lines)


def load_registry(path: Path) -> Registry:
    """Read and validate models.yaml; raise ConfigError naming the file, entry and field."""
    data = read_yaml(path)
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping with physical_models and virtual_models")
    for entry in (data.get("physical_models") or {}).values():
        template = entry.get("chat_template") if isinstance(entry, dict) else None
        if isinstance(template, str):
            entry["chat_template"] = str(path.parent / template)  # absolute stays absolute
            if not Path(entry["chat_template"]).is_file():
                raise ConfigError(f"{path}: chat_template {template!r} is not a file")
    try:
        return Registry.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(describe_validation_error(path, exc)) from None

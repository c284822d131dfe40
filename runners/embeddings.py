"""Text embeddings: what an embedding runner offers, and a sentence-transformers model on
Hugging Face transformers.

The weights directory is a sentence-transformers folder: the transformer (`config.json`,
safetensors, tokenizer) plus `modules.json`, which lists what runs after it. This runner applies
what such folders use for plain sentence embeddings: the pooling in the Pooling module's
`config.json` (mean, cls, max or mean_sqrt_len) and an L2 normalization when a `Normalize` module
is listed (it has no folder of its own, so its presence in `modules.json` is all there is to
read). A folder that lists anything else (a Dense projection, say) is refused at load: serving
it without that module would return vectors that only look right.
"""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

import numpy as np

from llmux.core.config import PhysicalModel
from llmux.core.errors import BadRequest
from runners.base import (
    Device,
    ModelLoadError,
    NotLoaded,
    Runner,
    free_device_memory,
    park_torch_modules,
    require_backend,
    require_files,
    torch_bytes,
    torch_device,
    torch_device_bytes,
    unpark_torch_modules,
)

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

Pooling = Literal["mean", "cls", "max", "mean_sqrt_len"]

# The Pooling module's config keys, as sentence-transformers writes them, and the mode each picks.
POOLING_KEYS: dict[str, Pooling] = {
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len",
}
# sentence-transformers module classes this runner applies (by class name; the package path
# differs between sentence-transformers versions).
APPLIED_MODULES = frozenset({"Transformer", "Pooling", "Normalize"})


@dataclass(frozen=True)
class Embeddings:
    vectors: np.ndarray  # float32, (inputs, dimensions), in the order of the inputs
    token_counts: tuple[int, ...]  # tokens each input took, special tokens included


class EmbedRunner(Runner, Protocol):
    """A text-embedding model.

    `embed` blocks (call it on a worker thread, never on the event loop) and may be called from
    several threads at once: a runner serializes inference itself where its backend needs it. It
    must only be called between `load()` and `unload()`, which `Residency.use` ensures.
    `dimensions` (the length of every vector) and `max_input_tokens` are known once loaded.
    """

    dimensions: int
    max_input_tokens: int

    def embed(self, inputs: list[str] | list[list[int]]) -> Embeddings:
        """One vector per input, in order. Strings are tokenized with the model's special tokens;
        token-id lists are the model's input as they are (nothing is added). An input over
        `max_input_tokens`, or a token id outside the vocabulary, is a `BadRequest` naming
        `input`: an input is never silently truncated."""
        ...


@dataclass(frozen=True)
class SentenceLayout:
    """What the sentence-transformers files around the transformer ask for."""

    pooling: Pooling
    normalize: bool
    max_seq_length: int | None  # sentence_bert_config.json's; None: the tokenizer's limit


def read_sentence_layout(physical_id: str, weights: Path) -> SentenceLayout:
    """The pooling, normalization and input limit the folder's own files describe. A folder
    without them (a plain transformers checkpoint) gets mean pooling, unnormalized."""
    modules = _read_json(physical_id, weights / "modules.json") or []
    kinds = {str(module.get("type", "")).rsplit(".", 1)[-1]: module for module in modules}
    unapplied = sorted(set(kinds) - APPLIED_MODULES)
    if unapplied:
        raise ModelLoadError(
            f"Model {physical_id!r}: its modules.json lists {', '.join(unapplied)}, which the "
            f"transformers embedding runner does not apply (it applies "
            f"{', '.join(sorted(APPLIED_MODULES))}); its embeddings would be wrong."
        )
    pooling_dir = str(kinds.get("Pooling", {}).get("path") or "1_Pooling")
    pooling_config = _read_json(physical_id, weights / pooling_dir / "config.json") or {}
    sentence_config = _read_json(physical_id, weights / "sentence_bert_config.json") or {}
    return SentenceLayout(
        pooling=_pooling_mode(physical_id, pooling_config),
        normalize="Normalize" in kinds,
        max_seq_length=sentence_config.get("max_seq_length"),
    )


def _pooling_mode(physical_id: str, config: dict[str, Any]) -> Pooling:
    chosen = sorted(key for key, on in config.items() if key.startswith("pooling_mode_") and on)
    unknown = [key for key in chosen if key not in POOLING_KEYS]
    if unknown or len(chosen) > 1:
        # Several modes would be concatenated by sentence-transformers; that is not served.
        raise ModelLoadError(
            f"Model {physical_id!r}: its pooling config asks for {', '.join(chosen)}; the "
            f"transformers embedding runner pools with exactly one of "
            f"{', '.join(POOLING_KEYS.values())}."
        )
    return POOLING_KEYS[chosen[0]] if chosen else "mean"


def _read_json(physical_id: str, path: Path) -> Any:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"Model {physical_id!r}: cannot read {path}: {exc}") from exc


def pool(hidden: torch.Tensor, mask: torch.Tensor, pooling: Pooling) -> torch.Tensor:
    """One vector per row of `hidden` (batch, tokens, dim). `mask` (batch, tokens) is 1 for real
    tokens and 0 for padding, which must not count. Rows are padded on the right, so the first
    token is the model's own (CLS) in every row."""
    if pooling == "cls":
        return hidden[:, 0]
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    if pooling == "max":
        return hidden.masked_fill(weights == 0, float("-inf")).amax(dim=1)
    summed = (hidden * weights).sum(dim=1)
    counts = weights.sum(dim=1).clamp(min=1e-9)
    return summed / (counts.sqrt() if pooling == "mean_sqrt_len" else counts)


@dataclass
class _Loaded:
    model: Any
    tokenizer: Any
    device: str
    layout: SentenceLayout
    pad_id: int
    vocab_size: int


class TransformersEmbeddingRunner:
    """An `EmbedRunner` for a sentence-transformers folder, on transformers' AutoModel.

    Every input of a request goes through the model in one padded batch. One batch at a time per
    model (`_lock`): two concurrent forward passes would each take activation memory the
    measured footprint does not include.
    """

    def __init__(
        self, physical_id: str, spec: PhysicalModel, weights: Path, *, device: Device = "auto"
    ) -> None:
        self.physical_id = physical_id
        self.spec = spec
        self.weights = weights
        self.device: Device = device
        self.dimensions = 0
        self.max_input_tokens = 0
        self._lock = threading.Lock()
        self._loaded: _Loaded | None = None

    def preflight(self) -> None:
        require_backend(self.physical_id, "torch", "transformers")
        require_files(self.physical_id, self.weights / "config.json")

    def load(self) -> None:
        self.preflight()
        layout = read_sentence_layout(self.physical_id, self.weights)  # refuse before the weights
        import torch  # heavy; only when the model loads
        from safetensors import SafetensorError
        from transformers import AutoModel, AutoTokenizer

        device = torch_device(self.device)
        try:
            tokenizer = AutoTokenizer.from_pretrained(self.weights, local_files_only=True)
            # float32 everywhere: an encoder this size costs little, and a vector should not
            # depend on which device happened to compute it.
            model = AutoModel.from_pretrained(
                self.weights, dtype=torch.float32, local_files_only=True
            )
        except (OSError, ValueError, SafetensorError) as exc:
            raise ModelLoadError(
                f"Model {self.physical_id!r}: transformers could not load {self.weights}: {exc}"
            ) from exc
        model = model.to(device).eval()
        self.max_input_tokens = self._input_limit(layout, tokenizer, model.config)
        self.dimensions = int(model.config.hidden_size)
        self._loaded = _Loaded(
            model=model,
            tokenizer=tokenizer,
            device=device,
            layout=layout,
            pad_id=tokenizer.pad_token_id or 0,
            vocab_size=int(model.get_input_embeddings().num_embeddings),
        )
        log.info(
            "loaded %s from %s on %s (%d dimensions, %s pooling%s, %d tokens per input)",
            self.physical_id,
            self.weights,
            device,
            self.dimensions,
            layout.pooling,
            ", normalized" if layout.normalize else "",
            self.max_input_tokens,
        )

    def _input_limit(self, layout: SentenceLayout, tokenizer: Any, config: Any) -> int:
        """sentence_bert_config.json's max_seq_length, else the tokenizer's; never more
        positions than the model has."""
        positions = getattr(config, "max_position_embeddings", None)
        limit = layout.max_seq_length or tokenizer.model_max_length
        limit = min(limit, positions) if positions else limit
        if not limit or limit > 1_000_000:  # transformers' "unset" is a huge number
            raise ModelLoadError(
                f"Model {self.physical_id!r}: neither sentence_bert_config.json, its tokenizer "
                "nor its config says how many tokens an input may take; set max_seq_length in "
                "sentence_bert_config.json."
            )
        return int(limit)

    def unload(self) -> None:
        loaded, self._loaded = self._loaded, None
        on_cuda = loaded is not None and loaded.device == "cuda"
        del loaded
        free_device_memory(on_cuda)

    def device_bytes(self) -> int | None:
        return None if self._loaded is None else torch_device_bytes(self._loaded.model)

    # --- Parkable -----------------------------------------------------------------------------

    def park(self) -> None:
        loaded = self._require()
        park_torch_modules(self.physical_id, loaded.device, loaded.model)

    def unpark(self) -> None:
        loaded = self._require()
        unpark_torch_modules(self.physical_id, loaded.device, loaded.model)

    def _require(self) -> _Loaded:
        if self._loaded is None:
            raise NotLoaded(self.physical_id)
        return self._loaded

    def host_bytes(self) -> int:
        return 0 if self._loaded is None else torch_bytes(self._loaded.model)

    def embed(self, inputs: list[str] | list[list[int]]) -> Embeddings:
        loaded = self._loaded
        if loaded is None:
            raise NotLoaded(self.physical_id)
        if not inputs:
            return Embeddings(np.zeros((0, self.dimensions), np.float32), ())
        if isinstance(inputs[0], str):
            # verbose=False: the limit is checked below, with a message the client can act on.
            encoded = loaded.tokenizer(inputs, add_special_tokens=True, verbose=False)
            rows: list[list[int]] = [list(ids) for ids in encoded["input_ids"]]
        else:
            rows = [list(ids) for ids in inputs]
        self._refuse_unfit(rows, loaded.vocab_size)
        import torch

        width = max(len(row) for row in rows)
        input_ids = torch.tensor(
            [row + [loaded.pad_id] * (width - len(row)) for row in rows], device=loaded.device
        )
        mask = torch.tensor(
            [[1] * len(row) + [0] * (width - len(row)) for row in rows], device=loaded.device
        )
        with self._lock, torch.inference_mode():
            hidden = loaded.model(input_ids=input_ids, attention_mask=mask).last_hidden_state
            vectors = pool(hidden, mask, loaded.layout.pooling)
            if loaded.layout.normalize:
                vectors = torch.nn.functional.normalize(vectors, p=2, dim=1)
            result = vectors.float().cpu().numpy()
        return Embeddings(vectors=result, token_counts=tuple(len(row) for row in rows))

    def _refuse_unfit(self, rows: list[list[int]], vocab_size: int) -> None:
        for index, row in enumerate(rows):
            if len(row) > self.max_input_tokens:
                raise BadRequest(
                    f"Input {index} is {len(row)} tokens; model {self.physical_id!r} takes at "
                    f"most {self.max_input_tokens} tokens per input. Shorten it or split it "
                    "into several inputs.",
                    param="input",
                )
            unknown = [token for token in row if token >= vocab_size]
            if unknown:
                raise BadRequest(
                    f"Input {index} has token id {unknown[0]}, outside the vocabulary of model "
                    f"{self.physical_id!r} ({vocab_size} tokens).",
                    param="input",
                )

"""Chat on Hugging Face transformers: a model directory, or a GGUF file inside one.

Loading: vision models (`supports_vision`) with `AutoModelForImageTextToText` and their
processor, others with `AutoModelForCausalLM` and `AutoTokenizer`; on CUDA when there is one,
else the CPU; dtype from the checkpoint (a GGUF is dequantized: float32 on the CPU, bfloat16 on a
GPU). An MXFP4 checkpoint (gpt-oss) that transformers would silently dequantize to ~3x its size is
refused before any weight is read (`runners.mxfp4`).

The prompt is the chat template (the weights' own, or the registry's `chat_template` file) with
`tools`, `add_generation_prompt=True` and the request's template kwargs as variables.

Generation (`generate`): greedy or sampled with a per-request generator (`runners.sampling`),
optionally constrained to a JSON schema (`runners.constrained`), streamed token by token
(`runners.token_stream`). Special tokens stay in the text only for the harmony family (gpt-oss),
whose parser reads them; for everything else they are dropped.

Two paths (`batches` says which a request takes):
- Continuous batching (`runners.batching`), for a text-only model whose every layer has a paged
  cache (full or sliding attention; not Qwen3.5's linear attention) when `max_batch_size` (default
  `DEFAULT_MAX_BATCH_SIZE`) is over 1: up to that many generations run together, and complete
  cache pages of earlier prompts are reused. It takes unseeded requests without a JSON schema.
- One at a time (`model.generate`): vision models, seeded and JSON-schema requests, and every
  request of a model that cannot batch. The load logs why a model does not batch. A long text
  prompt continues from the kept state of an earlier prompt's prefix and leaves its own
  (`runners.prefix_snapshots`, up to `prefix_cache_mb` of host memory).

Threading: `load`, `unload`, `render_prompt` and `generate` block and run on the caller's worker
thread. A one-at-a-time `generate` adds one inner thread for `model.generate`, joined before it
returns or is closed; batched ones wait for the batch loop's thread. A one-at-a-time generation
must run alone (the chat session admits it alone; batched generations may overlap each other up
to `batch_size`): some models keep per-call state on the module (Qwen-VL's rope deltas).
"""

from __future__ import annotations

import contextlib
import inspect
import io
import logging
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from llmux.core.config import PhysicalModel
from llmux.core.errors import BadRequest
from runners.base import (
    Device,
    ModelLoadError,
    NotLoaded,
    OutOfDeviceMemory,
    completion_budget,
    free_device_memory,
    park_torch_modules,
    require_backend,
    require_files,
    require_gguf,
    torch_bytes,
    torch_device,
    torch_device_bytes,
    unpark_torch_modules,
)
from runners.batching import BatchingFailed, ContinuousBatcher
from runners.chat import CheckedPrompts, GenerationChunk, GenerationRequest
from runners.constrained import JsonSchemaConstraints
from runners.mxfp4 import is_mxfp4_checkpoint, mxfp4_blockers, probe_mxfp4_environment
from runners.prefix_snapshots import PrefixSnapshots
from runners.sampling import make_sampler
from runners.token_stream import IncrementalDetokenizer, stream_tokens

if TYPE_CHECKING:
    import torch
    from openai_harmony import HarmonyEncoding
    from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger("llmux.runners.transformers")

# Without `context_length` in models.yaml: the model's max_position_embeddings, at most this
# (Qwen3.5 advertises 262,144 tokens, whose KV cache would not fit beside the weights).
MAX_DEFAULT_CONTEXT = 32768
# Turn-ending tokens that stop generation when the vocabulary has them, besides the checkpoint's
# eos ids: a GGUF carries one eos (Gemma's `<eos>`) but its chat turns end with `<end_of_turn>`.
# Harmony's `<|end|>` is not among them: it ends a message, and the final answer follows it.
END_OF_TURN_TOKENS = (
    "<end_of_turn>",
    "<|im_end|>",
    "<|eot_id|>",
    "<|endoftext|>",
    "<|return|>",
    "<|call|>",
)
# Without `max_batch_size` in models.yaml: generations batched together on a model that can batch.
DEFAULT_MAX_BATCH_SIZE = 8
# Without `batch_cache_contexts`: the batch cache holds this many full contexts (prompt plus
# answer) of tokens; sequences that do not fit wait for room (`runners.batching.CacheRoom`).
# Pages no sequence uses stay there for prefix reuse until needed.
BATCH_CACHE_CONTEXTS = 2
# Prompts encoded by `check`, kept for the `generate` of the same request object.
ENCODED_KEPT = 64
# The one-at-a-time path's prefix snapshots (`runners.prefix_snapshots`): host memory for them
# without `prefix_cache_mb`, the prompts long enough to snapshot, the page their points fall on,
# and the tokens left out at a prompt's end (its generation prompt, rendered otherwise next time).
DEFAULT_PREFIX_CACHE_MB = 1024
SNAPSHOT_MIN_TOKENS = 1024
SNAPSHOT_PAGE_TOKENS = 256
SNAPSHOT_MARGIN_TOKENS = 16


@dataclass
class _Loaded:
    """Everything `load` made; `unload` drops it whole."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    processor: Any  # the vision processor, None for text-only models
    template: str
    device: torch.device
    stop_token_ids: tuple[int, ...]
    constraints: JsonSchemaConstraints


class TransformersChatRunner:
    """A chat model on transformers. Construction is cheap; `load` reads the weights."""

    def __init__(
        self, physical_id: str, spec: PhysicalModel, weights: Path, *, device: Device = "auto"
    ) -> None:
        self.physical_id = physical_id
        self.spec = spec
        self.weights = weights
        self.device: Device = device
        # Known for sure after `load` (read from the model's config unless models.yaml sets it).
        self.context_length = spec.context_length or MAX_DEFAULT_CONTEXT
        # openai-harmony's encoding, built on first ask (see `harmony_encoding`) until unload.
        self._harmony: HarmonyEncoding | None = None
        self._harmony_built = False
        self._loaded: _Loaded | None = None
        self._batcher: ContinuousBatcher | None = None
        # id(request) -> (the request, its encoded prompt): `check` encodes, `generate` reuses.
        self._encoded: CheckedPrompts[Any] = CheckedPrompts(ENCODED_KEPT)
        self._snapshots: PrefixSnapshots | None = None

    # --- Runner -------------------------------------------------------------------------------

    def preflight(self) -> None:
        require_backend(self.physical_id, "torch", "transformers")
        gguf_file = self.spec.model_file
        if gguf_file:
            require_gguf(self.physical_id, self.weights / gguf_file)
        else:
            require_files(self.physical_id, self.weights / "config.json")
        if gguf_file and self.spec.supports_vision:
            raise ModelLoadError(
                f"{self.physical_id!r}: transformers reads only text models from a GGUF file; "
                "serve this one with backend llamacpp (model_file + mmproj_file)."
            )

    def load(self) -> None:
        if self._loaded is not None:
            return
        self.preflight()
        gguf_file = self.spec.model_file
        marker = self.weights / (gguf_file or "config.json")
        import torch
        import transformers

        device = torch.device(torch_device(self.device))
        config = self._read_config(transformers)
        self._refuse_silent_dequantization(config)
        processor: Any = None
        out_of_memory: str | None = None
        try:
            if self.spec.supports_vision:
                processor = _load_processor(self.weights)
                tokenizer = processor.tokenizer
                model_class: Any = transformers.AutoModelForImageTextToText
            else:
                tokenizer = transformers.AutoTokenizer.from_pretrained(
                    self.weights, gguf_file=gguf_file
                )
                model_class = transformers.AutoModelForCausalLM
            template = self._chat_template(processor, tokenizer)  # refuse before the weights
            # A GGUF is dequantized; "auto" would keep float32 even on a GPU.
            dtype: Any = (
                "auto"
                if not gguf_file
                else (torch.float32 if device.type == "cpu" else torch.bfloat16)
            )
            model = model_class.from_pretrained(
                self.weights,
                config=config,
                gguf_file=gguf_file,
                dtype=dtype,
                device_map=str(device),
            )
        except torch.cuda.OutOfMemoryError as exc:
            # Freed below, once this block has let go of the exception: its traceback still
            # references the half-loaded tensors, so emptying the cache here would free nothing.
            out_of_memory = str(exc)
        except (OSError, ValueError, ImportError) as exc:
            raise ModelLoadError(
                f"transformers could not load {self.physical_id!r} from {marker}: {exc}"
            ) from exc
        if out_of_memory is not None:
            free_device_memory(on_cuda=True)
            raise OutOfDeviceMemory(
                f"{self.physical_id!r} does not fit in the free GPU memory: {out_of_memory}"
            )
        model.eval()
        text_config = config.get_text_config()
        if self.spec.context_length is None:
            self.context_length = min(
                getattr(text_config, "max_position_embeddings", None) or MAX_DEFAULT_CONTEXT,
                MAX_DEFAULT_CONTEXT,
            )
        stop_ids = _stop_token_ids(model, text_config, tokenizer)
        # Requests follow OpenAI's sampling semantics, so the checkpoint's sampling advice
        # (generation_config.json: temperature, top_k, repetition_penalty, ...) is dropped; left
        # in place, generate would fill every field a request leaves unset with it. Its eos ids
        # are kept, in `stop_ids`.
        model.generation_config = transformers.GenerationConfig(
            eos_token_id=list(stop_ids),
            pad_token_id=stop_ids[0] if tokenizer.pad_token_id is None else tokenizer.pad_token_id,
        )
        self._loaded = _Loaded(
            model=model,
            tokenizer=tokenizer,
            processor=processor,
            template=template,
            device=device,
            stop_token_ids=stop_ids,
            constraints=JsonSchemaConstraints(tokenizer, text_config.vocab_size, stop_ids),
        )
        log.info(
            "loaded %s on %s (%s, context %d)",
            self.physical_id,
            device,
            model.dtype,
            self.context_length,
        )
        self._start_batching(self._loaded)
        if self.spec.prefix_cache_mb != 0:
            budget_mb = self.spec.prefix_cache_mb or DEFAULT_PREFIX_CACHE_MB
            self._snapshots = PrefixSnapshots(
                int(budget_mb * 2**20),
                page_tokens=SNAPSHOT_PAGE_TOKENS,
                min_tokens=SNAPSHOT_MIN_TOKENS,
                margin=SNAPSHOT_MARGIN_TOKENS,
            )

    def unload(self) -> None:
        self._stop_batching()
        self._snapshots = None
        loaded, self._loaded = self._loaded, None
        self._harmony, self._harmony_built = None, False
        on_cuda = loaded is not None and loaded.device.type == "cuda"
        del loaded
        free_device_memory(on_cuda)

    def device_bytes(self) -> int | None:
        if self._loaded is None:
            return None
        model_bytes = torch_device_bytes(self._loaded.model)
        if model_bytes is None or self._batcher is None:
            return model_bytes
        return model_bytes + self._batcher.cache_bytes()

    # --- Parkable -----------------------------------------------------------------------------

    def park(self) -> None:
        loaded = self._require()
        self._stop_batching()  # its cache lives on the device
        park_torch_modules(self.physical_id, loaded.device, loaded.model)

    def unpark(self) -> None:
        loaded = self._require()
        unpark_torch_modules(self.physical_id, loaded.device, loaded.model)
        self._start_batching(loaded)

    def host_bytes(self) -> int:
        return 0 if self._loaded is None else torch_bytes(self._loaded.model)

    def harmony_encoding(self) -> HarmonyEncoding | None:
        if not self._harmony_built:
            self._require()
            self._harmony, self._harmony_built = _harmony_encoding(self.weights), True
        return self._harmony

    # --- ChatRunner ---------------------------------------------------------------------------

    def render_prompt(self, request: GenerationRequest) -> str:
        loaded = self._require()
        reserved = _reserved_template_arguments(loaded.tokenizer)
        dropped = sorted(set(request.template_kwargs) & reserved)
        if dropped:
            log.warning(
                "ignoring template kwargs that name apply_chat_template's own arguments: %s",
                ", ".join(dropped),
            )
        variables = {k: v for k, v in request.template_kwargs.items() if k not in reserved}
        import jinja2

        try:
            prompt = loaded.tokenizer.apply_chat_template(
                request.messages,
                tools=cast(Any, request.tools),
                chat_template=loaded.template,
                add_generation_prompt=True,
                tokenize=False,
                **variables,
            )
        except jinja2.TemplateError as exc:
            raise BadRequest(
                f"The chat template refused the messages: {exc}", param="messages"
            ) from exc
        assert isinstance(prompt, str)
        return prompt

    @property
    def batch_size(self) -> int:
        """How many generations that `batches` admits may run at once (1 when none batch)."""
        return 1 if self._batcher is None else self._batcher.batch_size

    def batches(self, request: GenerationRequest) -> bool:
        """Whether `generate` runs this request in the continuous batch, beside up to
        `batch_size - 1` others; otherwise it must run alone. Text-only, unseeded requests
        without a JSON schema batch, on a model that batches."""
        batcher = self._batcher
        return (
            batcher is not None
            and batcher.failure() is None
            and not request.images
            and request.seed is None
            and request.json_schema is None
        )

    def check(self, request: GenerationRequest) -> None:
        loaded = self._require()
        inputs = self._encode(loaded, self.render_prompt(request), request.images)
        self._encoded.keep(request, inputs)
        completion_budget(
            self.physical_id,
            self.context_length,
            int(inputs["input_ids"].shape[1]),
            request.max_tokens,
        )
        if request.json_schema is not None:
            loaded.constraints.logits_processor(request.json_schema)

    def generate(
        self, request: GenerationRequest, cancel: threading.Event
    ) -> Iterator[GenerationChunk]:
        """Blocking, on the caller's worker thread (see the module docstring for threads).

        Sampling follows OpenAI: temperature 1 and top_p 1 when unset, temperature 0 is greedy;
        `seed` makes sampling reproducible. Without `max_tokens` the answer may fill the context.
        `completion_tokens` counts the answer's tokens, not the one that ended the turn (as the
        llama.cpp runner does), though that token's id is still yielded for the parsers.
        Raises `BadRequest` for a prompt that does not fit the context, unreadable images or an
        unusable JSON schema, before anything is generated."""
        loaded = self._require()
        inputs = self._encoded.take(request)
        if inputs is None:
            inputs = self._encode(loaded, self.render_prompt(request), request.images)
        prompt_tokens = int(inputs["input_ids"].shape[1])
        budget = completion_budget(
            self.physical_id, self.context_length, prompt_tokens, request.max_tokens
        )
        if cancel.is_set():
            yield GenerationChunk(
                finish_reason="stop", prompt_tokens=prompt_tokens, completion_tokens=0
            )
            return
        detokenizer = IncrementalDetokenizer(
            loaded.tokenizer, skip_special_tokens=not request.keep_special_tokens
        )
        produced, last = 0, None
        batcher = self._batcher
        if batcher is not None and self.batches(request):
            sampler = make_sampler(request.temperature, request.top_p, None, loaded.device)
            token_stream: Iterator[int] = batcher.generate(
                inputs["input_ids"][0].tolist(), budget, sampler, cancel
            )
        else:
            generate_kwargs = self._generate_kwargs(loaded, request, budget)
            cache = self._prefilled_prefix(loaded, request, inputs)
            if cache is not None:
                generate_kwargs["past_key_values"] = cache
            token_stream = stream_tokens(
                loaded.model,
                inputs,
                generate_kwargs,
                cancel,
                thread_name=f"generate-{self.physical_id}",
            )
        try:
            with contextlib.closing(token_stream) as tokens:  # type: ignore[type-var]
                for token in tokens:
                    last = token
                    produced += token not in loaded.stop_token_ids
                    yield GenerationChunk(text=detokenizer.push([token]), token_ids=(token,))
        except BatchingFailed as exc:
            self._drop_failed_batcher(batcher, exc)
            raise
        hit_limit = produced >= budget and last not in loaded.stop_token_ids
        yield GenerationChunk(
            text=detokenizer.flush(),
            finish_reason="length" if hit_limit else "stop",
            prompt_tokens=prompt_tokens,
            completion_tokens=produced,
        )

    # --- helpers ------------------------------------------------------------------------------

    def _start_batching(self, loaded: _Loaded) -> None:
        """Continuous batching for this model if it can have it; if not, a log line says why and
        every request takes the one-at-a-time path."""
        size = self.spec.max_batch_size or DEFAULT_MAX_BATCH_SIZE
        reason = None
        attention = getattr(loaded.model.config, "_attn_implementation", None)
        if size <= 1:
            reason = "max_batch_size is 1"
        elif loaded.processor is not None:
            reason = "it is a vision model (images are generated one request at a time)"
        elif attention != "sdpa" and not str(attention).startswith("flash"):
            reason = f"its attention implementation {attention!r} has no paged form beside generate"
        if reason is None:
            try:
                self._batcher = ContinuousBatcher(
                    loaded.model,
                    stop_token_ids=loaded.stop_token_ids,
                    batch_size=size,
                    cache_tokens=(self.spec.batch_cache_contexts or BATCH_CACHE_CONTEXTS)
                    * self.context_length,
                    share_prefixes=self.spec.prefix_cache_mb != 0,
                    thread_name=f"batch-{self.physical_id}",
                )
            except Exception as exc:  # a model transformers cannot batch, or no room for a cache
                reason = f"transformers cannot batch it: {type(exc).__name__}: {exc}"
        if reason is None:
            log.info("%s: continuous batching, up to %d requests at once", self.physical_id, size)
        else:
            log.info("%s: generates one request at a time: %s", self.physical_id, reason)

    def _prefilled_prefix(self, loaded: _Loaded, request: GenerationRequest, inputs: Any) -> Any:
        """For the one-at-a-time path: a cache holding the longest kept prefix of this prompt,
        prefilled further to this prompt's own snapshot point (kept for the next message), or
        None to prefill the whole prompt in `generate`. Prompts with images are not snapshotted
        (their positions depend on the images)."""
        snapshots = self._snapshots
        if snapshots is None or request.images:
            return None
        import torch
        from transformers import DynamicCache

        prompt_ids: list[int] = inputs["input_ids"][0].tolist()
        point = snapshots.point(prompt_ids)
        try:
            start, cache = snapshots.longest(prompt_ids, loaded.device)
            if start == 0 and point == 0:
                return None
            _forget_rope_deltas(loaded.model)
            if point > start:
                cache = cache if cache is not None else DynamicCache(config=loaded.model.config)
                with torch.no_grad():
                    cast(Any, loaded.model)(
                        input_ids=inputs["input_ids"][:, start:point],
                        past_key_values=cache,
                        use_cache=True,
                    )
                snapshots.keep(prompt_ids[:point], cache)
        except (RuntimeError, ValueError, TypeError, OSError) as exc:  # whole prefill instead
            log.warning("%s: prefix snapshot not used: %s", self.physical_id, exc)
            return None
        log.debug(
            "%s: prompt of %d tokens continues from %d", self.physical_id, len(prompt_ids), start
        )
        return cache

    def _drop_failed_batcher(self, batcher: ContinuousBatcher | None, error: Exception) -> None:
        """After a batched sequence failed: if the whole batch loop is going (not just that
        sequence), stop batching, so that later requests are served one at a time."""
        failure = None if batcher is None else batcher.failure()
        if batcher is None or failure is None or self._batcher is not batcher:
            return
        log.warning(
            "%s: continuous batching stopped (%s: %s); generating one request at a time until "
            "the model is loaded again",
            self.physical_id,
            failure,
            error,
        )
        self._batcher = None
        batcher.close()

    def _stop_batching(self) -> None:
        batcher, self._batcher = self._batcher, None
        if batcher is not None:
            batcher.close()
        self._encoded.clear()

    def _read_config(self, transformers: Any) -> PretrainedConfig:
        try:
            config: PretrainedConfig = transformers.AutoConfig.from_pretrained(
                self.weights, gguf_file=self.spec.model_file
            )
        except (OSError, ValueError, KeyError) as exc:
            raise ModelLoadError(
                f"transformers cannot read the config of {self.physical_id!r} at "
                f"{self.weights}: {exc}"
            ) from exc
        return config

    def _refuse_silent_dequantization(self, config: PretrainedConfig) -> None:
        if not is_mxfp4_checkpoint(getattr(config, "quantization_config", None)):
            return
        blockers = mxfp4_blockers(probe_mxfp4_environment())
        if blockers:
            raise ModelLoadError(
                f"{self.physical_id!r} is an MXFP4 checkpoint, and transformers would dequantize "
                f"it to bf16 (about three times its size) because it lacks: "
                f"{'; '.join(blockers)}. Install what is missing on a CUDA machine, or serve the "
                "model as a GGUF with backend llamacpp in models.yaml."
            )

    def _chat_template(self, processor: Any, tokenizer: PreTrainedTokenizerBase) -> str:
        if self.spec.chat_template:
            return Path(self.spec.chat_template).read_text(encoding="utf-8")
        template = getattr(processor, "chat_template", None) or tokenizer.chat_template
        if not template:
            raise ModelLoadError(
                f"The weights of {self.physical_id!r} carry no chat template; name a Jinja file "
                "with `chat_template` in models.yaml."
            )
        assert isinstance(template, str)
        return template

    def _encode(self, loaded: _Loaded, prompt: str, images: list[bytes]) -> Any:
        if images and loaded.processor is None:
            raise BadRequest(
                f"The model {self.physical_id!r} does not accept images.", param="messages"
            )
        if loaded.processor is None:
            inputs = loaded.tokenizer(prompt, add_special_tokens=False, return_tensors="pt")
        else:
            try:
                inputs = loaded.processor(
                    text=[prompt],
                    images=[_open_image(data) for data in images] or None,
                    add_special_tokens=False,
                    return_tensors="pt",
                )
            except ValueError as exc:  # e.g. images and image parts do not match
                raise BadRequest(f"The images cannot be used: {exc}", param="messages") from exc
        return inputs.to(loaded.device)

    def _generate_kwargs(
        self, loaded: _Loaded, request: GenerationRequest, budget: int
    ) -> dict[str, Any]:
        from transformers import GenerationConfig, LogitsProcessorList

        processors = []
        if request.json_schema is not None:
            processors.append(loaded.constraints.logits_processor(request.json_schema))
        sampler = make_sampler(request.temperature, request.top_p, request.seed, loaded.device)
        if sampler is not None:
            processors.append(sampler)  # last: it sees the grammar's mask
        # Greedy over the processed scores: the sampler, if any, leaves one token finite. The
        # model's generation_config (set at load) supplies only the eos and pad ids.
        config = GenerationConfig(max_new_tokens=budget, do_sample=False, num_beams=1)
        return {"generation_config": config, "logits_processor": LogitsProcessorList(processors)}

    def _require(self) -> _Loaded:
        if self._loaded is None:
            raise NotLoaded(self.physical_id)
        return self._loaded


def _load_processor(weights: Path) -> Any:
    """The model's processor. Without torchvision, transformers 5.23 cannot build the video
    processor that Qwen-VL processors (Qwen3VLProcessor, used by Qwen3.5) require, and so no
    processor at all: then the same processor class is built from the tokenizer and the image
    processor alone, and only video input (which llmux does not offer) is lost."""
    import transformers
    from transformers.utils.import_utils import is_torchvision_available

    try:
        return transformers.AutoProcessor.from_pretrained(weights)
    except ImportError:
        if is_torchvision_available():
            raise
    tokenizer = transformers.AutoTokenizer.from_pretrained(weights)
    image_processor = transformers.AutoImageProcessor.from_pretrained(weights)
    name = getattr(image_processor, "processor_class", None) or _processor_class_name(weights)
    processor_class = getattr(transformers, name)

    class ImagesOnlyProcessor(processor_class):  # type: ignore[misc, valid-type]
        def check_argument_for_proper_class(self, argument_name: str, argument: Any) -> Any:
            if argument_name == "video_processor" and argument is None:
                return None
            return super().check_argument_for_proper_class(argument_name, argument)

    log.warning("torchvision is not installed: %s loads without its video processor", name)
    return ImagesOnlyProcessor(
        image_processor=image_processor, tokenizer=tokenizer, video_processor=None
    )


def _processor_class_name(weights: Path) -> str:
    from transformers import AutoConfig
    from transformers.models.auto import processing_auto

    model_type = AutoConfig.from_pretrained(weights).model_type
    names: dict[str, str] = vars(processing_auto)["PROCESSOR_MAPPING_NAMES"]  # not exported
    name = names.get(model_type)
    if not isinstance(name, str):
        raise ModelLoadError(f"no processor class is known for model type {model_type!r}")
    return name


def _open_image(data: bytes) -> Any:
    from PIL import Image, UnidentifiedImageError

    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except Image.DecompressionBombError as exc:  # over ~179 Mpx: refused, not a 500
        raise BadRequest(f"An image is too large: {exc}", param="messages") from exc
    except (UnidentifiedImageError, OSError) as exc:
        raise BadRequest(f"An image cannot be read: {exc}", param="messages") from exc
    return image


def _stop_token_ids(
    model: PreTrainedModel, text_config: PretrainedConfig, tokenizer: PreTrainedTokenizerBase
) -> tuple[int, ...]:
    """The checkpoint's eos ids (generation config, model config, tokenizer) and the turn-ending
    tokens of `END_OF_TURN_TOKENS` that the vocabulary has."""
    ids: list[int] = []
    sources = (
        getattr(model.generation_config, "eos_token_id", None),
        getattr(text_config, "eos_token_id", None),
        tokenizer.eos_token_id,
    )
    for source in sources:
        ids.extend([source] if isinstance(source, int) else list(source or ()))
    added = tokenizer.get_added_vocab()
    ids.extend(added[token] for token in END_OF_TURN_TOKENS if token in added)
    unique = tuple(dict.fromkeys(ids))
    if not unique:
        raise ModelLoadError("the model names no end-of-sequence token")
    return unique


def _reserved_template_arguments(tokenizer: PreTrainedTokenizerBase) -> frozenset[str]:
    """apply_chat_template's own parameters: a template kwarg by one of these names would
    change how it renders instead of reaching the template."""
    parameters = inspect.signature(tokenizer.apply_chat_template).parameters
    return frozenset(name for name, p in parameters.items() if p.kind is not p.VAR_KEYWORD)


def _harmony_encoding(weights: Path) -> HarmonyEncoding | None:
    """openai-harmony's gpt-oss encoding, its o200k vocabulary taken from the weights directory
    (`o200k_base.tiktoken`), else rebuilt from the model's `tokenizer.json` into
    `$XDG_CACHE_HOME/llmux/harmony` (the weights are mounted read-only). None when neither works:
    the harmony parser then reads the text, whose special tokens are kept."""
    from llmux.core.harmony_vocab import (
        O200K_BASE_FILE,
        HarmonyVocabError,
        load_gpt_oss_encoding,
        write_o200k_vocab,
    )

    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "llmux" / "harmony"
    try:
        if (weights / O200K_BASE_FILE).is_file():
            return load_gpt_oss_encoding(weights)
        write_o200k_vocab(weights / "tokenizer.json", cache)
        return load_gpt_oss_encoding(cache)
    except (HarmonyVocabError, OSError, KeyError, ValueError) as exc:
        log.warning("harmony output will be parsed from text, not token ids: %s", exc)
        return None


def _forget_rope_deltas(model: PreTrainedModel) -> None:
    """Qwen-VL models keep the last prompt's position offsets (images shift them) on a module and
    apply them to any generation that starts from a non-empty cache: a text prompt continued from
    a snapshot must have its positions worked out afresh."""
    for module in model.modules():
        if getattr(module, "rope_deltas", None) is not None:
            setattr(module, "rope_deltas", None)  # noqa: B010  (torch types the attribute)

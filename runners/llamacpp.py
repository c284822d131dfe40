"""Chat on llama-cpp-python: a GGUF under the models directory.

Text requests are rendered with our own Jinja environment (the GGUF's template, or the registry's
`chat_template` file) because `create_chat_completion` cannot pass template kwargs such as
`enable_thinking`; tokens then come one at a time from `Llama.generate`, which gives exact usage,
token ids for the harmony parser, and a cancel check between tokens. Requests with images go
through `MTMDChatHandler` (the mmproj file), called directly so that the kwargs still reach the
template.

Prompt reuse: a `Llama` holds one sequence. Each text generation starts from the longest usable
prefix of its prompt, in the live context or in a state saved after an earlier long prompt
(`runners.prompt_states`), so a chat's next message does not prefill its tools again after an
unrelated request (Open WebUI's title) took the context in between. Only the new tokens are
evaluated; the answer is the same as from a cold context.

One sequence also means no parallel requests: llama-cpp-python's `Llama` decodes a single
sequence (its batch helpers exist only for embeddings), so requests to one llama.cpp model run one
after another (docs/residency.md says what to do about a short request behind a long one).

Threading: `generate` runs on the caller's worker thread; calls must not overlap (the chat
session serialises them per model). `check` may run on another thread meanwhile. llama.cpp's own
threads do the arithmetic: by default one per physical core (`runners.cpus`).
"""

from __future__ import annotations

import codecs
import json
import logging
import queue
import random
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from llmux.core.config import PhysicalModel
from llmux.core.errors import BadRequest
from runners.base import (
    Device,
    ModelLoadError,
    NotLoaded,
    completion_budget,
    require_backend,
    require_gguf,
)
from runners.chat import CheckedPrompts, GenerationChunk, GenerationRequest
from runners.cpus import physical_cores
from runners.prompt_states import DEFAULT_BUDGET_MB, LlamaContext, PromptStates, common_prefix
from runners.templates import compile_template, read_template, render

if TYPE_CHECKING:
    import jinja2
    from llama_cpp import Llama
    from openai_harmony import HarmonyEncoding

log = logging.getLogger("llmux.runners.llamacpp")
DEFAULT_CONTEXT = 8192
# OpenAI's defaults where the request leaves them out.
DEFAULT_TEMPERATURE = 1.0
DEFAULT_TOP_P = 1.0
# Prompts tokenized by `check`, kept for the `generate` of the same request (a tool-heavy prompt
# takes tens of ms to render and tokenize); bounded, for requests checked and never generated.
CHECKED_KEPT = 16


class LlamaCppChatRunner:
    def __init__(
        self, physical_id: str, spec: PhysicalModel, weights: Path, *, device: Device = "auto"
    ) -> None:
        self.physical_id = physical_id
        self.spec = spec
        self.weights = weights
        self.device: Device = device
        self.context_length = spec.context_length or DEFAULT_CONTEXT
        self._llm: Llama | None = None
        self._template: jinja2.Template | None = None
        self._vision: Any = None
        self._prompts: PromptStates | None = None
        self._checked: CheckedPrompts[list[int]] = CheckedPrompts(CHECKED_KEPT)
        # Every generation computes on this one thread (see `start`).
        self._compute = ThreadPoolExecutor(1, thread_name_prefix=f"llama-{physical_id}")

    # --- Runner -------------------------------------------------------------------------------

    def preflight(self) -> None:
        require_backend(self.physical_id, "llama_cpp")
        require_gguf(self.physical_id, self.weights / (self.spec.model_file or ""))
        if self.spec.mmproj_file:
            require_gguf(self.physical_id, self.weights / self.spec.mmproj_file)

    def load(self) -> None:
        self.preflight()
        model_file = self.weights / (self.spec.model_file or "")
        _keep_process_output()
        from llama_cpp import Llama

        vision = None
        if self.spec.mmproj_file:
            mmproj = self.weights / self.spec.mmproj_file
            template = read_template(self.spec.chat_template) if self.spec.chat_template else None
            vision = _vision_handler(mmproj, template, use_gpu=self.device == "auto")
        if self.device == "cpu":
            # No layer on the GPU, and no batch handed to it either: a CUDA build otherwise
            # offloads large prompt batches of host layers (op_offload) and the KV cache.
            placement: dict[str, Any] = {
                "n_gpu_layers": 0,
                "op_offload": False,
                "offload_kqv": False,
            }
        else:
            layers = -1 if self.spec.n_gpu_layers is None else self.spec.n_gpu_layers
            placement = {"n_gpu_layers": layers}
        try:
            llm = Llama(
                model_path=str(model_file),
                n_ctx=self.context_length,
                chat_handler=vision,
                verbose=False,
                **placement,
                **self._compute_options(),
            )
        except (ValueError, RuntimeError) as exc:
            size_gb = model_file.stat().st_size / 1024**3
            raise ModelLoadError(
                f"llama.cpp could not load {model_file} ({size_gb:.2f} GB): {exc}. A file that "
                "passes the GGUF check but fails here is usually cut short or corrupt: "
                "scripts/download_models.sh --force "
                f"{self.physical_id} downloads it again."
            ) from exc
        source = (
            read_template(self.spec.chat_template)
            if self.spec.chat_template
            else llm.metadata.get("tokenizer.chat_template")
        )
        if not source:
            llm.close()
            raise ModelLoadError(
                f"{model_file} carries no chat template; name a Jinja file with `chat_template` "
                f"for {self.physical_id!r} in models.yaml."
            )
        budget_mb = (
            DEFAULT_BUDGET_MB if self.spec.prefix_cache_mb is None else self.spec.prefix_cache_mb
        )
        self._prompts = PromptStates(LlamaContext(llm), int(budget_mb * 1024**2))
        self._llm, self._template, self._vision = llm, compile_template(source), vision

    def unload(self) -> None:
        llm, self._llm, self._template, self._vision = self._llm, None, None, None
        prompts, self._prompts = self._prompts, None
        if prompts is not None:
            prompts.clear()
        self._checked.clear()
        if llm is not None:
            llm.close()

    def prompt_cache_bytes(self) -> int:
        """Host memory the saved prompt states hold now (0 when unloaded)."""
        return 0 if self._prompts is None else self._prompts.nbytes

    def device_bytes(self) -> int | None:
        return None  # not torch: the executor reads the device around the load

    def harmony_encoding(self) -> HarmonyEncoding | None:
        return None  # harmony output is parsed from its text, whose special tokens are kept

    # --- ChatRunner ---------------------------------------------------------------------------

    def render_prompt(self, request: GenerationRequest) -> str:
        llm, template = self._require()
        import jinja2

        try:
            return render(
                template,
                request.messages,
                tools=request.tools,
                bos_token=self._piece(llm.token_bos()),
                eos_token=self._piece(llm.token_eos()),
                template_kwargs=request.template_kwargs,
            )
        except jinja2.TemplateError as exc:  # raise_exception() in the template, a bad role...
            raise BadRequest(
                f"The chat template refused the messages: {exc}", param="messages"
            ) from exc

    def check(self, request: GenerationRequest) -> None:
        self._require()
        if request.images:
            if self._vision is None:
                raise BadRequest(
                    f"{self.physical_id!r} has no mmproj_file, so it cannot see images.",
                    param="messages",
                )
        else:
            prompt = self._tokenize(request)
            completion_budget(
                self.physical_id, self.context_length, len(prompt), request.max_tokens
            )
            self._checked.keep(request, prompt)
        self._grammar(request.json_schema)

    def start(
        self,
        request: GenerationRequest,
        cancel: threading.Event,
        emit: Callable[[GenerationChunk], None],
    ) -> Future[None]:
        """Computes the generation on the runner's one compute thread, handing each chunk to
        `emit` there; the Future ends (with the generation's error, if any) once the model is no
        longer in use. llama.cpp's CPU threads are an OpenMP team per calling thread: called
        from whichever worker thread a request landed on (the model's pool has several), the
        teams of earlier callers kept spinning on the cores the current one needed, and the
        first token took 45-100 ms instead of 34 here."""
        if request.images:
            produce = lambda: self._generate_with_images(request, cancel)  # noqa: E731
        else:
            produce = lambda: self._generate_text(request, cancel)  # noqa: E731

        def run() -> None:
            for chunk in produce():
                emit(chunk)

        return self._compute.submit(run)

    def generate(
        self, request: GenerationRequest, cancel: threading.Event
    ) -> Iterator[GenerationChunk]:
        """`start`'s chunks, on the caller's thread."""
        chunks: queue.SimpleQueue[GenerationChunk | BaseException | None] = queue.SimpleQueue()
        computing = self.start(request, cancel, chunks.put)
        computing.add_done_callback(lambda done: chunks.put(done.exception()))
        ended = False
        try:
            while (item := chunks.get()) is not None:
                if isinstance(item, BaseException):
                    ended = True
                    raise item
                yield item
            ended = True
        finally:
            if not ended:
                cancel.set()  # the reader is gone: stop computing
            wait([computing])  # the model stays in use until the compute thread lets go

    def _generate_text(
        self, request: GenerationRequest, cancel: threading.Event
    ) -> Iterator[GenerationChunk]:
        llm, _ = self._require()
        prompts = self._prompts
        assert prompts is not None  # set with _llm
        prompt = self._checked.take(request) or self._tokenize(request)
        budget = completion_budget(
            self.physical_id, self.context_length, len(prompt), request.max_tokens
        )
        # llama.cpp's sampler takes a 32-bit seed.
        llm.set_seed(
            request.seed & 0xFFFFFFFF if request.seed is not None else random.getrandbits(31)
        )
        import llama_cpp

        start = prompts.start(prompt)
        boundary = self._message_boundary(request, prompt, start)
        if boundary is not None:
            # A recurrent state cannot be cut back later: keep one at the start of the last
            # message, which the chat's next prompt shares, before evaluating past it.
            llm.eval(prompt[start:boundary])
            prompts.checkpoint()
            start = boundary
        tokens = llm.generate(
            prompt[start:],
            reset=False,  # the context holds prompt[:start]; prompts.start put it there
            temp=_or(request.temperature, DEFAULT_TEMPERATURE),
            top_p=_or(request.top_p, DEFAULT_TOP_P),
            top_k=0,
            min_p=0.0,
            repeat_penalty=1.0,
            grammar=self._grammar(request.json_schema),
        )
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        produced = 0
        finish: Literal["stop", "length"] = "stop"
        for token in tokens:
            if cancel.is_set() or llama_cpp.llama_vocab_is_eog(llm._model.vocab, token):
                break
            produced += 1
            text = decoder.decode(llm.detokenize([token], special=request.keep_special_tokens))
            yield GenerationChunk(text=text, token_ids=(token,))
            if produced >= budget:
                finish = "length"
                break
        tokens.close()
        yield GenerationChunk(
            text=decoder.decode(b"", final=True),
            finish_reason=finish,
            prompt_tokens=len(prompt),
            completion_tokens=produced,
        )
        # After the last chunk: the answer is complete when the state is copied.
        prompts.save(len(prompt))

    # --- helpers ------------------------------------------------------------------------------

    def _generate_with_images(
        self, request: GenerationRequest, cancel: threading.Event
    ) -> Iterator[GenerationChunk]:
        llm, _ = self._require()
        if self._prompts is not None:
            # The handler evaluates image embeddings at positions whose token record it leaves
            # as it was: the next text prompt must not take them for its own tokens.
            self._prompts.forget_live()
        if self._vision is None:
            raise BadRequest(
                f"{self.physical_id!r} has no mmproj_file, so it cannot see images.",
                param="messages",
            )
        try:
            stream = self._vision(
                llama=llm,
                messages=_with_image_urls(request),
                tools=request.tools,
                stream=True,
                # The same sampling as the text path (OpenAI's semantics), not the handler's own
                # defaults (top_k 40, min_p 0.05, repeat_penalty 1.1).
                temperature=_or(request.temperature, DEFAULT_TEMPERATURE),
                top_p=_or(request.top_p, DEFAULT_TOP_P),
                top_k=0,
                min_p=0.0,
                repeat_penalty=1.0,
                seed=request.seed,
                max_tokens=request.max_tokens,
                grammar=self._grammar(request.json_schema),
                **request.template_kwargs,
            )
            pieces: list[str] = []
            finish: Literal["stop", "length"] = "stop"
            for chunk in stream:
                if cancel.is_set():
                    break
                choice = chunk["choices"][0]
                text = choice["delta"].get("content") or ""
                if text:
                    pieces.append(text)
                    yield GenerationChunk(text=text)
                if choice.get("finish_reason") == "length":
                    finish = "length"
        except ValueError as exc:  # an image it cannot decode, a prompt over n_ctx
            raise BadRequest(
                f"The model cannot take this request: {exc}", param="messages"
            ) from exc
        # The handler streams text, not tokens: count the answer's tokens as the text path does.
        produced = len(llm.tokenize("".join(pieces).encode("utf-8"), add_bos=False, special=True))
        yield GenerationChunk(
            finish_reason=finish, prompt_tokens=llm.n_tokens - produced, completion_tokens=produced
        )

    def _tokenize(self, request: GenerationRequest) -> list[int]:
        llm, _ = self._require()
        prompt: list[int] = llm.tokenize(
            self.render_prompt(request).encode("utf-8"), add_bos=False, special=True
        )
        return prompt

    def _compute_options(self) -> dict[str, Any]:
        """Threads (default: the physical cores this process may use, for prompts as for
        generation) and the batch and attention options models.yaml sets."""
        threads = self.spec.n_threads or physical_cores()
        options: dict[str, Any] = {"n_threads": threads, "n_threads_batch": threads}
        if self.spec.n_batch is not None:
            options["n_batch"] = self.spec.n_batch
        if self.spec.flash_attn is not None:
            options["flash_attn"] = self.spec.flash_attn
        return options

    def _message_boundary(
        self, request: GenerationRequest, prompt: list[int], start: int
    ) -> int | None:
        """Where the last message's content starts in `prompt`, if a state should be kept there:
        only for a model whose state cannot be cut (recurrent), when the prompt is long, and at
        least `min_tokens` past what the context already holds (so a long chat keeps a state
        every few messages, not one per message). Found by rendering the request once more with
        that content changed: the tokens the two prompts share come before it."""
        prompts = self._prompts
        if (
            prompts is None
            or prompts.context.truncatable
            or prompts.budget_bytes <= 0
            or len(prompt) < prompts.min_tokens
            or not request.messages
            or not isinstance(request.messages[-1].get("content"), str)
        ):
            return None
        last = request.messages[-1]
        other = "." if last["content"] != "." else ","
        variant = replace(request, messages=[*request.messages[:-1], {**last, "content": other}])
        try:
            shared = common_prefix(prompt, self._tokenize(variant))
        except BadRequest:
            return None
        if shared - start < prompts.min_tokens or shared >= len(prompt):
            return None
        return shared

    def _grammar(self, schema: dict[str, Any] | None) -> Any:
        if schema is None:
            return None
        from llama_cpp.llama_grammar import LlamaGrammar

        try:
            return LlamaGrammar.from_json_schema(json.dumps(schema), verbose=False)
        except (ValueError, RuntimeError, KeyError) as exc:
            raise BadRequest(
                f"The JSON schema cannot be used to constrain output: {exc}",
                param="response_format",
            ) from exc

    def _piece(self, token: int) -> str:
        llm, _ = self._require()
        return llm.detokenize([token], special=True).decode("utf-8", errors="replace")

    def _require(self) -> tuple[Llama, jinja2.Template]:
        if self._llm is None or self._template is None:
            raise NotLoaded(self.physical_id)
        return self._llm, self._template


def _or(value: float | None, default: float) -> float:
    return default if value is None else value


def _with_image_urls(request: GenerationRequest) -> list[dict[str, Any]]:
    """Messages with {"type": "image"} parts turned back into data-URI image_url parts, which is
    what MTMDChatHandler reads."""
    import base64

    images = iter(request.images)
    out = []
    for message in request.messages:
        content = message.get("content")
        if isinstance(content, list):
            content = [
                {
                    "type": "image_url",
                    "image_url": {
                        "url": "data:image/png;base64," + base64.b64encode(next(images)).decode()
                    },
                }
                if part.get("type") == "image"
                else part
                for part in content
            ]
        out.append({**message, "content": content})
    return out


def _vision_handler(mmproj: Path, template: str | None, *, use_gpu: bool = True) -> Any:
    """llama-cpp-python's multimodal handler, rendering with `template` (the registry's
    chat_template) instead of the GGUF's own when one is configured, as the text path does."""
    from llama_cpp.llama_chat_format import MTMDChatHandler

    class ConfiguredTemplate(MTMDChatHandler):
        def _get_chat_template(self, llama_model: Any) -> str:
            if template is not None:
                return template
            return str(super()._get_chat_template(llama_model))

    return ConfiguredTemplate(clip_model_path=str(mmproj), verbose=False, use_gpu=use_gpu)


class _NoRedirect:
    """Stands in for llama-cpp-python's `suppress_stdout_stderr`, which points file descriptors 1
    and 2 of the whole process at /dev/null around a quiet load: every other thread's output
    (the access log of requests served meanwhile) was lost. llama.cpp's own messages go through
    its log callback, which `verbose=False` already keeps to errors, so nothing else is needed."""

    def __init__(self, disable: bool = True) -> None:
        pass

    def __enter__(self) -> _NoRedirect:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


def _keep_process_output() -> None:
    import llama_cpp._internals
    import llama_cpp.llama
    import llama_cpp.llama_chat_format

    for module in (llama_cpp.llama, llama_cpp._internals, llama_cpp.llama_chat_format):
        module.suppress_stdout_stderr = _NoRedirect  # type: ignore[attr-defined]

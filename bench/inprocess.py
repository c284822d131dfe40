"""The in-process contenders: the same weights driven directly by their library, with no server,
no event loop and no HTTP in between.

Each lives in a process of its own (`Isolated`, a spawned interpreter that imports only its
library), as llmux's worker and llama_cpp.server each do: nothing the bench process holds (its
HTTP clients, the other contenders, torch's or OpenMP's thread pools) shares a process with the
contender it times. The bench itself imports no model library. The timing happens inside the
child; only the results cross the pipe.

Sampling matches what llmux asks of the backend for `temperature: 0` (greedy, no repetition
penalty), so every contender generates the same tokens from the same prompt.
"""

from __future__ import annotations

import codecs
import contextlib
import multiprocessing
import threading
import time
import wave
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from bench.clients import StreamResult


class Isolated:
    """An object made by `factory(*args)` in a spawned child process; `call` runs one of its
    methods there. Arguments and results must pickle."""

    def __init__(self, factory: Callable[..., Any], *args: Any) -> None:
        context = multiprocessing.get_context("spawn")
        self._conn, child = context.Pipe()
        self._process = context.Process(target=_serve, args=(child, factory, args), daemon=True)
        self._process.start()
        child.close()
        self._answer()

    def call(self, method: str, *args: Any) -> Any:
        self._conn.send((method, args))
        return self._answer()

    def close(self) -> None:
        if self._process.is_alive():
            with contextlib.suppress(OSError):
                self._conn.send(None)
            self._process.join(timeout=30)
            if self._process.is_alive():
                self._process.kill()
                self._process.join()
        self._conn.close()

    def __enter__(self) -> Isolated:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _answer(self) -> Any:
        try:
            ok, value = self._conn.recv()
        except EOFError:
            code = self._process.exitcode
            raise RuntimeError(f"the in-process contender died (exit {code})") from None
        if not ok:
            raise RuntimeError(f"in the in-process contender: {value}")
        return value


def _serve(conn: Connection, factory: Callable[..., Any], args: tuple[Any, ...]) -> None:
    try:
        target = factory(*args)
    except Exception as exc:
        conn.send((False, f"{type(exc).__name__}: {exc}"))
        return
    conn.send((True, None))
    while (message := conn.recv()) is not None:
        method, method_args = message
        try:
            conn.send((True, getattr(target, method)(*method_args)))
        except Exception as exc:
            conn.send((False, f"{type(exc).__name__}: {exc}"))


def run_isolated(function: Callable[..., Any], *args: Any) -> Any:
    """`function(*args)` once, in a spawned process: its imports stay out of the bench's."""
    with Isolated(_Once, function, args) as once:
        return once.call("result")


class _Once:
    def __init__(self, function: Callable[..., Any], args: tuple[Any, ...]) -> None:
        self.value = function(*args)

    def result(self) -> Any:
        return self.value


class LlamaInProcess:
    """A GGUF under llama-cpp-python as llmux and the bench's llama_cpp.server run it: every
    layer on the GPU when the build has one, llmux's default threads (one per physical core)."""

    def __init__(self, model: Path, n_ctx: int) -> None:
        from llama_cpp import Llama

        from runners.cpus import physical_cores  # the standard library only

        threads = physical_cores()
        self.llm = Llama(
            model_path=str(model),
            n_ctx=n_ctx,
            n_gpu_layers=-1,
            n_threads=threads,
            n_threads_batch=threads,
            verbose=False,
        )
        self.prompt: list[int] = []

    def set_prompt(self, messages: list[dict[str, Any]]) -> int:
        """Render the messages through the GGUF's own chat template (as llama_cpp.server does)
        for the next streams; the prompt's length in tokens."""
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        llm = self.llm
        formatter = Jinja2ChatFormatter(
            template=llm.metadata["tokenizer.chat_template"],
            eos_token=llm.detokenize([llm.token_eos()], special=True).decode(),
            bos_token=llm.detokenize([llm.token_bos()], special=True).decode(),
        )
        text = formatter(messages=messages).prompt  # type: ignore[arg-type]
        self.prompt = list(llm.tokenize(text.encode("utf-8"), add_bos=False, special=True))
        return len(self.prompt)

    def stream(self, max_tokens: int) -> StreamResult:
        """Llama.generate token by token, each detokenized, as a streaming caller would."""
        import llama_cpp

        llm, prompt = self.llm, self.prompt
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        result = StreamResult(prompt_tokens=len(prompt), started_at=time.perf_counter())
        pieces = []
        tokens = llm.generate(prompt, temp=0.0, top_p=1.0, top_k=0, min_p=0.0, repeat_penalty=1.0)
        for token in tokens:
            if llama_cpp.llama_vocab_is_eog(llm._model.vocab, token):
                break
            pieces.append(decoder.decode(llm.detokenize([token])))
            result.tokens += 1
            if result.ttft_s is None:
                result.ttft_s = time.perf_counter() - result.started_at
            if result.tokens >= max_tokens:
                break
        tokens.close()
        result.finish_s = time.perf_counter() - result.started_at
        result.text = "".join(pieces)
        return result


class TransformersInProcess:
    """A transformers chat model and its tokenizer, greedy: `model.generate` timed per token by a
    streamer, or transformers' continuous-batching manager; each token decoded to text as it
    comes, as a streaming caller would."""

    def __init__(self, path: Path, llmux_malloc: bool = False) -> None:
        if llmux_malloc:
            # As llmux's worker starts (glibc's mmap and trim thresholds pinned, for a flat RSS
            # while backends take turns): what that policy costs torch on the CPU, apart from
            # the gateway.
            from runners.base import pin_malloc_thresholds

            pin_malloc_thresholds()
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model: Any = AutoModelForCausalLM.from_pretrained(
            path, dtype="auto", device_map=device
        )
        self.model.eval()
        added = self.tokenizer.get_added_vocab()
        self.stop_ids = [added[t] for t in ("<|im_end|>", "<|endoftext|>") if t in added]
        # As llmux does at load: the checkpoint's sampling advice would fill every field a
        # request leaves unset (a repetition penalty, say); only the stop ids stay.
        self.model.generation_config = GenerationConfig(
            eos_token_id=self.stop_ids, pad_token_id=self.stop_ids[0]
        )
        self.inputs: Any = None
        self.manager: Any = None

    def set_prompt(self, messages: list[dict[str, Any]], template_kwargs: dict[str, Any]) -> int:
        text = self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=False, **template_kwargs
        )
        self.inputs = self.tokenizer(text, add_special_tokens=False, return_tensors="pt").to(
            self.model.device
        )
        return int(self.inputs["input_ids"].shape[1])

    def stream(self, max_tokens: int) -> StreamResult:
        from transformers import GenerationConfig
        from transformers.generation.streamers import BaseStreamer

        inputs = self.inputs
        result = StreamResult(
            prompt_tokens=int(inputs["input_ids"].shape[1]), started_at=time.perf_counter()
        )
        stop_ids = self.stop_ids
        decode = self.tokenizer.decode

        class Clock(BaseStreamer):
            """generate calls `put` with the prompt first, then with each new token."""

            def __init__(self) -> None:
                self.prompt_seen = False

            def put(self, value: Any) -> None:
                if not self.prompt_seen:
                    self.prompt_seen = True
                    return
                token = int(value.reshape(-1)[-1])
                if token in stop_ids:
                    return
                decode([token])  # as a streaming caller turns each token into text
                result.tokens += 1
                if result.ttft_s is None:
                    result.ttft_s = time.perf_counter() - result.started_at

            def end(self) -> None:
                pass

        config = GenerationConfig(
            max_new_tokens=max_tokens,
            do_sample=False,
            num_beams=1,
            eos_token_id=stop_ids,
            pad_token_id=stop_ids[0],
        )
        # On a thread of its own, as Hugging Face's streaming recipe and llmux both run it.
        worker = threading.Thread(
            target=self.model.generate,
            kwargs={**inputs, "generation_config": config, "streamer": Clock()},
        )
        worker.start()
        worker.join()
        result.finish_s = time.perf_counter() - result.started_at
        return result

    def stream_batched(self, max_tokens: int, batch_size: int, context: int) -> StreamResult:
        """The same prompt through transformers' continuous-batching manager, configured as
        llmux configures it for a model that batches (pages of 64 tokens, a cache of two
        contexts, at most 1024 prompt tokens a step, pages shared between prompts)."""
        if self.manager is None:
            from transformers import GenerationConfig
            from transformers.generation.configuration_utils import ContinuousBatchingConfig

            config = ContinuousBatchingConfig(
                page_size=64,
                num_blocks=-(-2 * context // 64),
                max_batch_tokens=1024,
                max_requests_per_batch=batch_size,
                allow_block_sharing=True,
                auto_switch_to_flash=False,
                use_async_batching=False,
                use_cuda_graph=False,
            )
            self.manager = self.model.init_continuous_batching(
                generation_config=GenerationConfig(do_sample=False, eos_token_id=self.stop_ids),
                continuous_batching_config=config,
            )
            self.manager.start()
        ids = self.inputs["input_ids"][0].tolist()
        result = StreamResult(prompt_tokens=len(ids), started_at=time.perf_counter())
        request = self.manager.add_request(
            ids, max_new_tokens=max_tokens, streaming=True, eos_token_id=self.stop_ids
        )
        for output in self.manager.request_id_iter(request):
            produced = [t for t in output.generated_tokens if t not in self.stop_ids]
            for token in produced[result.tokens :]:
                self.tokenizer.decode([token])  # as a streaming caller turns it into text
            if produced and result.ttft_s is None:
                result.ttft_s = time.perf_counter() - result.started_at
            result.tokens = len(produced)
            if output.is_finished():
                break
        result.finish_s = time.perf_counter() - result.started_at
        return result

    def close(self) -> None:
        if self.manager is not None:
            self.manager.stop(block=True)


class WhisperInProcess:
    """faster-whisper with llmux's settings (float16 on a GPU, int8 on the CPU)."""

    def __init__(self, weights: Path) -> None:
        import ctranslate2
        from faster_whisper import WhisperModel

        on_gpu = ctranslate2.get_cuda_device_count() > 0
        device, compute_type = ("cuda", "float16") if on_gpu else ("cpu", "int8")
        self.model = WhisperModel(str(weights), device=device, compute_type=compute_type)

    def seconds(self, clip: Path) -> float:
        """Transcribe `clip`, decoded from its file, as llmux does: the seconds it took."""
        from runners.transcription import FALLBACK_TEMPERATURES

        started = time.perf_counter()
        segments, _ = self.model.transcribe(
            str(clip), language="en", temperature=list(FALLBACK_TEMPERATURES), vad_filter=False
        )
        "".join(s.text for s in segments)
        return time.perf_counter() - started


class PiperInProcess:
    def __init__(self, model: Path) -> None:
        from piper import PiperVoice

        self.voice = PiperVoice.load(model, config_path=model.with_name(model.name + ".json"))

    def seconds(self, text: str, out: Path) -> tuple[float, float]:
        """Speak `text` into a WAV file: (seconds it took, seconds of audio)."""
        started = time.perf_counter()
        with wave.open(str(out), "wb") as wav:
            self.voice.synthesize_wav(text, wav)
        took = time.perf_counter() - started
        with wave.open(str(out), "rb") as wav:
            audio = wav.getnframes() / wav.getframerate()
        return took, audio

"""TransformersChatRunner on real weights, on the CPU.

- The real Gemma 3 270M GGUF (the embedded default's model, laid out by `make setup`), through
  transformers' GGUF loader. It is the *base* model (google/gemma-3-270m, not -it): asked to "Say
  hello in one word." it echoes the instruction, in llama.cpp exactly as here. So content is
  checked against llama.cpp (same greedy tokens) rather than against a sensible answer.
- A tiny random-weight Qwen3.5 vision model that the tests build (config, a BPE tokenizer trained
  here, the real Qwen2-VL image processor, a compact Qwen-style chat template), so the processor,
  the image path and the template kwargs run for real.
- The gpt-oss MXFP4 refusal, on a config without weights.

One Gemma load (~50 s on two cores) serves the whole module.
"""

from __future__ import annotations

import gc
import io
import json
import threading
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from llmux.core.config import PhysicalModel
from llmux.core.errors import BadRequest
from llmux.settings import REPO_DIR, Settings
from runners.base import ModelLoadError, WeightsMissing
from runners.chat import GenerationChunk, GenerationRequest
from runners.mxfp4 import Mxfp4Environment, is_mxfp4_checkpoint, mxfp4_blockers
from runners.transformers_llm import TransformersChatRunner
from tests.tiny_models import build_tiny_qwen35_vl

pytestmark = pytest.mark.slow

GEMMA_DIR = Settings.from_env().models_dir / "gemma3-270m"
GEMMA_FILE = "gemma-3-270m-q4_k_m.gguf"
GEMMA_TEMPLATE = REPO_DIR / "config" / "local" / "templates" / "gemma3.jinja"
HELLO = [{"role": "user", "content": "Say hello in one word."}]


def run(
    runner: TransformersChatRunner,
    request: GenerationRequest,
    cancel: threading.Event | None = None,
) -> tuple[str, list[GenerationChunk]]:
    chunks = list(runner.generate(request, cancel or threading.Event()))
    return "".join(chunk.text for chunk in chunks), chunks


# --- Gemma 3 270M GGUF ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def gemma() -> Iterator[TransformersChatRunner]:
    if not (GEMMA_DIR / GEMMA_FILE).is_file():
        pytest.skip(f"{GEMMA_DIR / GEMMA_FILE} is missing: run `make setup`")
    spec = PhysicalModel(
        type="llm",
        backend="transformers",
        model_file=GEMMA_FILE,
        estimated_vram_gb=0.5,
        parser="plain",
        context_length=4096,
        chat_template=str(GEMMA_TEMPLATE),
        # These tests pin the one-at-a-time path (generate's own cancel points, its seeded
        # sampler); batching has tests/test_continuous_batching.py.
        max_batch_size=1,
    )
    runner = TransformersChatRunner("gemma3-270m", spec, GEMMA_DIR)
    runner.load()
    yield runner
    runner.unload()


def test_gemma_prompt_is_the_gemma3_template(gemma: TransformersChatRunner) -> None:
    request = GenerationRequest(
        messages=[
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": [{"type": "text", "text": "Say hello in one word."}]},
        ]
    )
    assert gemma.render_prompt(request) == (
        "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n"
        "<start_of_turn>model\nHello!<end_of_turn>\n"
        "<start_of_turn>user\nSay hello in one word.<end_of_turn>\n<start_of_turn>model\n"
    )


def test_gemma_greedy_answer_is_llama_cpps(gemma: TransformersChatRunner) -> None:
    """The same greedy tokens as llama.cpp for the same prompt: the GGUF is read right (config,
    dequantization, tokenizer). The base model echoes the instruction, hence the "hello"."""
    text, chunks = run(gemma, GenerationRequest(messages=HELLO, max_tokens=6, temperature=0))
    ids = [token for chunk in chunks for token in chunk.token_ids]
    assert "hello" in text.lower()
    assert chunks[-1].prompt_tokens == 15  # <bos> ... <start_of_turn>model\n, as llama.cpp counts
    llama_cpp = pytest.importorskip("llama_cpp")
    llm = llama_cpp.Llama(str(GEMMA_DIR / GEMMA_FILE), n_ctx=256, verbose=False)
    try:
        prompt = llm.tokenize(
            gemma.render_prompt(GenerationRequest(messages=HELLO)).encode(),
            add_bos=False,
            special=True,
        )
        expected = []
        for token in llm.generate(prompt, temp=0.0, top_k=1):
            expected.append(token)
            if len(expected) == 6:
                break
    finally:
        llm.close()
    assert len(prompt) == 15
    assert ids == expected


def test_gemma_max_tokens_ends_with_length(gemma: TransformersChatRunner) -> None:
    _, chunks = run(gemma, GenerationRequest(messages=HELLO, max_tokens=3, temperature=0))
    final = chunks[-1]
    assert (final.finish_reason, final.completion_tokens) == ("length", 3)
    assert sum(len(chunk.token_ids) for chunk in chunks) == 3


def test_gemma_seed_reproduces_sampling(gemma: TransformersChatRunner) -> None:
    def sample(seed: int) -> str:
        request = GenerationRequest(
            messages=[{"role": "user", "content": "Tell me a story."}],
            max_tokens=8,
            temperature=1.0,
            seed=seed,
        )
        return run(gemma, request)[0]

    first = sample(7)
    assert sample(7) == first
    assert len({first, sample(8), sample(9)}) > 1  # three equal 8-token samples: ~impossible


class CancelAtCheck(threading.Event):
    """An event that sets itself when it is read for the `n`-th time: the runner reads `cancel`
    once before it starts and then once after every token, so n=4 cancels after token 3."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.n, self.reads = n, 0

    def is_set(self) -> bool:
        self.reads += 1
        if self.reads >= self.n:
            self.set()
        return super().is_set()


def test_gemma_cancel_stops_within_a_token(gemma: TransformersChatRunner) -> None:
    cancel = CancelAtCheck(4)
    _, chunks = run(gemma, GenerationRequest(messages=HELLO, max_tokens=40, temperature=0), cancel)
    assert (chunks[-1].finish_reason, chunks[-1].completion_tokens) == ("stop", 3)


def test_gemma_cancel_from_the_consumer(gemma: TransformersChatRunner) -> None:
    """The route's way: cancel set while the stream is read; generation ends long before
    max_tokens (one token may be in flight, and the scheduler may be slow on a busy CPU)."""
    cancel = threading.Event()
    chunks = []
    for chunk in gemma.generate(GenerationRequest(messages=HELLO, max_tokens=60), cancel):
        chunks.append(chunk)
        cancel.set()
    assert chunks[-1].finish_reason == "stop"
    assert chunks[-1].completion_tokens is not None and chunks[-1].completion_tokens <= 5


def test_gemma_json_schema_output_validates(gemma: TransformersChatRunner) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    schema = {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 20},
            "age": {"type": "integer", "minimum": 0},
            "tags": {"type": "array", "items": {"type": "string", "maxLength": 10}, "maxItems": 3},
        },
        "required": ["name", "age", "tags"],
    }
    request = GenerationRequest(
        messages=[{"role": "user", "content": "Describe a person as JSON."}],
        max_tokens=80,
        temperature=0.7,
        seed=1,
        json_schema=schema,
    )
    text, chunks = run(gemma, request)
    assert chunks[-1].finish_reason == "stop", text
    jsonschema.validate(json.loads(text), schema)


def test_gemma_bad_json_schema_is_a_bad_request(gemma: TransformersChatRunner) -> None:
    request = GenerationRequest(messages=HELLO, json_schema={"type": "no-such-type"})
    with pytest.raises(BadRequest) as caught:
        run(gemma, request)
    assert caught.value.param == "response_format"


@pytest.mark.parametrize("keep_special", [False, True])
def test_detokenizer_streams_whole_characters(
    gemma: TransformersChatRunner, keep_special: bool
) -> None:
    from runners.token_stream import IncrementalDetokenizer

    tokenizer = gemma._require().tokenizer
    text = "Grüße, 世界! 🤗🦙 naïve<end_of_turn>\n  spaced  out"
    ids = tokenizer(text, add_special_tokens=False).input_ids
    detokenizer = IncrementalDetokenizer(tokenizer, skip_special_tokens=not keep_special)
    pieces = [detokenizer.push([token]) for token in ids]
    pieces.append(detokenizer.flush())
    assert "".join(pieces) == tokenizer.decode(ids, skip_special_tokens=not keep_special)
    assert ("<end_of_turn>" in "".join(pieces)) is keep_special
    assert not any("\ufffd" in piece for piece in pieces)
    assert sum(1 for piece in pieces if piece == "") > 0  # the emoji bytes were held back


# --- a tiny Qwen3.5 vision model ------------------------------------------------------------


def qwen_spec(context_length: int | None = None) -> PhysicalModel:
    return PhysicalModel(
        type="llm",
        backend="transformers",
        estimated_vram_gb=0.1,
        supports_vision=True,
        supports_tools=True,
        parser="qwen3.5",
        context_length=context_length,
    )


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tiny-qwen3.5")
    build_tiny_qwen35_vl(out)
    return out


@pytest.fixture(scope="module")
def qwen(qwen_dir: Path) -> Iterator[TransformersChatRunner]:
    runner = TransformersChatRunner("tiny-qwen3.5", qwen_spec(), qwen_dir)
    runner.load()
    yield runner
    runner.unload()


def png(width: int, height: int) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (200, 40, 40)).save(buffer, "PNG")
    return buffer.getvalue()


def test_qwen_generates_with_an_image_and_counts_its_tokens(qwen: TransformersChatRunner) -> None:
    request = GenerationRequest(
        messages=[
            {
                "role": "user",
                "content": [{"type": "image"}, {"type": "text", "text": "What colour is this?"}],
            }
        ],
        images=[png(32, 32)],
        max_tokens=4,
        temperature=0,
    )
    prompt = qwen.render_prompt(request)
    assert "<|vision_start|><|image_pad|><|vision_end|>What colour is this?" in prompt
    text_tokens = len(qwen._require().tokenizer(prompt, add_special_tokens=False).input_ids)
    _, chunks = run(qwen, request)
    final = chunks[-1]
    # The one <|image_pad|> of the prompt stands for (32/8)^2 / 2^2 = 4 image tokens.
    assert final.prompt_tokens == text_tokens - 1 + 4
    assert (final.finish_reason, final.completion_tokens) == ("length", 4)


def test_qwen_image_count_must_match_the_image_parts(qwen: TransformersChatRunner) -> None:
    request = GenerationRequest(
        messages=[{"role": "user", "content": [{"type": "text", "text": "No image part"}]}],
        images=[png(32, 32)],
    )
    with pytest.raises(BadRequest):
        run(qwen, request)
    with pytest.raises(BadRequest, match="image"):
        run(
            qwen,
            GenerationRequest(
                messages=[{"role": "user", "content": [{"type": "image"}]}], images=[b"not a png"]
            ),
        )


def test_qwen_enable_thinking_shapes_the_generation_prompt(qwen: TransformersChatRunner) -> None:
    def prompt(**kwargs: Any) -> str:
        return qwen.render_prompt(
            GenerationRequest(messages=[{"role": "user", "content": "Hi"}], template_kwargs=kwargs)
        )

    assert prompt(enable_thinking=True).endswith("<|im_start|>assistant\n<think>\n")
    assert prompt(enable_thinking=False).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")


def test_qwen_tools_reach_the_prompt(qwen: TransformersChatRunner) -> None:
    tool = {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather for a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": "Be useful."},
        {"role": "user", "content": "Weather in Berlin?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": {"city": "Berlin"}},
                }
            ],
        },
        {"role": "tool", "content": "sunny"},
    ]
    prompt = qwen.render_prompt(GenerationRequest(messages=messages, tools=[tool]))
    assert prompt.startswith("<|im_start|>system\nBe useful.\n\n# Tools")
    assert json.dumps(tool) in prompt
    assert "<function=get_weather>\n<parameter=city>\nBerlin\n</parameter>" in prompt
    assert "<tool_response>\nsunny\n</tool_response>" in prompt


def test_qwen_reserved_template_kwargs_do_not_change_rendering(
    qwen: TransformersChatRunner,
) -> None:
    request = GenerationRequest(
        messages=[{"role": "user", "content": "Hi"}],
        template_kwargs={"tokenize": True, "add_generation_prompt": False},
    )
    assert qwen.render_prompt(request).endswith("<|im_start|>assistant\n<think>\n")


def test_qwen_greedy_ignores_the_checkpoints_generation_config(
    qwen: TransformersChatRunner,
    qwen_dir: Path,
    tmp_path: Path,
) -> None:
    """temperature 0 is argmax at every step, even under a generation_config.json that bans
    exactly those tokens and penalises repetition (it would if generate merged it in)."""
    import shutil

    import torch

    request = GenerationRequest(
        messages=[{"role": "user", "content": "Hello world"}], max_tokens=6, temperature=0
    )
    loaded = qwen._require()
    ids = loaded.tokenizer(
        qwen.render_prompt(request), add_special_tokens=False, return_tensors="pt"
    ).input_ids.to(loaded.model.device)
    expected: list[int] = []
    with torch.no_grad():
        for _ in range(6):
            token = int(loaded.model(input_ids=ids).logits[0, -1].argmax())
            expected.append(token)
            if token in loaded.stop_token_ids:
                break
            ids = torch.cat([ids, torch.tensor([[token]], device=ids.device)], dim=1)
    hostile = tmp_path / "hostile"
    shutil.copytree(qwen_dir, hostile)
    (hostile / "generation_config.json").write_text(
        json.dumps(
            {
                "bad_words_ids": [[token] for token in set(expected)],
                "repetition_penalty": 100.0,
                "do_sample": True,
                "temperature": 5.0,
                "top_k": 1,
            }
        )
    )
    runner = TransformersChatRunner("tiny-qwen3.5", qwen_spec(), hostile)
    runner.load()
    try:
        _, chunks = run(runner, request)
    finally:
        runner.unload()
    assert [token for chunk in chunks for token in chunk.token_ids] == expected


def test_qwen_prompt_longer_than_the_context_is_refused(qwen_dir: Path) -> None:
    runner = TransformersChatRunner("tiny-qwen3.5", qwen_spec(context_length=32), qwen_dir)
    runner.load()
    try:
        with pytest.raises(BadRequest) as caught:
            run(runner, GenerationRequest(messages=[{"role": "user", "content": "Hello " * 40}]))
    finally:
        runner.unload()
    assert caught.value.param == "messages"
    assert "context of 32 tokens" in caught.value.message
    assert "The prompt is " in caught.value.message


def _generation_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("generate-")]


def test_closing_the_stream_early_joins_the_generation_thread(
    qwen: TransformersChatRunner,
) -> None:
    stream = qwen.generate(
        GenerationRequest(
            messages=[{"role": "user", "content": "Hi"}], max_tokens=200, temperature=0.0
        ),
        threading.Event(),
    )
    first = next(stream)
    assert first.token_ids
    assert _generation_threads()
    stream.close()
    assert not _generation_threads()


def test_an_error_in_generate_reaches_the_caller(
    qwen: TransformersChatRunner,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def broken(**kwargs: Any) -> None:
        raise RuntimeError("CUDA out of memory (pretend)")

    monkeypatch.setattr(qwen._require().model, "generate", broken)
    with pytest.raises(RuntimeError, match="pretend"):
        run(qwen, GenerationRequest(messages=[{"role": "user", "content": "Hi"}]))
    assert not _generation_threads()


def test_unload_frees_the_model(qwen_dir: Path) -> None:
    runner = TransformersChatRunner("tiny-qwen3.5", qwen_spec(), qwen_dir)
    runner.load()
    run(runner, GenerationRequest(messages=[{"role": "user", "content": "Hi"}], max_tokens=2))
    model = weakref.ref(runner._require().model)
    runner.unload()
    gc.collect()
    assert model() is None
    with pytest.raises(ModelLoadError, match="not loaded"):
        runner.render_prompt(GenerationRequest(messages=[]))


def test_weights_without_a_chat_template_need_one_from_the_registry(
    qwen_dir: Path,
    tmp_path: Path,
) -> None:
    import shutil

    bare = tmp_path / "bare"
    shutil.copytree(qwen_dir, bare)
    (bare / "chat_template.jinja").unlink()
    with pytest.raises(ModelLoadError, match="chat_template"):
        TransformersChatRunner("bare", qwen_spec(), bare).load()
    template = tmp_path / "plain.jinja"
    template.write_text("{% for m in messages %}{{ m.content }}|{% endfor %}<|im_start|>")
    spec = qwen_spec().model_copy(update={"chat_template": str(template)})
    runner = TransformersChatRunner("bare", spec, bare)
    runner.load()
    try:
        prompt = runner.render_prompt(
            GenerationRequest(messages=[{"role": "user", "content": "Hi"}])
        )
    finally:
        runner.unload()
    assert prompt == "Hi|<|im_start|>"


def test_missing_weights(tmp_path: Path) -> None:
    runner = TransformersChatRunner("absent", qwen_spec(), tmp_path / "absent")
    with pytest.raises(WeightsMissing) as caught:
        runner.load()
    assert caught.value.path == tmp_path / "absent" / "config.json"  # the file looked for


def test_sampling_settings() -> None:
    import torch

    from runners.sampling import _top_p_filter, make_sampler

    assert make_sampler(0.0, None, None, torch.device("cpu")) is None  # temperature 0: greedy
    kept = _top_p_filter(torch.tensor([[0.2, 0.5, 0.3]]), 0.6)
    # 0.5 alone is short of 0.6; 0.5 + 0.3 reaches it, and 0.2 goes.
    torch.testing.assert_close(kept, torch.tensor([[0.0, 0.5, 0.3]]))
    sampler = make_sampler(1.0, 0.6, 3, torch.device("cpu"))
    assert sampler is not None
    scores = torch.log(torch.tensor([[0.2, 0.5, 0.3]]))
    picks = {
        int(sampler(torch.zeros((1, 1), dtype=torch.long), scores).argmax()) for _ in range(50)
    }
    assert picks == {1, 2}


# --- gpt-oss MXFP4 --------------------------------------------------------------------------


def test_mxfp4_without_kernels_is_refused_before_loading(tmp_path: Path) -> None:
    """A tiny gpt-oss config carrying openai/gpt-oss-20b's quantization_config, and no weights:
    the refusal comes from the config alone."""
    from transformers import GptOssConfig

    from runners.mxfp4 import probe_mxfp4_environment

    blockers = mxfp4_blockers(probe_mxfp4_environment())
    if not blockers:
        pytest.skip("this machine runs MXFP4 natively: nothing to refuse")
    config = GptOssConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        num_local_experts=4,
        num_experts_per_tok=2,
    )
    config.quantization_config = {
        "quant_method": "mxfp4",
        "modules_to_not_convert": [
            "model.layers.*.self_attn",
            "model.layers.*.mlp.router",
            "model.embed_tokens",
            "lm_head",
        ],
    }
    config.save_pretrained(tmp_path)
    spec = PhysicalModel(type="llm", backend="transformers", estimated_vram_gb=13, parser="harmony")
    runner = TransformersChatRunner("gpt-oss-20b", spec, tmp_path)
    with pytest.raises(ModelLoadError) as caught:
        runner.load()
    message = caught.value.message
    assert "MXFP4" in message and "dequantize" in message
    assert all(blocker in message for blocker in blockers)
    assert runner._loaded is None


GOOD = Mxfp4Environment(
    cuda_capability=(12, 0),
    triton_version="3.5.0",
    triton_ok=True,
    kernels_version="0.18.2",
    kernels_ok=True,
    kernels_range=">=0.18.2,<0.19.0",
)


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        (GOOD, []),
        (
            Mxfp4Environment(None, "3.5.0", True, "0.18.2", True, ">=0.18.2,<0.19.0"),
            ["no CUDA GPU"],
        ),
        (
            Mxfp4Environment((7, 0), "3.5.0", True, "0.18.2", True, ">=0.18.2,<0.19.0"),
            ["compute capability 7.0"],
        ),
        (
            Mxfp4Environment((12, 0), None, False, None, False, ">=0.18.2,<0.19.0"),
            [
                "triton >= 3.4.0 (not installed)",
                "kernels` package, >=0.18.2,<0.19.0 (not installed)",
            ],
        ),
        (
            Mxfp4Environment((12, 0), "3.3.0", False, "0.20.0", False, ">=0.18.2,<0.19.0"),
            ["3.3.0 is installed", "0.20.0 is installed"],
        ),
    ],
)
def test_mxfp4_blockers(env: Mxfp4Environment, expected: list[str]) -> None:
    blockers = mxfp4_blockers(env)
    assert len(blockers) == len(expected)
    for blocker, words in zip(blockers, expected, strict=True):
        assert words in blocker


@pytest.mark.parametrize(
    ("quantization_config", "expected"),
    [
        (None, False),
        ({"quant_method": "mxfp4"}, True),
        ({"quant_method": "mxfp4", "dequantize": True}, False),  # the operator chose bf16
        ({"quant_method": "fp8"}, False),
    ],
)
def test_is_mxfp4_checkpoint(quantization_config: dict[str, Any] | None, expected: bool) -> None:
    assert is_mxfp4_checkpoint(quantization_config) is expected

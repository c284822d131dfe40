"""The llama.cpp runner's compute options and prompt reuse (issue #16).

The reuse tests run the real Qwen2.5-Coder 0.5B GGUF of the embedded default: a chat's long
prompt, an unrelated short one (Open WebUI's title request), then the chat's next message, which
must evaluate only its new tokens and answer exactly as a cold runner does.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest

from llmux.core.config import PhysicalModel
from llmux.core.errors import BadRequest
from runners.chat import GenerationChunk, GenerationRequest
from runners.cpus import physical_cores
from runners.llamacpp import LlamaCppChatRunner
from runners.prompt_states import MIN_SAVED_TOKENS, common_prefix
from tests.conftest import MODELS_DIR, real_models

QWEN = MODELS_DIR / "qwen2.5-coder-0.5b" / "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
slow, needs_qwen = real_models(QWEN)


def spec(**fields: Any) -> PhysicalModel:
    return PhysicalModel(
        type="llm",
        backend="llamacpp",
        model_file=QWEN.name,
        estimated_vram_gb=0.6,
        context_length=2048,
        **fields,
    )


# --- threads, batch, flash attention ---------------------------------------------------------


class RecordingLlama:
    """Stands in for llama_cpp.Llama at load: keeps the keyword arguments it was built with,
    and how many of those built were closed again."""

    built: ClassVar[list[dict[str, Any]]] = []
    closed: ClassVar[int] = 0

    def __init__(self, **kwargs: Any) -> None:
        RecordingLlama.built.append(kwargs)
        self.metadata = {"tokenizer.chat_template": "{{ messages }}"}

    def close(self) -> None:
        RecordingLlama.closed += 1


class NoContext:
    def __init__(self, llm: Any) -> None:
        self.truncatable = True


@pytest.fixture
def recorded(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Path]:
    import llama_cpp

    monkeypatch.setattr(llama_cpp, "Llama", RecordingLlama)
    monkeypatch.setattr("runners.llamacpp.LlamaContext", NoContext)
    (tmp_path / QWEN.name).write_bytes(b"GGUF" + bytes(60))
    RecordingLlama.built.clear()
    RecordingLlama.closed = 0
    yield tmp_path


def test_threads_default_to_the_physical_cores_for_prompts_and_generation(recorded: Path) -> None:
    runner = LlamaCppChatRunner("m", spec(), recorded)
    runner.load()
    built = RecordingLlama.built[-1]
    assert built["n_threads"] == built["n_threads_batch"] == physical_cores()
    assert "n_batch" not in built and "flash_attn" not in built  # llama-cpp-python's defaults
    runner.unload()
    assert RecordingLlama.closed == 1


def test_models_yaml_sets_threads_batch_and_flash_attention(recorded: Path) -> None:
    LlamaCppChatRunner("m", spec(n_threads=3, n_batch=2048, flash_attn=True), recorded).load()
    built = RecordingLlama.built[-1]
    assert (built["n_threads"], built["n_threads_batch"]) == (3, 3)
    assert (built["n_batch"], built["flash_attn"]) == (2048, True)


def cpu_tree(root: Path, cores: dict[int, tuple[int, int]]) -> Path:
    """A sysfs cpu directory: logical CPU -> (package, core id)."""
    for cpu, (package, core) in cores.items():
        topology = root / f"cpu{cpu}" / "topology"
        topology.mkdir(parents=True)
        (topology / "physical_package_id").write_text(f"{package}\n")
        (topology / "core_id").write_text(f"{core}\n")
    return root


# Two packages of two cores with two SMT threads each: CPUs n and n+4 are siblings.
SMT = {cpu: (cpu // 2 % 2, cpu % 2) for cpu in range(8)}


@pytest.mark.parametrize(
    ("affinity", "cores"),
    [
        (set(range(8)), 4),  # siblings count once
        ({0, 4}, 1),  # one core's two threads
        ({0, 1}, 2),
        ({0, 2}, 2),  # core 0 of each package
    ],
)
def test_physical_cores_counts_cores_within_the_affinity(
    tmp_path: Path, affinity: set[int], cores: int
) -> None:
    sysfs = cpu_tree(tmp_path / "cpu", SMT)
    assert physical_cores(affinity, sysfs=sysfs, cgroup=tmp_path / "no-cgroup") == cores


@pytest.mark.parametrize(
    ("files", "cores"),
    [
        ({"cpu.max": "150000 100000\n"}, 2),  # a 1.5-CPU limit: two threads, not four
        ({"cpu.max": "max 100000\n"}, 4),
        ({"cpu/cpu.cfs_quota_us": "100000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 1),
        ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, 4),
    ],
)
def test_a_cgroup_cpu_quota_caps_the_threads(
    tmp_path: Path, files: dict[str, str], cores: int
) -> None:
    cgroup = tmp_path / "cgroup"
    for name, text in files.items():
        (cgroup / name).parent.mkdir(parents=True, exist_ok=True)
        (cgroup / name).write_text(text)
    sysfs = cpu_tree(tmp_path / "cpu", SMT)
    assert physical_cores(set(range(8)), sysfs=sysfs, cgroup=cgroup) == cores


def test_without_sysfs_every_usable_cpu_counts(tmp_path: Path) -> None:
    assert physical_cores({0, 1, 2}, sysfs=tmp_path / "none", cgroup=tmp_path / "none") == 3


# --- prompt reuse on the real model ----------------------------------------------------------

TOOLS_TEXT = " ".join(
    f"Tool {n}: fetch_{n}(url: string) returns the page at url as markdown, step {n}."
    for n in range(14)
)
FIRST = [
    {"role": "system", "content": "You are a helpful assistant. Tools:\n" + TOOLS_TEXT},
    {"role": "user", "content": "Write a haiku about autumn."},
]
TITLE = [{"role": "user", "content": "Give a three-word title for: autumn haiku."}]


def greedy(messages: list[dict[str, Any]], max_tokens: int = 8) -> GenerationRequest:
    return GenerationRequest(messages=messages, max_tokens=max_tokens, temperature=0)


def answer(runner: LlamaCppChatRunner, request: GenerationRequest) -> tuple[str, list[int]]:
    runner.check(request)
    text, ids = "", []
    for chunk in runner.generate(request, threading.Event()):
        text += chunk.text
        ids.extend(chunk.token_ids)
    return text, ids


class CountingEval:
    """Wraps a Llama's eval: how many tokens each call evaluated."""

    def __init__(self, runner: LlamaCppChatRunner) -> None:
        llm = runner._llm
        assert llm is not None
        self.calls: list[int] = []
        original = llm.eval

        def counting(tokens: Any) -> None:
            self.calls.append(len(tokens))
            original(tokens)

        llm.eval = counting  # type: ignore[method-assign]


def second_message(first_answer: str) -> list[dict[str, Any]]:
    return [
        *FIRST,
        {"role": "assistant", "content": first_answer},
        {"role": "user", "content": "Now one about winter."},
    ]


def cold_answer(request: GenerationRequest) -> list[int]:
    cold = LlamaCppChatRunner("cold", spec(prefix_cache_mb=0), QWEN.parent, device="cpu")
    cold.load()
    try:
        return answer(cold, request)[1]
    finally:
        cold.unload()


@pytest.mark.parametrize("truncatable", [True, False], ids=["attention", "recurrent-rule"])
@slow
@needs_qwen
def test_after_an_unrelated_request_the_chat_s_next_message_evaluates_only_its_new_tokens(
    truncatable: bool,
) -> None:
    """`recurrent-rule` runs the real context under the rule for recurrent and hybrid models
    (a state is used only whole). The history shows the first answer otherwise than it was
    generated (as Qwen3.5's template drops its thinking), so the state at the end of that answer
    is of no use there: the one kept where the first prompt's last message began serves."""
    runner = LlamaCppChatRunner("qwen", spec(), QWEN.parent, device="cpu")
    runner.load()
    try:
        assert runner._prompts is not None
        runner._prompts.context.truncatable = truncatable
        first_prompt = runner._tokenize(greedy(FIRST))
        assert len(first_prompt) >= MIN_SAVED_TOKENS
        _, first_ids = answer(runner, greedy(FIRST))
        answer(runner, greedy(TITLE))
        second = greedy(second_message("(an answer shown otherwise)"))
        second_prompt = runner._tokenize(second)
        evals = CountingEval(runner)
        _, ids = answer(runner, second)
        prefill = len(second_prompt) - evals.calls[0]  # the tokens not evaluated again
        shared = common_prefix(first_prompt, second_prompt)
        if truncatable:  # everything the two prompts share
            assert shared <= prefill <= common_prefix(first_prompt + first_ids, second_prompt)
        else:  # up to where the first prompt's last message began
            variant = greedy([FIRST[0], {"role": "user", "content": "."}])
            assert prefill == common_prefix(first_prompt, runner._tokenize(variant))
        assert prefill >= shared - 16
        assert ids == cold_answer(second)
    finally:
        runner.unload()


@slow
@needs_qwen
def test_unload_frees_the_saved_states_and_check_tokenizes_for_generate() -> None:
    runner = LlamaCppChatRunner("qwen", spec(), QWEN.parent, device="cpu")
    runner.load()
    llm = runner._llm
    assert llm is not None
    tokenized: list[int] = []
    original = llm.tokenize

    def counting(text: bytes, *args: Any, **kwargs: Any) -> list[int]:
        tokenized.append(len(text))
        return original(text, *args, **kwargs)

    llm.tokenize = counting  # type: ignore[method-assign]
    request = greedy(FIRST, max_tokens=2)
    runner.check(request)
    prompt_tokenized = len(tokenized)
    list(runner.generate(request, threading.Event()))
    assert len(tokenized) == prompt_tokenized  # the prompt is not tokenized again
    assert runner.prompt_cache_bytes() > 0
    runner.unload()
    assert runner.prompt_cache_bytes() == 0 and runner._prompts is None


def test_after_an_image_request_the_context_s_token_record_is_not_trusted() -> None:
    """MTMD evaluates image embeddings at positions whose token ids it leaves as they were: a
    text prompt that matched those stale ids would start from an image's state."""
    import io

    from PIL import Image

    from runners.prompt_states import PromptStates
    from tests.test_prompt_states import FakeContext

    class Handler:
        def __call__(self, **kwargs: Any) -> Iterator[dict[str, Any]]:
            yield {"choices": [{"delta": {"content": "A cat."}, "finish_reason": "stop"}]}

    class Llm:
        n_tokens = 12

        def tokenize(self, data: bytes, add_bos: bool, special: bool) -> list[int]:
            return [1, 2]

    runner = LlamaCppChatRunner("m", spec(mmproj_file="p.gguf"), Path("/nowhere"))
    context = FakeContext()
    context.tokens = list(range(10))  # what the text path left, then overwritten by an image
    states = PromptStates(context, budget_bytes=0)
    runner._llm, runner._template, runner._vision = Llm(), object(), Handler()  # type: ignore[assignment]
    runner._prompts = states
    png = io.BytesIO()
    Image.new("RGB", (2, 2)).save(png, format="PNG")
    request = GenerationRequest(
        messages=[{"role": "user", "content": [{"type": "image"}]}], images=[png.getvalue()]
    )
    list(runner.generate(request, threading.Event()))
    assert states.start(list(range(12))) == 0 and context.tokens == []


@slow
@needs_qwen
def test_generations_compute_on_one_thread_whoever_asks() -> None:
    """llama.cpp's CPU threads are an OpenMP team per calling thread: generations called from
    the model's several worker threads left each earlier caller's team spinning on the cores."""
    runner = LlamaCppChatRunner("qwen", spec(), QWEN.parent, device="cpu")
    runner.load()
    llm = runner._llm
    assert llm is not None
    computed_on: set[int] = set()
    original = llm.eval

    def recording(tokens: Any) -> None:
        computed_on.add(threading.get_ident())
        original(tokens)

    llm.eval = recording  # type: ignore[method-assign]
    callers: set[int] = set()
    texts: list[str] = []
    one_at_a_time = threading.Lock()  # as the chat session serialises a model's generations
    all_asked = threading.Barrier(3)  # the callers live on to the end: three distinct threads

    def ask(question: str) -> None:
        callers.add(threading.get_ident())
        with one_at_a_time:
            texts.append(answer(runner, greedy([{"role": "user", "content": question}], 3))[0])
        all_asked.wait(timeout=120)

    try:
        asking = [
            threading.Thread(target=ask, args=(question,))
            for question in ("Say hi.", "Say bye.", "Count to three.")
        ]
        for caller in asking:
            caller.start()
        for caller in asking:
            caller.join()
        assert len(callers) == 3 and len(texts) == 3 and all(texts)
        assert len(computed_on) == 1 and not computed_on & callers
    finally:
        runner.unload()


@slow
@needs_qwen
def test_a_reader_that_stops_early_stops_the_computation() -> None:
    runner = LlamaCppChatRunner("qwen", spec(), QWEN.parent, device="cpu")
    runner.load()
    try:
        cancel = threading.Event()
        stream = runner.generate(greedy(FIRST, max_tokens=200), cancel)
        next(stream)
        stream.close()  # returns only once the compute thread has let go of the model
        assert cancel.is_set()
        assert runner._compute.submit(lambda: None).result(timeout=5) is None  # thread free
    finally:
        runner.unload()


@slow
@needs_qwen
def test_start_hands_chunks_over_from_the_compute_thread_and_its_future_carries_errors() -> None:
    """The chat session's streams take `start`: one hand-over per token, from the compute thread
    straight to the event loop."""
    runner = LlamaCppChatRunner("qwen", spec(), QWEN.parent, device="cpu")
    runner.load()
    try:
        emitted: list[tuple[str, GenerationChunk]] = []

        def emit(chunk: GenerationChunk) -> None:
            emitted.append((threading.current_thread().name, chunk))

        request = greedy([{"role": "user", "content": "Say hi."}], 4)
        assert runner.start(request, threading.Event(), emit).result(timeout=120) is None
        threads = {name for name, _ in emitted}
        assert len(threads) == 1 and threads.pop().startswith("llama-qwen")
        assert emitted[-1][1].finish_reason is not None
        assert "".join(chunk.text for _, chunk in emitted) == answer(runner, request)[0]

        emitted.clear()
        too_long = GenerationRequest(
            messages=[{"role": "user", "content": "word " * 3000}], max_tokens=4
        )
        failed = runner.start(too_long, threading.Event(), emit).exception(timeout=120)
        assert isinstance(failed, BadRequest) and emitted == []
    finally:
        runner.unload()

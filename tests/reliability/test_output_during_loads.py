"""No output of the process is lost while a GGUF loads (reliability issue, item 5).

llama-cpp-python points file descriptors 1 and 2 at /dev/null around a quiet load; every other
thread's writes vanished meanwhile, the access log of requests served during the load with them.
"""

from __future__ import annotations

import os
import threading
import time

import pytest

from llmux.core.config import PhysicalModel
from runners.llamacpp import LlamaCppChatRunner
from tests.conftest import GEMMA, REPO, real_models

pytestmark = real_models(GEMMA)


def test_lines_written_by_another_thread_during_a_load_all_arrive(
    capfd: pytest.CaptureFixture[str],
) -> None:
    spec = PhysicalModel(
        type="llm",
        backend="llamacpp",
        model_file=GEMMA.name,
        estimated_vram_gb=0.5,
        chat_template=str(REPO / "config/local/templates/gemma3.jinja"),
        context_length=512,
    )
    runner = LlamaCppChatRunner("gemma", spec, GEMMA.parent)
    loading = threading.Event()
    done = threading.Event()
    written: list[int] = []

    def access_log() -> None:
        n = 0
        while not done.is_set():
            if loading.is_set():
                os.write(2, f"access-log line {n}\n".encode())
                written.append(n)
                n += 1
            time.sleep(0.002)

    writer = threading.Thread(target=access_log)
    writer.start()
    try:
        loading.set()
        try:
            runner.load()
        finally:
            loading.clear()
    finally:
        done.set()
        writer.join()
        runner.unload()
    err = capfd.readouterr().err
    assert written, "the writer wrote nothing while the model loaded"
    missing = [n for n in written if f"access-log line {n}\n" not in err]
    assert missing == [], f"{len(missing)} of {len(written)} lines lost during the load"

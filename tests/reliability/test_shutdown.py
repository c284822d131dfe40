"""SIGTERM during a stream, against a real `bentoml serve`: shutdown is bounded by llmux's grace,
not by the stream's `max_tokens`, and the stream ends cleanly (its last line is `[DONE]`).

Before llmux heard SIGTERM itself, uvicorn waited for every open connection (without limit)
before the app's shutdown ran, so a long generation held the whole shutdown for its length.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import httpx

from tests.conftest import GEMMA, TEST_KEY, gemma_entry, real_models, write_config
from tests.test_serve import start_server

pytestmark = real_models(GEMMA)

GRACE_S = 1.0
# Far more tokens than the gemma base model writes in the bound below on two CPU cores.
MAX_TOKENS = 4000
BOUND_S = 20.0


def test_sigterm_mid_stream_ends_the_stream_cleanly_within_the_grace(tmp_path: Path) -> None:
    registry = f"physical_models:\n  gemma:\n{gemma_entry()}\n"
    config = write_config(
        tmp_path / "config", registry + "virtual_models:\n  Gemma: {physical: gemma}\n"
    )
    proc, base, log = start_server(
        config, tmp_path, {"LLMUX_SHUTDOWN_GRACE_S": str(GRACE_S), "LLMUX_STREAM_STALL_S": "120"}
    )
    try:
        body = {
            "model": "Gemma",
            "stream": True,
            "max_tokens": MAX_TOKENS,
            "temperature": 0,
            "messages": [{"role": "user", "content": "Count from 1 to 5000: 1, 2, 3,"}],
        }
        lines: list[str] = []
        with httpx.stream(
            "POST", f"{base}/v1/chat/completions", json=body,
            headers={"Authorization": f"Bearer {TEST_KEY}"}, timeout=httpx.Timeout(120),
        ) as response:  # fmt: skip
            assert response.status_code == 200
            stream = response.iter_lines()
            while sum(1 for line in lines if line.startswith("data: {")) < 5:
                lines.append(next(stream))
            os.kill(proc.pid, signal.SIGTERM)  # what `podman stop` sends the container's process
            signalled = time.monotonic()
            lines.extend(stream)
            ended = time.monotonic() - signalled
        events = [line for line in lines if line]
        assert events[-1] == "data: [DONE]", events[-3:]
        chunks = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
        assert chunks[-1]["choices"][0]["finish_reason"] is not None
        assert ended < BOUND_S, f"the stream ran on {ended:.1f} s after SIGTERM"
        proc.wait(timeout=BOUND_S)
        assert time.monotonic() - signalled < BOUND_S
        assert "stopping generations in progress" in (tmp_path / "serve.log").read_text()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()

"""The servers a run compares, each started on a free loopback port and stopped at the end:
llmux (`bentoml serve service:LLMux`, with its own config dir and BENTOML_HOME, as
tests/test_serve.py and scripts/soak.py start it), a bare Starlette app under the same server
(`bentoml serve bench.bare_service:Bare`), and `python -m llama_cpp.server`.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import yaml

from bench import qwen_transformers as qwen
from llmux.settings import SERVE_FLAGS
from runners.cpus import physical_cores

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
KEY = "sk-llmux-bench-" + "b" * 32


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Served:
    name: str
    proc: subprocess.Popen[bytes]
    base: str
    log: Path
    startup_s: float

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=40)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()

    def rss(self) -> tuple[int, int]:
        """(the largest resident set among the server's processes, their sum), in bytes."""
        sizes = [rss for pid, rss in _processes().items() if _descends(pid, self.proc.pid)]
        return max(sizes, default=0), sum(sizes)


def _status(pid: int) -> dict[str, str]:
    text = Path(f"/proc/{pid}/status").read_text()
    return dict(line.split(":", 1) for line in text.splitlines() if ":" in line)


def _processes() -> dict[int, int]:
    """Every process's resident set in bytes, by pid."""
    found = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                rss = _status(int(entry.name)).get("VmRSS", "0 kB").split()[0]
            except OSError:
                continue
            found[int(entry.name)] = int(rss) * 1024
    return found


def _descends(pid: int, root: int) -> bool:
    """`pid` is `root` or one of its descendants."""
    for _ in range(16):
        if pid == root:
            return True
        if pid in (0, 1):
            return False
        try:
            pid = int(_status(pid)["PPid"])
        except (OSError, KeyError, ValueError):
            return False
    return False


def _start(
    name: str, argv: list[str], env: dict[str, str], log: Path, ready: str, timeout_s: float
) -> Served:
    """Run `argv` in a session of its own and wait for GET `ready` to answer 200; the seconds
    from the spawn to that answer are its start-up time."""
    port = int(env["BENTOML_PORT"])
    base = f"http://127.0.0.1:{port}"
    out = log.open("wb")
    started = time.perf_counter()
    proc = subprocess.Popen(
        argv, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
    )
    out.close()
    deadline = started + timeout_s
    while time.perf_counter() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(base + ready, timeout=1).status_code == 200:
                return Served(name, proc, base, log, time.perf_counter() - started)
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    served = Served(name, proc, base, log, timeout_s)
    served.stop()
    raise RuntimeError(f"{name} did not answer {ready} in {timeout_s:.0f} s:\n{log.read_text()}")


def _env(work: Path, home: str, **extra: str) -> dict[str, str]:
    """A server's environment: a free port, and a BentoML home of its own (BentoML keeps its
    Prometheus files there, and two servers sharing one would mix or wipe their metrics)."""
    return {
        **os.environ,
        "BENTOML_HOME": str(work / home),
        "BENTOML_DO_NOT_TRACK": "true",
        "BENTOML_HOST": "127.0.0.1",
        "BENTOML_PORT": str(free_port()),
        "HF_HUB_OFFLINE": "1",
        **extra,
    }


def models_dir() -> Path:
    """Where `make setup` laid out the embedded default's models."""
    configured = os.environ.get("LLMUX_MODELS_DIR")
    if configured:
        return Path(configured)
    data = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(data) / "llmux" / "models"


def write_llmux_config(
    work: Path, tiny_transformers: Path | None, qwen_transformers: Path | None = None
) -> Path:
    """The embedded default (config/local) with an admin key of the bench's own and, when
    given, a tiny transformers chat model as `Tiny-Transformers` and the default's Qwen as a
    transformers checkpoint (bench/qwen_transformers.py)."""
    config = work / "config"
    if config.exists():
        return config
    shutil.copytree(REPO / "config" / "local", config)
    registry: dict[str, Any] = yaml.safe_load((config / "models.yaml").read_text())
    if tiny_transformers is not None:
        registry["physical_models"]["tiny-transformers"] = {
            "type": "llm",
            "backend": "transformers",
            "path": str(tiny_transformers),
            "estimated_vram_gb": 0.1,
            "parser": "qwen3.5",
            "supports_tools": True,
        }
        registry["virtual_models"]["Tiny-Transformers"] = {
            "physical": "tiny-transformers",
            "params": {"enable_thinking": False},
        }
        # A warm tier of its own size: the embedded default's 16 GB GPU budget, taken off the
        # host's RAM on a machine without a GPU, leaves none by default on a small laptop.
        registry["host_budget_gb"] = 1
    if qwen_transformers is not None:
        registry["physical_models"][qwen.PHYSICAL] = {
            "type": "llm",
            "backend": "transformers",
            "path": str(qwen_transformers),
            "estimated_vram_gb": 2.5,
            "context_length": qwen.CONTEXT,
        }
        registry["virtual_models"][qwen.LLM] = {"physical": qwen.PHYSICAL}
    (config / "models.yaml").write_text(yaml.safe_dump(registry, sort_keys=False))
    (config / "api_keys.yaml").write_text(
        yaml.safe_dump({"api_keys": [{"key": KEY, "name": "bench", "role": "admin"}]})
    )
    return config


def start_llmux(work: Path, config: Path, *, run: int = 0) -> Served:
    dirs = {"LLMUX_CONFIG_DIR": str(config), "LLMUX_MODELS_DIR": str(models_dir())}
    env = _env(work, f"bentoml-llmux-{run}", **dirs)
    return _start(
        "llmux",
        [str(BIN / "bentoml"), "serve", "service:LLMux", *SERVE_FLAGS],
        env,
        work / f"llmux-{run}.log",
        "/health",
        180,
    )


def start_bare(work: Path, bodies: Path, *, run: int = 0) -> Served:
    env = _env(work, f"bentoml-bare-{run}", BENCH_BARE_BODIES=str(bodies))
    return _start(
        "bare Starlette",
        [str(BIN / "bentoml"), "serve", "bench.bare_service:Bare"],
        env,
        work / f"bare-{run}.log",
        "/health",
        120,
    )


def start_llama_server(work: Path, model: Path, n_ctx: int) -> Served:
    env = _env(work, "llama-server")
    argv = [
        str(BIN / "python"),
        "-m",
        "llama_cpp.server",
        "--model",
        str(model),
        "--host",
        "127.0.0.1",
        "--port",
        env["BENTOML_PORT"],
        "--n_ctx",
        str(n_ctx),
        "--n_gpu_layers",
        "-1",
        # llmux's default threads, not llama_cpp.server's (half the logical CPUs).
        "--n_threads",
        str(physical_cores()),
        "--n_threads_batch",
        str(physical_cores()),
    ]
    return _start("llama_cpp.server", argv, env, work / "llama-server.log", "/v1/models", 120)


def start_uvicorn_bare(work: Path, bodies: Path) -> Served:
    """The same bare app under plain uvicorn, without BentoML: how much of the floor is the
    server's own."""
    env = _env(work, "uvicorn", BENCH_BARE_BODIES=str(bodies))
    argv = [
        str(BIN / "python"),
        "-m",
        "uvicorn",
        "bench.bare_service:app",
        "--host",
        "127.0.0.1",
        "--port",
        env["BENTOML_PORT"],
        "--no-access-log",
        "--log-level",
        "warning",
    ]
    return _start("uvicorn", argv, env, work / "uvicorn-bare.log", "/health", 60)

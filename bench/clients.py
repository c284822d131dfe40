"""What the bench sends over HTTP: one streamed chat completion timed token by token, concurrent
streams, and a keep-alive load generator for the cheap endpoints.

Tokens are counted from the stream's `usage` (stream_options.include_usage), not from its chunks:
llmux merges text it held back into one chunk. A server that sends no usage in a stream
(llama_cpp.server) has its tokens counted from chunks, and the result says so.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import httpx


@dataclass
class StreamResult:
    """One streamed answer. Times in seconds from the moment the request was sent."""

    ttft_s: float | None = None
    finish_s: float | None = None
    tokens: int = 0
    prompt_tokens: int | None = None
    counted_from: str = "usage"
    text: str = ""
    error: str | None = None
    started_at: float = 0.0

    @property
    def decode_tok_s(self) -> float | None:
        """Tokens after the first over the time from the first to the end: the streaming
        rate, apart from the time to the first token."""
        if self.ttft_s is None or self.finish_s is None or self.tokens < 2:
            return None
        span = self.finish_s - self.ttft_s
        return (self.tokens - 1) / span if span > 0 else None


def _delta_has_output(delta: dict[str, Any]) -> bool:
    return bool(delta.get("content") or delta.get("reasoning_content") or delta.get("tool_calls"))


def stream_chat(
    client: httpx.Client, base: str, key: str, body: dict[str, Any], timeout_s: float = 900
) -> StreamResult:
    """POST `body` (stream forced on, usage asked for) and time it."""
    payload = {**body, "stream": True, "stream_options": {"include_usage": True}}
    result = StreamResult(started_at=time.perf_counter())
    sent = result.started_at
    chunks = 0
    pieces: list[str] = []
    try:
        with client.stream(
            "POST",
            f"{base}/v1/chat/completions",
            json=payload,
            headers={"Authorization": f"Bearer {key}"},
            timeout=timeout_s,
        ) as response:
            if response.status_code != 200:
                response.read()
                result.error = f"HTTP {response.status_code}: {response.text[:200]}"
                return result
            for line in response.iter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                now = time.perf_counter() - sent
                if chunk.get("usage"):
                    result.tokens = int(chunk["usage"]["completion_tokens"])
                    result.prompt_tokens = int(chunk["usage"]["prompt_tokens"])
                for choice in chunk.get("choices") or []:
                    delta = choice.get("delta") or {}
                    if _delta_has_output(delta):
                        chunks += 1
                        pieces.append(delta.get("content") or "")
                        if result.ttft_s is None:
                            result.ttft_s = now
                    if choice.get("finish_reason"):
                        result.finish_s = now
    except (httpx.HTTPError, json.JSONDecodeError, KeyError, ValueError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"
        return result
    if result.prompt_tokens is None:
        result.tokens, result.counted_from = chunks, "chunks"
    result.text = "".join(pieces)
    if result.finish_s is None:
        result.error = "the stream ended without a finish_reason"
    return result


@dataclass
class Burst:
    """k streams sent at once."""

    results: list[StreamResult] = field(default_factory=list)
    wall_s: float = 0.0

    @property
    def aggregate_tok_s(self) -> float | None:
        tokens = sum(r.tokens for r in self.results if r.error is None)
        return tokens / self.wall_s if self.wall_s > 0 and tokens else None

    @property
    def errors(self) -> int:
        return sum(r.error is not None for r in self.results)


def concurrent_streams(
    base: str, key: str, body: dict[str, Any], streams: int, timeout_s: float = 900
) -> Burst:
    """`streams` identical streamed requests at once, each on its own connection; the wall
    time from the first sent to the last finished."""
    gate = threading.Barrier(streams)
    limits = httpx.Limits(max_connections=streams, max_keepalive_connections=streams)
    with httpx.Client(limits=limits) as client:

        def one(_: int) -> StreamResult:
            gate.wait()
            return stream_chat(client, base, key, body, timeout_s)

        started = time.perf_counter()
        with ThreadPoolExecutor(streams) as pool:
            results = list(pool.map(one, range(streams)))
        ended = time.perf_counter()
    return Burst(results=results, wall_s=ended - started)


# --- the cheap endpoints: a keep-alive HTTP/1.1 load generator ----------------------------------


async def _read_response(reader: asyncio.StreamReader) -> int:
    """Read one response whole; its status code."""
    status_line = await reader.readline()
    if not status_line:
        raise ConnectionError("the server closed the connection")
    status = int(status_line.split()[1])
    length, chunked = 0, False
    while True:
        line = await reader.readline()
        if line in (b"\r\n", b"\n", b""):
            break
        name, _, value = line.decode("latin-1").partition(":")
        name = name.strip().lower()
        if name == "content-length":
            length = int(value)
        elif name == "transfer-encoding" and "chunked" in value.lower():
            chunked = True
    if chunked:
        while True:
            size = int((await reader.readline()).split(b";")[0], 16)
            await reader.readexactly(size + 2)
            if size == 0:
                break
    elif length:
        await reader.readexactly(length)
    return status


async def _hammer(
    host: str, port: int, path: str, headers: dict[str, str], duration_s: float, connections: int
) -> tuple[int, int, float]:
    head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    request = f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\n{head}\r\n".encode()
    # Connect first, then count: the rate is of requests, not of connection set-up.
    pairs = [await asyncio.open_connection(host, port) for _ in range(connections)]
    started = time.perf_counter()
    stop_at = started + duration_s

    async def one(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> tuple[int, int]:
        done = failed = 0
        while time.perf_counter() < stop_at:
            writer.write(request)
            status = await _read_response(reader)
            if status == 200:
                done += 1
            else:
                failed += 1
        return done, failed

    counts = await asyncio.gather(*(one(r, w) for r, w in pairs))
    elapsed = time.perf_counter() - started
    for _, writer in pairs:
        writer.close()
    return sum(c[0] for c in counts), sum(c[1] for c in counts), elapsed


def requests_per_second(
    base: str, path: str, headers: dict[str, str], duration_s: float, connections: int
) -> tuple[float, int]:
    """Requests/s answered 200 over `duration_s` by `connections` keep-alive connections, each
    sending its next request when the last was answered; and how many were not 200."""
    url = httpx.URL(base)
    done, failed, elapsed = asyncio.run(
        _hammer(url.host, url.port or 80, path, headers, duration_s, connections)
    )
    return done / elapsed, failed

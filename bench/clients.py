"""What the bench sends over HTTP: one streamed chat completion timed token by token, concurrent
streams, and a keep-alive load generator for the cheap endpoints.

Tokens are counted from the stream's `usage` (stream_options.include_usage), not from its chunks:
llmux merges text it held back into one chunk. A server that sends no usage in a stream
(llama_cpp.server) has its tokens counted from chunks, and the result says so.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import re
import socket
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


class Streams:
    """Keep-alive HTTP/1.1 connections, one per server, for timed streams.

    While an answer streams, this client only receives bytes and notes when each read came; it
    undoes the chunked transfer coding and parses the events after the stream has ended, as it
    would have read them at those times. On a 2-core machine the client shares the cores of the
    server it times: httpx, parsing each event as it came, took 0.27-0.35 ms of CPU a token
    there, where this takes under 0.1, and an in-process contender has no client at all."""

    def __init__(self) -> None:
        self._sockets: dict[tuple[str, int], socket.socket] = {}

    def __enter__(self) -> Streams:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for sock in self._sockets.values():
            sock.close()
        self._sockets.clear()

    def post(
        self, base: str, path: str, headers: dict[str, str], payload: bytes, timeout_s: float
    ) -> tuple[int, list[tuple[float, bytes]]]:
        """POST `payload` and read the whole response: its status and its body as read, each
        piece (transfer coding undone) with the `perf_counter` of its read. A connection the
        server closed while idle is opened again, once, before any byte of an answer."""
        url = httpx.URL(base)
        address = (url.host, url.port or 80)
        head = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
        request = (
            f"POST {path} HTTP/1.1\r\nHost: {address[0]}:{address[1]}\r\n{head}"
            f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n"
        ).encode() + payload
        idle = self._sockets.pop(address, None)
        if idle is not None:
            try:
                return self._exchange(idle, address, request, timeout_s)
            except _Stale:
                pass  # closed by the server while idle: once more, on a new connection
        fresh = socket.create_connection(address, timeout=timeout_s)
        fresh.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return self._exchange(fresh, address, request, timeout_s)

    def _exchange(
        self, sock: socket.socket, address: tuple[str, int], request: bytes, timeout_s: float
    ) -> tuple[int, list[tuple[float, bytes]]]:
        """One request and its response on `sock`, kept for the next if the server keeps it."""
        try:
            sock.settimeout(timeout_s)
            try:
                sock.sendall(request)
            except ConnectionError as exc:
                raise _Stale() from exc
            status, fields, body = _receive(sock)
        except BaseException:
            sock.close()
            raise
        chunked = "chunked" in fields.get("transfer-encoding", "")
        if fields.get("connection") != "close" and (chunked or "content-length" in fields):
            self._sockets[address] = sock
        else:
            sock.close()
        if not chunked:
            return status, [(when, data) for when, data in body if data]
        dechunk = Dechunker()
        return status, [(when, dechunk.feed(data)) for when, data in body]


class _Stale(ConnectionError):
    """The server closed the connection before any byte of a response."""

    def __init__(self) -> None:
        super().__init__("the server closed the connection before answering")


def _response_head(head: bytes) -> tuple[int, dict[str, str]]:
    """An HTTP/1.1 response's status and header fields (names and values in lower case)."""
    status_line, *lines = head.decode("latin-1").split("\r\n")
    fields: dict[str, str] = {}
    for line in lines:
        name, _, value = line.partition(":")
        fields[name.strip().lower()] = value.strip().lower()
    return int(status_line.split()[1]), fields


def _recv(sock: socket.socket, reads: list[tuple[float, bytes]]) -> bytes:
    """One read of a response under way, noted with its time."""
    data = sock.recv(1 << 16)
    if not data:
        raise ConnectionError("the server closed the connection mid-response")
    reads.append((time.perf_counter(), data))
    return data


def _receive(
    sock: socket.socket,
) -> tuple[int, dict[str, str], list[tuple[float, bytes]]]:
    """A response read whole, and nothing else done while it streams: its status, its header
    fields, and its body as read (transfer coding not undone), each piece with the time of
    the read that brought it."""
    head = sock.recv(1 << 16)
    if not head:
        raise _Stale()
    reads = [(time.perf_counter(), head)]
    while b"\r\n\r\n" not in head:
        head += _recv(sock, reads)
    header_text, _, first = head.partition(b"\r\n\r\n")
    status, fields = _response_head(header_text)
    body = [(reads[-1][0], first)]
    if "chunked" in fields.get("transfer-encoding", ""):
        tail = (b"\r\n\r\n" + first)[-7:]
        while not tail.endswith(b"\r\n0\r\n\r\n"):
            tail = (tail + _recv(sock, body))[-7:]
    elif "content-length" in fields:
        left = int(fields["content-length"]) - len(first)
        while left > 0:
            left -= len(_recv(sock, body))
    else:
        while data := sock.recv(1 << 16):
            body.append((time.perf_counter(), data))
    return status, fields, body


class Dechunker:
    """HTTP/1.1's chunked transfer coding undone, fed as it was read."""

    def __init__(self) -> None:
        self._pending = b""
        self._data_left = 0
        self._skip = 0  # the CRLF after a chunk's data
        self.done = False

    def feed(self, data: bytes) -> bytes:
        pending = self._pending + data
        out = bytearray()
        while pending and not self.done:
            if self._data_left:
                taken = pending[: self._data_left]
                out += taken
                pending = pending[len(taken) :]
                self._data_left -= len(taken)
                if not self._data_left:
                    self._skip = 2
            elif self._skip:
                skipped = pending[: self._skip]
                pending = pending[len(skipped) :]
                self._skip -= len(skipped)
            else:
                line_end = pending.find(b"\r\n")
                if line_end < 0:
                    break
                size = int(pending[:line_end].split(b";")[0], 16)
                pending = pending[line_end + 2 :]
                self.done = size == 0
                self._data_left = size
        self._pending = pending
        return bytes(out)


_EVENT_END = re.compile(rb"\r?\n\r?\n")


def sse_data(pieces: list[tuple[float, bytes]]) -> list[tuple[float, str]]:
    """Each server-sent event's data (its `data:` lines) with the time of the read that
    completed it."""
    events: list[tuple[float, str]] = []
    buffer = b""
    for when, data in pieces:
        buffer += data
        *complete, buffer = _EVENT_END.split(buffer)
        for event in complete:
            lines = event.decode("utf-8").splitlines()
            data_lines = [line[5:].lstrip() for line in lines if line.startswith("data:")]
            if data_lines:
                events.append((when, "\n".join(data_lines)))
    return events


def stream_chat(
    client: Streams, base: str, key: str, body: dict[str, Any], timeout_s: float = 900
) -> StreamResult:
    """POST `body` (stream forced on, usage asked for) and time it."""
    payload = {**body, "stream": True, "stream_options": {"include_usage": True}}
    result = StreamResult(started_at=time.perf_counter())
    sent = result.started_at
    chunks = 0
    pieces: list[str] = []
    try:
        status, received = client.post(
            base,
            "/v1/chat/completions",
            {"Authorization": f"Bearer {key}"},
            json.dumps(payload).encode(),
            timeout_s,
        )
        if status != 200:
            text = b"".join(data for _, data in received).decode("utf-8", "replace")
            result.error = f"HTTP {status}: {text[:200]}"
            return result
        for when, data in sse_data(received):
            if data == "[DONE]":
                break
            chunk = json.loads(data)
            now = when - sent
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
    except (OSError, json.JSONDecodeError, KeyError, ValueError) as exc:
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

    def one(_: int) -> StreamResult:
        with Streams() as client:
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
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError:
        raise ConnectionError("the server closed the connection") from None
    status, fields = _response_head(head[:-4])
    chunked = "chunked" in fields.get("transfer-encoding", "")
    length = int(fields.get("content-length", 0))
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


# --- the floor: what one streamed event costs any HTTP server and client here --------------------


def socket_floor_us(
    interval_s: float, messages: int = 1000, size: int = 200, *, wait_s: float = 60.0
) -> tuple[float, float]:
    """CPU microseconds one event costs at the least on this machine, writer's and reader's: a
    thread that writes `size` bytes to a loopback TCP connection every `interval_s`, and a
    reader in another process that only receives them, each one's CPU time per message. No
    server can stream a token for less, nor a client read it, whatever either does besides.
    A reader that dies is an error within `wait_s`, not a wait for ever."""
    context = multiprocessing.get_context("spawn")
    results, sent = context.Pipe(duplex=False)
    with socket.create_server(("127.0.0.1", 0)) as listener:
        reader = context.Process(
            target=_floor_reader, args=(listener.getsockname()[1], messages * size, sent)
        )
        reader.start()
        sent.close()  # the reader's end: closed here, a dead reader's pipe reads as ended
        try:
            listener.settimeout(wait_s)
            conn, _ = listener.accept()
        except TimeoutError:
            reader.kill()
            reader.join()
            raise RuntimeError(
                f"the floor's reader never connected (exit code {reader.exitcode})"
            ) from None
    with conn, results:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        payload = b"x" * size
        started = time.thread_time()
        for _ in range(messages):
            conn.sendall(payload)
            time.sleep(interval_s)
        writer_s = time.thread_time() - started
        try:
            if not results.poll(wait_s):
                raise EOFError
            reader_s = float(results.recv())
        except EOFError:
            reader.kill()
            reader.join()
            raise RuntimeError(
                f"the floor's reader gave no figure (exit code {reader.exitcode})"
            ) from None
    reader.join()
    return writer_s / messages * 1e6, reader_s / messages * 1e6


def _floor_reader(port: int, total: int, results: Any) -> None:
    with socket.create_connection(("127.0.0.1", port)) as conn:
        started = time.thread_time()
        got = 0
        while got < total and (data := conn.recv(1 << 16)):
            got += len(data)
        results.send(time.thread_time() - started)

"""A bare Starlette app under the same server as llmux: the floor the cheap endpoints compare to.

`bentoml serve bench.bare_service:Bare` with llmux's own service settings (one worker, access
log off, no URL traced), answering GET /health and GET /v1/models with the bodies llmux gave the
bench (the JSON file named by BENCH_BARE_BODIES), serialised per request, and no middleware, no
key check, no routing beyond the two paths.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import bentoml
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

_bodies: dict[str, Any] = {}


def body(path: str) -> Any:
    """The body llmux gave for `path`, read on first use: the bench writes the file once llmux
    answers, which may be after this server started."""
    if not _bodies:
        named = os.environ.get("BENCH_BARE_BODIES")
        if named and Path(named).is_file():
            _bodies.update(json.loads(Path(named).read_text()))
    return _bodies.get(path, {})


async def health(request: Request) -> JSONResponse:
    return JSONResponse(body("/health"))


async def models(request: Request) -> JSONResponse:
    return JSONResponse(body("/v1/models"))


app = Starlette(routes=[Route("/health", health), Route("/v1/models", models)])


@bentoml.asgi_app(app, path="/")
@bentoml.service(
    name="bare",
    workers=1,
    traffic={"timeout": 900},
    http={"host": "127.0.0.1", "port": 8082},
    logging={"access": {"enabled": False}},
    tracing={"excluded_urls": [".*"]},
)
class Bare:
    """All work happens in the mounted app."""

"""The llmux BentoML service: one worker, one FastAPI app, OpenAI-shaped routes.

BentoML imports this module in its parent process and in the worker, so nothing heavy happens here:
config is read and validated (a bad file stops start-up with a message naming the file and field),
and models load only when a request needs them.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")

import bentoml

from llmux import logs
from llmux.app import build_state, create_app
from llmux.core.config import ConfigError
from llmux.first_run import ensure_local_key
from llmux.middleware import FrontDoor
from llmux.settings import Settings
from llmux_policy.metrics import WorkerResidencyMetrics

logs.install()
try:
    settings = Settings.from_env()
    if banner := ensure_local_key(settings):
        print(banner, file=sys.stderr, flush=True)
    # Residency series join BentoML's own /metrics (created in the worker, on first use).
    app = create_app(settings, build_state(settings, metrics=WorkerResidencyMetrics()))
except (ConfigError, ValueError) as exc:
    raise SystemExit(f"llmux cannot start: configuration error\n{exc}") from None


@bentoml.asgi_app(app, path="/")
@bentoml.service(
    name="llmux",
    workers=1,
    # Requests may wait for a model swap before their first byte; BentoML's default of 60 s
    # would answer them with a 504 while the model is still loading.
    traffic={"timeout": 900},
    http={"host": "127.0.0.1", "port": 8081},
    # Our own access line carries the request id and the client's name; BentoML's would repeat it
    # without them.
    logging={"access": {"enabled": False}},
    # BentoML wraps every request, and every message a response sends (each SSE chunk), in an
    # OpenTelemetry span; with no exporter configured nothing reads them, and they halved the
    # requests/s of the cheap endpoints. No URL is traced.
    tracing={"excluded_urls": [".*"]},
)
class LLMux:
    """All work happens in the mounted app; the class exists for BentoML."""


# Health checks and clients poll GET /health and GET /v1/models; answer them before BentoML's
# request context and routing, which cost more than the answers.
LLMux.add_asgi_middleware(FrontDoor, **app.state.front_door)  # type: ignore[attr-defined]

"""Texts or token arrays to vectors: the work behind POST /v1/embeddings.

The request's shape is checked (by its wire type) before the model is asked for, so a malformed
request never causes a load; what needs the model (its vector length, its tokenizer's count of an
input) is checked while it is held. Nothing here imports a backend.
"""

from __future__ import annotations

from typing import cast

from llmux.core.concurrency import run_to_end
from llmux.core.errors import BadRequest
from llmux.state import AppState
from llmux.wire.embeddings import EmbeddingList, EmbeddingRequest, embedding_list
from runners.embeddings import EmbedRunner


async def embed(state: AppState, body: EmbeddingRequest) -> EmbeddingList:
    """One vector per input. Raises ApiError (400/404/503) for what a client or the server's
    state can fix."""
    physical_id, _, _ = state.registry.require(body.model, "embedding")
    inputs = body.inputs()
    async with state.residency.use(physical_id) as held:
        runner = cast(EmbedRunner, held)
        refuse_other_dimensions(body, runner.dimensions)
        threads = state.residency.inference_threads(physical_id)
        result = await run_to_end(lambda: runner.embed(inputs), executor=threads)
    return embedding_list(result, body.model, body.encoding_format)


def refuse_other_dimensions(body: EmbeddingRequest, native: int) -> None:
    """`dimensions` may only restate the model's own length: cutting a vector short keeps its
    meaning only for models trained for it (Matryoshka), and the registry does not say which
    those are yet."""
    if body.dimensions is not None and body.dimensions != native:
        raise BadRequest(
            f"Model {body.model!r} makes {native}-dimensional embeddings and cannot shorten "
            f"them to {body.dimensions}; leave dimensions out or send {native}.",
            param="dimensions",
        )

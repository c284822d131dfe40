"""POST /v1/embeddings: OpenAI's embeddings API shape, request and response.

`input` is one text, a list of texts, one token-id array or a list of them; the response holds one
vector per input, as floats or (`encoding_format: base64`) as the base64 of little-endian float32
bytes, which is what OpenAI's SDKs ask for by default.
"""

from __future__ import annotations

import base64
from typing import Literal

import numpy as np
from pydantic import BaseModel, Field, field_validator
from pydantic_core import PydanticCustomError

from llmux.wire.base import OpenAIBaseModel
from runners.embeddings import Embeddings

# OpenAI's limit on the number of inputs in one request.
MAX_INPUTS = 2048

EmbeddingInput = str | list[str] | list[int] | list[list[int]]
EncodingFormat = Literal["float", "base64"]


class EmbeddingRequest(OpenAIBaseModel):
    """The fields OpenAI's embeddings endpoint takes (unknown ones are logged)."""

    model: str = Field(description="A virtual embedding model (GET /v1/models).")
    input: EmbeddingInput = Field(
        description=f"A text, a list of texts, a token-id array or a list of token-id arrays; "
        f"at most {MAX_INPUTS} inputs, none empty."
    )
    encoding_format: EncodingFormat = Field(
        "float", description="float: lists of numbers; base64: little-endian float32 bytes."
    )
    dimensions: int | None = Field(
        None, ge=1, description="The vector length; only the model's own length is accepted."
    )
    user: str | None = Field(None, description="OpenAI's end-user id; accepted and ignored.")

    @field_validator("input", mode="before")
    @classmethod
    def _check_input(cls, value: object) -> object:
        """Checked by hand rather than left to the union: its errors would name a union branch
        (`input.list[int].0`) instead of saying what is wrong."""
        if isinstance(value, str):
            if not value:
                raise PydanticCustomError("empty_input", "input must not be an empty string")
            return value
        if not isinstance(value, list):
            raise _shape_error()
        if not value:
            raise PydanticCustomError("empty_input", "input must not be an empty list")
        if len(value) > MAX_INPUTS:
            raise PydanticCustomError(
                "too_many_inputs",
                f"input has {len(value)} items; at most {MAX_INPUTS} are accepted per request",
            )
        if all(isinstance(item, str) for item in value):
            if not all(value):
                raise PydanticCustomError("empty_input", "input must not hold empty strings")
        elif all(isinstance(item, list) for item in value):
            for row in value:
                _check_token_ids(row)
        else:
            _check_token_ids(value)
        return value

    def inputs(self) -> list[str] | list[list[int]]:
        """The inputs as the runner takes them: always a list, one entry per vector."""
        value = self.input
        if isinstance(value, str):
            return [value]
        if isinstance(value[0], int):  # one token-id array (validation made every list non-empty)
            return [value]
        return value


def _check_token_ids(row: list[object]) -> None:
    if not row:
        raise PydanticCustomError("empty_input", "input must not hold an empty token array")
    # bool is an int to Python, but true/false are no token ids.
    if not all(type(token) is int and token >= 0 for token in row):
        raise _shape_error()


def _shape_error() -> PydanticCustomError:
    return PydanticCustomError(
        "input_shape",
        "input must be a string, a list of strings, an array of token ids (non-negative "
        "integers) or a list of such arrays",
    )


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str  # str: base64


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage


def embedding_list(
    result: Embeddings, model: str, encoding_format: EncodingFormat
) -> EmbeddingList:
    """The response for `result`, under the model name the client asked for."""
    tokens = sum(result.token_counts)
    return EmbeddingList(
        data=[
            Embedding(index=index, embedding=_encode(vector, encoding_format))
            for index, vector in enumerate(result.vectors)
        ],
        model=model,
        usage=EmbeddingUsage(prompt_tokens=tokens, total_tokens=tokens),
    )


def _encode(vector: np.ndarray, encoding_format: EncodingFormat) -> list[float] | str:
    if encoding_format == "base64":
        return base64.b64encode(vector.astype("<f4").tobytes()).decode("ascii")
    values: list[float] = vector.tolist()
    return values

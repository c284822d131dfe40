"""POST /v1/embeddings through the official openai SDK, against the app in process, with the real
all-MiniLM-L6-v2 (laid out by `make setup` under the models dir), plus the runner's pooling math
and its reading of sentence-transformers folders on tensors and files the tests build.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import openai
import pytest
import torch
from starlette.testclient import TestClient

from llmux.core.config import PhysicalModel
from llmux.settings import Settings
from llmux.wire.embeddings import MAX_INPUTS
from runners.base import ModelLoadError, NotLoaded, WeightsMissing
from runners.embeddings import (
    SentenceLayout,
    TransformersEmbeddingRunner,
    pool,
    read_sentence_layout,
)
from tests.conftest import TEST_KEY

MINILM = Settings.from_env().models_dir / "minilm-l6-v2"
# Loads the real model: slow, so `make test-fast` leaves it out.
pytestmark = pytest.mark.slow
MODEL = "MiniLM"
DIMENSIONS = 384
MAX_TOKENS = 256  # sentence_bert_config.json's max_seq_length
REGISTRY = """
physical_models:
  minilm-l6-v2:
    type: embedding
    backend: transformers
    estimated_vram_gb: 0.2
  chat-model:
    type: llm
    backend: llamacpp
    model_file: chat.gguf
    estimated_vram_gb: 1
virtual_models:
  MiniLM: {physical: minilm-l6-v2}
  Chat-Model: {physical: chat-model}
"""
GUITAR = "A man is playing a guitar."
PARAPHRASE = "Someone plays an acoustic guitar."
UNRELATED = "The stock market fell sharply today."
SPEC = PhysicalModel(type="embedding", backend="transformers", estimated_vram_gb=0.2)


def needs_minilm() -> None:
    """Skip (saying why) without the model, except in CI, where `make setup` lays it out."""
    if not (MINILM / "config.json").is_file() and not os.environ.get("CI"):
        pytest.skip(f"run `make setup`: {MINILM} missing")


@pytest.fixture(scope="module")
def http(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    needs_minilm()
    from llmux.app import create_app

    config = tmp_path_factory.mktemp("embeddings") / "config"
    config.mkdir()
    (config / "models.yaml").write_text(REGISTRY, encoding="utf-8")
    (config / "api_keys.yaml").write_text(
        f"api_keys:\n  - key: {TEST_KEY}\n    name: test-client\n", encoding="utf-8"
    )
    # No `path`: the model is found where setup lays it out, <models dir>/<physical id>.
    settings = Settings(config_dir=config, models_dir=MINILM.parent)
    with TestClient(create_app(settings), base_url="http://llmux.test") as client:
        yield client


@pytest.fixture(scope="module")
def client(http: TestClient) -> openai.OpenAI:
    return openai.OpenAI(
        api_key=TEST_KEY, base_url="http://llmux.test/v1", http_client=http, max_retries=0
    )


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    needs_minilm()
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(MINILM, local_files_only=True)


def vectors(client: openai.OpenAI, texts: str | list[str] | list[list[int]]) -> np.ndarray:
    result = client.embeddings.create(model=MODEL, input=texts, encoding_format="float")
    assert [item.index for item in result.data] == list(range(len(result.data)))
    return np.array([item.embedding for item in result.data], dtype=np.float32)


def post(http: TestClient, payload: dict[str, Any]) -> Any:
    headers = {"Authorization": f"Bearer {TEST_KEY}"}
    return http.post("/v1/embeddings", json=payload, headers=headers)


# --- the real MiniLM, through the API ------------------------------------------------------------


def test_a_text_becomes_one_unit_vector_of_the_model_s_dimensions(client: openai.OpenAI) -> None:
    result = client.embeddings.create(model=MODEL, input=GUITAR, encoding_format="float")
    assert result.object == "list" and result.model == MODEL
    assert len(result.data) == 1 and result.data[0].object == "embedding"
    vector = np.array(result.data[0].embedding)
    assert vector.shape == (DIMENSIONS,)
    assert np.linalg.norm(vector) == pytest.approx(1.0, abs=1e-5)


def test_a_list_keeps_its_order_and_each_vector_equals_its_input_embedded_alone(
    client: openai.OpenAI,
) -> None:
    # Lengths differ widely, so the short ones are padded in the batch: padding must not count.
    texts = [UNRELATED, "Hi.", GUITAR + " " + PARAPHRASE * 5, PARAPHRASE]
    together = vectors(client, texts)
    alone = np.stack([vectors(client, text)[0] for text in texts])
    assert together.shape == (len(texts), DIMENSIONS)
    np.testing.assert_allclose(together, alone, atol=1e-5)


def test_a_paraphrase_is_closer_than_an_unrelated_sentence(client: openai.OpenAI) -> None:
    guitar, paraphrase, unrelated = vectors(client, [GUITAR, PARAPHRASE, UNRELATED])
    # Unit vectors: the dot product is the cosine similarity.
    assert guitar @ paraphrase > 0.5 > guitar @ unrelated


def test_base64_is_little_endian_float32_of_the_same_vector(
    http: TestClient, client: openai.OpenAI
) -> None:
    floats = post(http, {"model": MODEL, "input": GUITAR}).json()["data"][0]["embedding"]
    encoded = post(http, {"model": MODEL, "input": GUITAR, "encoding_format": "base64"}).json()
    decoded = np.frombuffer(base64.b64decode(encoded["data"][0]["embedding"]), dtype="<f4")
    np.testing.assert_array_equal(decoded, np.array(floats, dtype=np.float32))
    # The SDK asks for base64 unless told otherwise, and decodes it itself.
    by_sdk = client.embeddings.create(model=MODEL, input=GUITAR).data[0].embedding
    np.testing.assert_array_equal(np.array(by_sdk, dtype=np.float32), decoded)


def test_token_ids_embed_like_their_text(client: openai.OpenAI, tokenizer: Any) -> None:
    ids = tokenizer(GUITAR)["input_ids"]
    assert ids[0] == tokenizer.cls_token_id  # the ids carry the special tokens; none are added
    np.testing.assert_allclose(vectors(client, [ids])[0], vectors(client, GUITAR)[0], atol=1e-6)
    one_array = client.embeddings.create(model=MODEL, input=ids, encoding_format="float")
    assert len(one_array.data) == 1 and one_array.usage.prompt_tokens == len(ids)


def test_usage_counts_every_token_of_every_input(client: openai.OpenAI, tokenizer: Any) -> None:
    texts = [GUITAR, PARAPHRASE, UNRELATED]
    result = client.embeddings.create(model=MODEL, input=texts, encoding_format="float")
    expected = sum(len(ids) for ids in tokenizer(texts)["input_ids"])
    assert result.usage.prompt_tokens == result.usage.total_tokens == expected


def test_dimensions_equal_to_the_model_s_own_are_accepted(client: openai.OpenAI) -> None:
    result = client.embeddings.create(
        model=MODEL, input=GUITAR, dimensions=DIMENSIONS, encoding_format="float"
    )
    assert len(result.data[0].embedding) == DIMENSIONS


def test_an_input_at_the_limit_is_embedded_whole(client: openai.OpenAI) -> None:
    ids = [101] + [2000] * (MAX_TOKENS - 2) + [102]
    result = client.embeddings.create(model=MODEL, input=[ids], encoding_format="float")
    assert result.usage.prompt_tokens == MAX_TOKENS


@pytest.mark.parametrize(
    "payload,status,param,words",
    [
        ({"input": ""}, 400, "input", "empty"),
        ({"input": []}, 400, "input", "empty"),
        ({"input": ["fine", ""]}, 400, "input", "empty"),
        ({"input": [[101, 102], []]}, 400, "input", "empty"),
        ({"input": ["x"] * (MAX_INPUTS + 1)}, 400, "input", str(MAX_INPUTS)),
        ({"input": [101, -1, 102]}, 400, "input", "non-negative"),
        ({"input": [101, True, 102]}, 400, "input", "token ids"),
        ({"input": ["text", [101, 102]]}, 400, "input", "list of strings"),
        ({"input": 42}, 400, "input", "string"),
        ({"input": [101, 10**9, 102]}, 400, "input", "vocabulary"),
        ({"input": "word " * MAX_TOKENS}, 400, "input", f"at most {MAX_TOKENS} tokens"),
        ({"input": [[101] + [2000] * (MAX_TOKENS - 1) + [102]]}, 400, "input", f"{MAX_TOKENS + 1}"),
        ({"input": GUITAR, "dimensions": 128}, 400, "dimensions", "cannot shorten"),
        ({"input": GUITAR, "dimensions": 0}, 400, "dimensions", "greater than or equal to 1"),
        ({"input": GUITAR, "encoding_format": "int8"}, 400, "encoding_format", "base64"),
        ({"input": GUITAR, "model": "Chat-Model"}, 400, "model", "/v1/chat/completions"),
        ({"input": GUITAR, "model": "text-embedding-3-small"}, 404, "model", "does not exist"),
    ],
)
def test_bad_requests_get_an_openai_error_naming_the_field(
    http: TestClient, payload: dict[str, Any], status: int, param: str, words: str
) -> None:
    response = post(http, {"model": MODEL, **payload})
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == param, error
    assert words in error["message"], error
    assert error["type"] == ("not_found_error" if status == 404 else "invalid_request_error")


def test_the_sdk_raises_its_own_errors(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError, match="/v1/chat/completions"):
        client.embeddings.create(model="Chat-Model", input=GUITAR)
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="text-embedding-3-small", input=GUITAR)


# --- the runner on its own ----------------------------------------------------------------------


def test_a_runner_without_config_json_says_where_the_weights_should_be(tmp_path: Path) -> None:
    runner = TransformersEmbeddingRunner("minilm", SPEC, tmp_path / "absent")
    with pytest.raises(WeightsMissing, match="absent"):
        runner.load()
    with pytest.raises(NotLoaded):
        runner.embed(["text"])


def test_unreadable_weights_are_a_load_error(tmp_path: Path) -> None:
    needs_minilm()
    broken = tmp_path / "broken"
    shutil.copytree(MINILM, broken, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ModelLoadError, match="could not load"):
        TransformersEmbeddingRunner("broken", SPEC, broken).load()


def test_unload_then_embed_is_refused(tmp_path: Path) -> None:
    needs_minilm()
    runner = TransformersEmbeddingRunner("minilm", SPEC, MINILM)
    runner.load()
    assert (runner.dimensions, runner.max_input_tokens) == (DIMENSIONS, MAX_TOKENS)
    runner.unload()
    with pytest.raises(NotLoaded):
        runner.embed(["text"])


# --- pooling math and the sentence-transformers files -------------------------------------------

# Two rows of three tokens, two dimensions; the second row's last token is padding whose values
# are large, so counting it would show.
HIDDEN = torch.tensor(
    [[[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]], [[2.0, -2.0], [4.0, 0.0], [100.0, 100.0]]]
)
MASK = torch.tensor([[1, 1, 1], [1, 1, 0]])


@pytest.mark.parametrize(
    "pooling,expected",
    [
        ("mean", [[3.0, 4.0], [3.0, -1.0]]),
        ("mean_sqrt_len", [[9.0 / 3**0.5, 12.0 / 3**0.5], [6.0 / 2**0.5, -2.0 / 2**0.5]]),
        ("max", [[5.0, 6.0], [4.0, 0.0]]),
        ("cls", [[1.0, 2.0], [2.0, -2.0]]),
    ],
)
def test_pooling_ignores_padding(pooling: Any, expected: list[list[float]]) -> None:
    torch.testing.assert_close(pool(HIDDEN, MASK, pooling), torch.tensor(expected))


def write_folder(
    root: Path,
    modules: list[str] | None,
    pooling: dict[str, bool] | None,
    max_seq_length: int | None = None,
) -> Path:
    if modules is not None:
        entries = [
            {
                "idx": i,
                "name": str(i),
                "path": "1_Pooling" if kind == "Pooling" else "",
                "type": f"sentence_transformers.models.{kind}",
            }
            for i, kind in enumerate(modules)
        ]
        (root / "modules.json").write_text(json.dumps(entries), encoding="utf-8")
    if pooling is not None:
        (root / "1_Pooling").mkdir()
        (root / "1_Pooling" / "config.json").write_text(json.dumps(pooling), encoding="utf-8")
    if max_seq_length is not None:
        (root / "sentence_bert_config.json").write_text(
            json.dumps({"max_seq_length": max_seq_length}), encoding="utf-8"
        )
    return root


@pytest.mark.parametrize(
    "modules,pooling,max_seq_length,expected",
    [
        (None, None, None, SentenceLayout("mean", normalize=False, max_seq_length=None)),
        (
            ["Transformer", "Pooling", "Normalize"],
            {"pooling_mode_mean_tokens": True},
            256,
            SentenceLayout("mean", normalize=True, max_seq_length=256),
        ),
        (
            ["Transformer", "Pooling"],
            {"pooling_mode_cls_token": True, "pooling_mode_mean_tokens": False},
            None,
            SentenceLayout("cls", normalize=False, max_seq_length=None),
        ),
        (
            ["Transformer", "Pooling"],
            {"pooling_mode_max_tokens": True},
            128,
            SentenceLayout("max", normalize=False, max_seq_length=128),
        ),
        (
            ["Transformer", "Pooling"],
            {"pooling_mode_mean_sqrt_len_tokens": True},
            None,
            SentenceLayout("mean_sqrt_len", normalize=False, max_seq_length=None),
        ),
    ],
)
def test_the_folder_s_own_files_choose_pooling_normalization_and_limit(
    tmp_path: Path,
    modules: list[str] | None,
    pooling: dict[str, bool] | None,
    max_seq_length: int | None,
    expected: SentenceLayout,
) -> None:
    write_folder(tmp_path, modules, pooling, max_seq_length)
    assert read_sentence_layout("m", tmp_path) == expected


@pytest.mark.parametrize(
    "modules,pooling,words",
    [
        (
            ["Transformer", "Pooling", "Dense", "Normalize"],
            {"pooling_mode_mean_tokens": True},
            "Dense",
        ),
        (
            ["Transformer", "Pooling"],
            {"pooling_mode_mean_tokens": True, "pooling_mode_max_tokens": True},
            "exactly one",
        ),
        (["Transformer", "Pooling"], {"pooling_mode_lasttoken": True}, "pooling_mode_lasttoken"),
    ],
)
def test_a_folder_asking_for_what_is_not_applied_is_refused(
    tmp_path: Path, modules: list[str], pooling: dict[str, bool], words: str
) -> None:
    write_folder(tmp_path, modules, pooling)
    with pytest.raises(ModelLoadError, match=words):
        read_sentence_layout("m", tmp_path)

"""openai-harmony's gpt-oss encoding, loaded without a network.

`openai_harmony.load_harmony_encoding("HarmonyGptOss")` needs the o200k_base BPE vocabulary,
the file `o200k_base.tiktoken` (3,613,922 bytes, sha256 `O200K_BASE_SHA256`), which no PyPI
release of openai-harmony ships. Its Rust loader (0.0.8) looks for the file like this:

1. `TIKTOKEN_ENCODINGS_BASE` set: it reads `$TIKTOKEN_ENCODINGS_BASE/o200k_base.tiktoken`, checks
   the hash, and never downloads.
2. otherwise it uses a cache file, `$TIKTOKEN_RS_CACHE_DIR/<sha1 of the download URL>` (default
   directory `<temp dir>/tiktoken-rs-cache`), downloading the vocabulary from OpenAI's public blob
   store into it when it is missing or its hash is wrong.

With neither the variable nor a cached file and no route to OpenAI, loading fails with
`HarmonyError: error downloading or loading vocab file`. llmux uses way 1 only, with a directory
it controls, filled by one of:
- a copy of `o200k_base.tiktoken` placed there at deployment;
- `write_o200k_vocab`, which rebuilds the file from gpt-oss's own `tokenizer.json` (shipped with
  the weights): its byte-level BPE vocabulary is o200k's first 199,998 ranks, and the rebuilt
  file is accepted only if its sha256 is exactly `O200K_BASE_SHA256`.
"""

from __future__ import annotations

import hashlib
import json
import os
from base64 import b64encode
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from openai_harmony import HarmonyEncoding

O200K_BASE_FILE = "o200k_base.tiktoken"
O200K_BASE_SHA256 = "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d"
O200K_BASE_RANKS = 199_998  # ordinary tokens; the special tokens start at 199,998
GPT_OSS_ENCODING = "HarmonyGptOss"
ENCODINGS_BASE_VAR = "TIKTOKEN_ENCODINGS_BASE"


class HarmonyVocabError(RuntimeError):
    """The o200k vocabulary is missing or wrong; the message says what was tried and what to do."""


def load_gpt_oss_encoding(vocab_dir: str | Path | None = None) -> HarmonyEncoding:
    """Load the gpt-oss harmony encoding; slow (~1 s): load once per model and share it.

    With `vocab_dir`, `TIKTOKEN_ENCODINGS_BASE` points there for the duration of the load (the
    variable is process-wide: do not load encodings from two threads at once). Without it,
    openai-harmony's own lookup applies (the variable if set, else its cache or a download).
    Raises `HarmonyVocabError` when the vocabulary cannot be had.
    """
    from openai_harmony import HarmonyError, load_harmony_encoding

    with _env(ENCODINGS_BASE_VAR, None if vocab_dir is None else str(vocab_dir)):
        try:
            return load_harmony_encoding(GPT_OSS_ENCODING)
        except HarmonyError as error:
            where = os.environ.get(ENCODINGS_BASE_VAR)
            tried = (
                f"{ENCODINGS_BASE_VAR}={where} (needs {O200K_BASE_FILE} there)"
                if where
                else f"no {ENCODINGS_BASE_VAR}, so openai-harmony's cache or a download"
            )
            raise HarmonyVocabError(
                f"cannot load the gpt-oss harmony encoding ({error}); tried {tried}. Put "
                f"{O200K_BASE_FILE} (sha256 {O200K_BASE_SHA256}) in a directory and pass it, or "
                "rebuild it from the model's tokenizer.json with write_o200k_vocab()."
            ) from error


def write_o200k_vocab(tokenizer_json: str | Path, vocab_dir: str | Path) -> Path:
    """Make `vocab_dir/o200k_base.tiktoken` from a gpt-oss `tokenizer.json`; return its path.

    A file already there with the right hash is kept. The rebuilt file is written only if its
    sha256 is `O200K_BASE_SHA256` (otherwise `HarmonyVocabError`, nothing written), and
    atomically, so a crash leaves no half file.
    """
    target = Path(vocab_dir) / O200K_BASE_FILE
    if target.is_file() and _sha256(target.read_bytes()) == O200K_BASE_SHA256:
        return target
    data = tiktoken_vocab_from_tokenizer_json(Path(tokenizer_json), O200K_BASE_RANKS)
    digest = _sha256(data)
    if digest != O200K_BASE_SHA256:
        raise HarmonyVocabError(
            f"{tokenizer_json} does not hold the o200k vocabulary: the rebuilt {O200K_BASE_FILE} "
            f"has sha256 {digest}, not {O200K_BASE_SHA256}"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    partial.write_bytes(data)
    partial.replace(target)
    return target


def tiktoken_vocab_from_tokenizer_json(tokenizer_json: Path, ranks: int) -> bytes:
    """The tiktoken vocabulary file (`base64(token bytes) rank` per line, by rank) of ranks
    `0..ranks-1` of a Hugging Face byte-level BPE `tokenizer.json`."""
    vocab = json.loads(tokenizer_json.read_text(encoding="utf-8"))["model"]["vocab"]
    by_rank: dict[int, str] = {rank: token for token, rank in vocab.items() if rank < ranks}
    missing = [rank for rank in range(ranks) if rank not in by_rank]
    if missing:
        raise HarmonyVocabError(
            f"{tokenizer_json}: no token for rank {missing[0]} ({len(missing)} missing)"
        )
    decode = _byte_level_decoder()
    lines = []
    for rank in range(ranks):
        try:
            token = bytes(decode[char] for char in by_rank[rank])
        except KeyError as error:
            raise HarmonyVocabError(
                f"{tokenizer_json}: token {by_rank[rank]!r} is not byte-level BPE"
            ) from error
        lines.append(b64encode(token) + b" %d\n" % rank)
    return b"".join(lines)


def _byte_level_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet reversed: the character standing for each byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    chars = {byte: chr(byte) for byte in printable}
    shifted = 0
    for byte in range(256):
        if byte not in chars:
            chars[byte] = chr(256 + shifted)
            shifted += 1
    return {char: byte for byte, char in chars.items()}


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@contextmanager
def _env(name: str, value: str | None) -> Iterator[None]:
    """Set (when `value` is not None) an environment variable for the block, then restore it."""
    if value is None:
        yield
        return
    previous = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if previous is None:
            del os.environ[name]
        else:
            os.environ[name] = previous

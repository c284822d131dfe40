"""The tiny transformers chat model of the transformers rows: tests/tiny_models.py's random
text-only Qwen3 model (full attention in every layer, so llmux batches it: the concurrency rows
measure continuous batching), its matrices drawn again from a seed whose greedy answer is
visible text.

The test model's own weights answer with newlines only, which llmux (rightly) sends as no
content, so no first token could be timed. A random model stays a random model: only the ratios
its rows give mean anything.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

SEEDS = range(7, 47)
CONTEXT = 32768
PROMPT = "Hello world! What colour is this image?"


def build_tiny_chat_model(out: Path) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from tests.tiny_models import build_tiny_qwen3

    build_tiny_qwen3(out)
    # Room for Open WebUI's 36 tools (bench/openwebui.py: ~20k tokens in this tokenizer); rotary
    # positions need no weights, so only the config changes.
    config_file = out / "config.json"
    config = json.loads(config_file.read_text())
    config["max_position_embeddings"] = CONTEXT
    config_file.write_text(json.dumps(config, indent=2))
    tokenizer = AutoTokenizer.from_pretrained(out)
    model: Any = AutoModelForCausalLM.from_pretrained(out)
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": PROMPT}],
        add_generation_prompt=True,
        tokenize=False,
        enable_thinking=False,
    )
    inputs = tokenizer(text, add_special_tokens=False, return_tensors="pt")
    stops = {tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")}
    # Plain greedy, as llmux asks for temperature 0: the test model's sampling advice (a
    # repetition penalty among it) goes, so every contender decodes alike.
    model.generation_config = GenerationConfig(eos_token_id=sorted(stops), pad_token_id=min(stops))
    for seed in SEEDS:
        torch.manual_seed(seed)
        with torch.no_grad():
            for parameter in model.parameters():
                if parameter.dim() > 1:
                    parameter.copy_(torch.randn_like(parameter) * 0.06)
            answer = model.generate(**inputs, max_new_tokens=32, do_sample=False)
        new = answer[0, inputs["input_ids"].shape[1] :].tolist()
        shown = str(tokenizer.decode(new, skip_special_tokens=True))
        if shown.strip() and "<" not in shown and not stops & set(new):
            model.save_pretrained(out)
            return out
    raise RuntimeError(f"no seed in {SEEDS} gives the tiny model a visible greedy answer")

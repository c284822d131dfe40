"""The embedded default's chat model, Qwen2.5-Coder-0.5B-Instruct, as a transformers checkpoint:
the GGUF that `make setup` installs, dequantized by transformers (`gguf_file=`) and saved as
float32 safetensors, so that the transformers rows measure a real model's steps and not only
the tiny random model's near-free ones.

Converting takes about 80 s on 2 cores; the checkpoint (2.4 GB) is kept under build/ and
converted again only when the GGUF changes.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

LLM = "Qwen2.5-Coder-0.5B-Transformers"
PHYSICAL = "qwen2.5-coder-0.5b-transformers"
# Its KV cache in llmux's continuous batching is two contexts; a prompt and 64 tokens need
# far less than the model's 32k.
CONTEXT = 4096


def convert_gguf(gguf: Path, out: Path) -> Path:
    """`out`, holding the transformers checkpoint of `gguf` (converted unless already there)."""
    source = {"gguf": gguf.name, "bytes": gguf.stat().st_size, "mtime": gguf.stat().st_mtime}
    marker = out / "converted-from.json"
    if marker.is_file() and json.loads(marker.read_text()) == source:
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    # Dequantized on load: the weights are plain tensors, which transformers will only save
    # once the model no longer says it is quantized.
    model.hf_quantizer = None  # type: ignore[assignment]  # typed as a module attribute
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    (partial / "converted-from.json").write_text(json.dumps(source))
    shutil.rmtree(out, ignore_errors=True)
    partial.rename(out)
    return out

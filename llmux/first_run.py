"""The embedded default's first start: make a key so a newcomer can call the API at once.

Only for the embedded default (LLMUX_CONFIG_DIR unset). An explicitly configured directory keeps
the rule that no key file means 401s saying how to create keys: production keys are generated
at deployment, never by the service.
"""

from __future__ import annotations

import os

from llmux.keys import write_key_file
from llmux.settings import Settings

CLIENT = "local"


def ensure_local_key(settings: Settings) -> str | None:
    """Create the embedded default's key file if it is missing; return a banner to print once
    (None when nothing was created)."""
    path = settings.api_keys_file
    if not settings.embedded or path.exists():
        return None
    try:
        # An admin key: the embedded default's user is its operator too (`llmux ps`, `unload`).
        key = write_key_file(path, [], admins=[CLIENT])[CLIENT]
    except FileExistsError:  # another process (BentoML's worker) made it first
        return None
    host = os.environ.get("BENTOML_HOST", "127.0.0.1")
    port = os.environ.get("BENTOML_PORT", "8081")
    base = f"http://{'127.0.0.1' if host == '0.0.0.0' else host}:{port}"
    return f"""
llmux: first start of the embedded default: created an API key in {path} (mode 0600).
It is reused on every later start. Try it:

  curl -s {base}/v1/models -H "Authorization: Bearer {key}"

  from openai import OpenAI
  client = OpenAI(base_url="{base}/v1", api_key="{key}")
  print(client.chat.completions.create(model="Qwen2.5-Coder-0.5B",
        messages=[{{"role": "user", "content": "Hello!"}}]).choices[0].message.content)

  .venv/bin/llmux ps      # what is on the GPU (the key is an admin key: llmux load/unload too)
"""

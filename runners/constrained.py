"""JSON-schema constrained decoding for transformers models, with xgrammar.

xgrammar (0.2.8) compiles a JSON schema against the tokenizer's vocabulary into a grammar; a
`GrammarMatcher` then masks, at every step, the tokens that cannot continue valid JSON, and once
the JSON is complete it allows only the stop tokens. Its transformers integration,
`xgrammar.contrib.hf.LogitsProcessor`, does this as a `LogitsProcessor` for `model.generate`
(one instance per generation: it keeps the matcher's state).

Compiled JSON is compact, `{"a": 1, "b": [1, 2]}`: `any_whitespace=False`, because with
free whitespace a small model can fill `max_tokens` with newlines and never close the object.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from llmux.core.errors import BadRequest

if TYPE_CHECKING:
    from transformers import LogitsProcessor, PreTrainedTokenizerBase


class JsonSchemaConstraints:
    """Grammars for one loaded model: a `GrammarCompiler` built on first use (the vocabulary scan
    takes a moment for a large vocabulary), whose own cache keeps compiled schemas.

    Thread-safe: the compiler is built once under a lock; xgrammar's compiler is itself safe to
    call from several threads.
    """

    def __init__(
        self, tokenizer: PreTrainedTokenizerBase, vocab_size: int, stop_token_ids: Sequence[int]
    ) -> None:
        self._tokenizer = tokenizer
        self._vocab_size = vocab_size  # the width of the model's logits, padding included
        self._stop_token_ids = list(stop_token_ids)
        self._compiler: Any = None
        self._lock = threading.Lock()

    def logits_processor(self, schema: dict[str, Any]) -> LogitsProcessor:
        """A fresh processor that keeps one generation inside `schema`. An unusable schema is
        the client's error: `BadRequest` (param `response_format`)."""
        import xgrammar
        import xgrammar.contrib.hf

        try:
            grammar = self._grammar_compiler().compile_json_schema(
                json.dumps(schema), any_whitespace=False, strict_mode=True
            )
        except (RuntimeError, ValueError, TypeError) as exc:
            raise BadRequest(
                f"The JSON schema cannot be used to constrain the output: {exc}",
                param="response_format",
            ) from exc
        assert isinstance(grammar, xgrammar.CompiledGrammar)
        return xgrammar.contrib.hf.LogitsProcessor(grammar)

    def _grammar_compiler(self) -> Any:
        with self._lock:
            if self._compiler is None:
                import xgrammar

                info = xgrammar.TokenizerInfo.from_huggingface(
                    self._tokenizer,
                    vocab_size=self._vocab_size,
                    stop_token_ids=self._stop_token_ids,
                )
                self._compiler = xgrammar.GrammarCompiler(info, cache_enabled=True)
            return self._compiler

"""llmux's benchmark (`make bench`, `python -m bench`): every figure a ratio measured side by side.

Each section runs its contenders interleaved, round after round, in one run on one machine, and
reports medians over the rounds: llmux against the same model in process, against
`llama_cpp.server`, against a bare Starlette app under the same server. The output is a table
per section, PASS/FAIL lines for the targets of issue #16, and the same as JSON. See
docs/benchmarks.md.
"""

"""The ground floor: what runners, the residency policy and the app all stand on.

The registry schema (`config`), the error envelope's exception types (`errors`), thread/async
helpers (`concurrency`), the GPU memory probe (`gpu`) and the gpt-oss vocabulary loader
(`harmony_vocab`). Nothing here imports from the app, routes, chat, speech, the policy or the
runners; `tests/test_layers.py` fails if that changes.
"""

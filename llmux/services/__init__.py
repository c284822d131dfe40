"""One service function per endpoint, between the route and the runner.

Every endpoint has the same shape: its route parses the request and renders the response (wire
types and their shaping live in `llmux.wire`); the service here checks what needs the registry,
holds the model through `Residency.use` and drives the runner:

- `chat.ChatService.start` -> a `ChatSession` (`complete()` or `sse()`), for /v1/chat/completions;
- `transcription.transcribe`, for /v1/audio/transcriptions;
- `speech.speak`, for /v1/audio/speech.
"""

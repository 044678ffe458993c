"""Config: typed, validated once, every problem reported together with its key and fix."""
import re
from pathlib import Path

import pytest
import yaml

import main
import utils
from conftest import ROOT, write_config


def test_shipped_config_equals_the_documented_defaults():
    assert utils.config_to_dict(utils.load_config(ROOT / "config.yaml")) == utils.config_to_dict(utils.Config())


def test_every_key_of_config_yaml_has_a_comment():
    lines = (ROOT / "config.yaml").read_text().splitlines()
    undocumented = [line for i, line in enumerate(lines)
                    if re.match(r"^\s*[a-z_]+:", line)
                    and "#" not in line and not lines[i - 1].strip().startswith("#")]
    assert undocumented == ["model:", "lora:", "training:", "data:", "generation:", "safety:"]


def test_unknown_key_suggests_the_close_one(tmp_path):
    path = write_config(tmp_path, training={"learning_rat": 1e-4})
    with pytest.raises(utils.ConfigError, match=r"training.learning_rat: unknown key \(did you mean 'training.learning_rate'\?\)"):
        utils.load_config(path)


def test_all_problems_reported_together(tmp_path):
    path = write_config(tmp_path, seed="x", lora={"r": 0, "dropout": 1.5, "target_modules": 5},
                        model={"max_length": 16, "quantization": "3bit"}, extra_section={})
    with pytest.raises(utils.ConfigError) as err:
        utils.load_config(path)
    text = str(err.value)
    for expected in ["seed: must be an integer", "lora.r: invalid value 0", "lora.dropout: invalid value 1.5",
                     "lora.target_modules: must be a list of strings or a string",
                     "model.max_length: invalid value 16", "model.quantization: invalid value '3bit'",
                     "extra_section: unknown key", "7 problem(s)"]:
        assert expected in text


@pytest.mark.parametrize("value,ok", [(True, True), (False, True), (0.5, True), (0, True), (1.5, False), ("half", False)])
def test_gradient_checkpointing_is_a_switch_or_a_fraction(tmp_path, value, ok):
    path = write_config(tmp_path, training={"gradient_checkpointing": value})
    if ok:
        assert utils.load_config(path).training.gradient_checkpointing == value
    else:
        with pytest.raises(utils.ConfigError, match="training.gradient_checkpointing: .*fraction of layers|"
                                                    "training.gradient_checkpointing: must be true or false or a number"):
            utils.load_config(path)


@pytest.mark.parametrize("value,ok", [("auto", True), (True, True), (False, True), ("yes", False), (1, False)])
def test_keep_dequantized_is_auto_or_a_switch(tmp_path, value, ok):
    path = write_config(tmp_path, training={"keep_dequantized": value})
    if ok:
        assert utils.load_config(path).training.keep_dequantized == value
    else:
        with pytest.raises(utils.ConfigError, match="training.keep_dequantized: (invalid value 'yes'.*use auto|must be)"):
            utils.load_config(path)


def test_yaml_scientific_notation_without_dot_is_a_number(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("training:\n  learning_rate: 2e-4\n")
    assert utils.load_config(path).training.learning_rate == pytest.approx(2e-4)


def test_section_given_as_scalar(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: SmolLM2\n")
    with pytest.raises(utils.ConfigError, match="model: must be a section"):
        utils.load_config(path)


def test_cli_exit_code_2_and_no_traceback(tmp_path, capsys):
    path = write_config(tmp_path, training={"batch_sise": 4})
    assert main.main(["data", str(path)]) == 2
    err = capsys.readouterr().err
    assert "did you mean 'training.batch_size'" in err and "Traceback" not in err


def test_missing_config_file_is_one_line(tmp_path, capsys):
    assert main.main(["train", str(tmp_path / "nope.yaml")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: config file not found") and "\n" not in err


def test_invalid_yaml(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: [unclosed\n")
    with pytest.raises(utils.ConfigError, match="not valid YAML"):
        utils.load_config(path)


def readme_presets() -> dict:
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"<!-- preset: (\S+) -->\s*```yaml\n(.*?)```", text, re.S)
    return {name: yaml.safe_load(body) for name, body in blocks}


def test_readme_presets_validate():
    presets = readme_presets()
    assert {"fast-test", "production"} <= set(presets)
    for name, raw in presets.items():
        utils.config_from_dict(raw, f"README preset {name}")


def test_shipped_presets_validate():
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        utils.load_config(path)

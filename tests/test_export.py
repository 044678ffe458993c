"""`python main.py export` on the tiny model: merged safetensors and GGUF, each verified."""
import json

import gguf
import pytest
import torch
import yaml
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

import main
import utils
from conftest import SHORT_SYSTEM, tiny_config
from tiny import build_tiny_model


@pytest.fixture(scope="module")
def trained(tiny_model, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("export")
    cfg = tiny_config(tmp, tiny_model, max_steps=6, eval_steps=3)
    assert main.main(["train", str(cfg)]) == 0
    return cfg, tmp / "out" / "my_custom_llm_tiny-llama"


def test_merged_export_runs_in_plain_transformers(trained, tmp_path, capsys):
    cfg, final = trained
    out = tmp_path / "merged"
    assert main.main(["export", str(cfg), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "check merged vs adapter (float32): 5/5 greedy answers identical" in printed and "FAILED" not in printed
    checks = json.loads((out / "export_checks.json").read_text())
    assert set(checks) == {"merge", "merged"} and all(c["ok"] for c in checks.values())
    assert checks["merge"]["max_logprob_diff"] < 1e-3
    model = AutoModelForCausalLM.from_pretrained(out)  # no peft, no adapter: a plain model
    assert model.dtype == torch.bfloat16 and not any("lora" in n for n, _ in model.named_parameters())
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert "<|im_start|>" in tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    gen = json.loads((out / "generation_config.json").read_text())
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in gen["eos_token_id"] and gen["do_sample"] is False
    settings = yaml.safe_load((out / utils.ASSISTANT_FILE).read_text())
    assert settings["system_prompt"] == SHORT_SYSTEM and settings["safety"]["refusal_message"] == utils.DEFAULT_REFUSAL
    card = (out / "README.md").read_text()
    assert "Not a medical device" in card and "30 training and 10 validation" in card and "Sore" not in card


def test_gguf_export_loads_back_and_carries_the_chat_template(trained, tmp_path, capsys):
    cfg, final = trained
    out = tmp_path / "gguf"
    assert main.main(["export", str(cfg), "--format", "gguf", "--out", str(out)]) == 0
    checks = json.loads((out / "export_checks.json").read_text())
    assert set(checks) == {"merge", "f16", "q8_0"} and all(c["ok"] for c in checks.values())
    assert checks["f16"]["max_logprob_diff"] < 0.05
    reader = gguf.GGUFReader(str(out / "model-q8_0.gguf"))
    assert reader.fields["general.architecture"].contents() == "llama"
    assert "<|im_start|>" in reader.fields["tokenizer.chat_template"].contents()
    assert {t.tensor_type.name for t in reader.tensors if t.name.endswith("attn_q.weight")} == {"Q8_0"}
    tokenizer = AutoTokenizer.from_pretrained(str(out), gguf_file="model-f16.gguf")
    original = AutoTokenizer.from_pretrained(final)
    text = "What helps with a sore throat? <|im_end|>"
    assert tokenizer(text)["input_ids"] == original(text)["input_ids"]
    printed = capsys.readouterr().out
    assert "model-f16.gguf" in printed and f"python main.py inference --gguf {out}" in printed


def _merged_and_refs(trained, scale_b: float):
    cfg, final = trained
    run_cfg = utils.adapter_run_config(final, utils.load_config(cfg))
    tokenizer = AutoTokenizer.from_pretrained(final)
    model = PeftModel.from_pretrained(utils.load_base_fp32(utils.resolve_model(run_cfg.model.name)), str(final))
    refs = utils.reference_outputs(model, tokenizer, run_cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.mul_(scale_b)
    return utils.merge_adapter(model), tokenizer, refs, run_cfg


def test_a_wrong_merge_fails_the_check(trained):
    merged, tokenizer, refs, _ = _merged_and_refs(trained, scale_b=1.0)
    assert utils.compare_outputs(merged, tokenizer, refs, utils.VERIFY_TOLERANCE["merge"])["ok"]
    wrong, tokenizer, refs, _ = _merged_and_refs(trained, scale_b=2.0)  # the update counted twice
    check = utils.compare_outputs(wrong, tokenizer, refs, utils.VERIFY_TOLERANCE["merge"])
    assert not check["ok"] and check["max_logprob_diff"] > 5 * utils.VERIFY_TOLERANCE["merge"]


def test_a_gguf_without_the_rotary_permutation_fails_the_check(trained, tmp_path):
    merged, tokenizer, _, run_cfg = _merged_and_refs(trained, scale_b=1.0)
    with torch.no_grad():  # a random tiny model attends almost uniformly; sharpen it so order matters
        for name, p in merged.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(20)
    refs = utils.reference_outputs(merged, tokenizer, run_cfg)
    utils.write_gguf(merged, tokenizer, tmp_path / "good.gguf", "f16")
    good = utils.compare_outputs(utils.load_gguf_back(tmp_path / "good.gguf"), tokenizer, refs, utils.VERIFY_TOLERANCE["f16"])
    assert good["ok"]
    utils.write_gguf(merged, tokenizer, tmp_path / "bad.gguf", "f16", permute=False)
    check = utils.compare_outputs(utils.load_gguf_back(tmp_path / "bad.gguf"), tokenizer, refs, utils.VERIFY_TOLERANCE["f16"])
    assert not check["ok"]


def test_gguf_names_an_unsupported_architecture(tmp_path):
    folder = build_tiny_model(tmp_path / "tiny-qwen2", family="qwen2")
    with pytest.raises(utils.UserError, match="architecture 'qwen2' is not supported yet"):
        utils.gguf_supported(utils.ModelSource(str(folder), "local", ""))


def test_export_without_a_trained_model_says_how_to_get_one(tmp_path, tiny_model, capsys):
    cfg = tiny_config(tmp_path, tiny_model)
    assert main.main(["export", str(cfg)]) == 2
    assert "no trained model in" in capsys.readouterr().err

import json
import os
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).parent))

# Never wait on the hub in tests: everything here is local or bundled.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import utils  # noqa: E402
from tiny import build_tiny_model  # noqa: E402

SHORT_SYSTEM = "You are a careful medical assistant."
# long enough that a batch's rows share a prefix worth computing once (utils.MIN_SHARED_PREFIX)
LONG_SYSTEM = ("You are a careful medical information assistant, and you are an AI, not a doctor. Give "
               "accurate, general health information in plain language.")
DECODER, GENERATE = utils.ENGINE_DECODER, utils.ENGINE_GENERATE


def chat_engine_here() -> str:
    """What `inference` answers with here by default: the CpuDecoder on a CPU, generate() on a GPU."""
    return DECODER if utils.pick_hardware("4bit").device == "cpu" else GENERATE


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny-llama")


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows),
                    encoding="utf-8")
    return path


def qa_rows(n: int, prefix: str = "What helps with a sore throat") -> list[dict]:
    return [{"instruction": f"{prefix} number {i}?",
             "response": "Rest, fluids and honey in warm water can help. See a doctor if it lasts."}
            for i in range(n)]


def write_config(tmp_path: Path, **sections) -> Path:
    """A config YAML in tmp_path; keyword arguments are sections (dicts) or top-level values."""
    raw = {"output_dir": str(tmp_path / "out")}
    for key, value in sections.items():
        raw[key] = value
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return path


def tiny_config(tmp_path: Path, model: Path, rows=None, **training) -> Path:
    """A fast training config for the tiny model: 4-bit, a few steps."""
    data = write_jsonl(tmp_path / "train.jsonl", rows if rows is not None else qa_rows(40))
    train = {"max_steps": 6, "eval_steps": 3, "batch_size": 4, "gradient_accumulation_steps": 1,
             "learning_rate": 5e-3, "logging_steps": 1, "warmup_ratio": 0.0}
    train.update(training)
    return write_config(tmp_path, model={"name": str(model), "max_length": 256},
                        data={"train_file": str(data), "validation_split": 0.25,
                              "system_prompt": SHORT_SYSTEM},
                        training=train)


def trained_tiny(tmp_path: Path, model: Path, **training) -> Path:
    """Train the tiny model (answers capped at 12 new tokens for fast chat tests); returns the config."""
    import main
    cfg = tiny_config(tmp_path, model, **training)
    raw = yaml.safe_load(cfg.read_text())
    raw["generation"] = {"max_new_tokens": 12}
    cfg.write_text(yaml.safe_dump(raw))
    assert main.main(["train", str(cfg)]) == 0
    return cfg


def lean_and_plain(folder, dtype=None, dropout=0.0, device="cpu", quantization="none"):
    """The same model with the same LoRA weights twice (unquantized unless asked): as peft builds
    it, and through utils.attach_lora (lean LoRA inputs, lean norms and MLPs). lora_B is made
    non-zero so the adapters matter. Both load the same folder, so 4-bit weights are identical."""
    import torch
    from peft import LoraConfig, get_peft_model
    cfg = utils.config_from_dict({"model": {"name": str(folder)}, "lora": {"dropout": dropout}})
    source = utils.resolve_model(str(folder))
    hw = utils.Hardware(device, dtype or torch.float32, quantization, "")
    lean = utils.attach_lora(utils.load_base_model(source, hw), cfg)
    targets = sorted(lean.peft_config["default"].target_modules)
    plain = get_peft_model(utils.load_base_model(source, hw), LoraConfig(
        r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=dropout, target_modules=targets, task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, p in lean.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
        lora = {k: v for k, v in lean.state_dict().items() if "lora_" in k}
        assert not plain.load_state_dict(lora, strict=False).unexpected_keys
    return lean, plain


def loss_and_grads(model, batch, autocast: bool):
    import torch
    model.train()
    model.zero_grad()
    device = next(model.parameters()).device
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
        loss = utils.answer_token_loss(model, {k: v.to(device) for k, v in batch.items()})
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def tiny_batch(folder, system: str = "Be careful.", questions=None):
    tokenizer, _ = utils.load_tokenizer(utils.resolve_model(str(folder)))
    questions = questions or [f"Is rest good for a cold {i}?" for i in range(3)]
    rows = [utils.render_example(tokenizer, [{"role": "user", "content": q},
                                             {"role": "assistant", "content": "Yes, rest and fluids. " * (i + 1)}],
                                 system, 256) for i, q in enumerate(questions)]
    return utils.PadCollator(tokenizer.pad_token_id)(rows)


def recording_step_prefixes(monkeypatch) -> list:
    """From now on, for every micro-batch that utils.step_prefix_hidden_states serves: (positions
    reused from the step's prefix, positions it computed for a new one). Wraps the unwrapped
    function, so a second recording does not also feed the first one's list."""
    inner = getattr(utils.step_prefix_hidden_states, "__wrapped__", utils.step_prefix_hidden_states)
    log = []

    def recorded(base, inputs, keep, step):
        reused, hidden = inner(base, inputs, keep, step)
        log.append((reused, step.built))
        return reused, hidden

    recorded.__wrapped__ = inner
    monkeypatch.setattr(utils, "step_prefix_hidden_states", recorded)
    return log

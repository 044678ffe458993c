"""Training on the tiny random model: real bitsandbytes 4-bit, real peft, real Trainer."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

import main
import utils
from conftest import (LONG_SYSTEM, ROOT, SHORT_SYSTEM, lean_and_plain, loss_and_grads, qa_rows, recording_step_prefixes,
                      tiny_batch, tiny_config, write_jsonl)

FINAL_FILES = {"adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "tokenizer_config.json",
               "chat_template.jinja", "config.yaml", "metrics.json", "loss.png"}


def losses(checkpoint: Path) -> list[tuple[int, float]]:
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    return [(h["step"], h["loss"]) for h in state["log_history"] if "loss" in h]


@pytest.fixture(scope="module")
def first_run(tiny_model, tmp_path_factory):
    """One 6-step run shared by the tests that only read its outputs."""
    tmp = tmp_path_factory.mktemp("run")
    cfg = tiny_config(tmp, tiny_model)
    assert main.main(["train", str(cfg)]) == 0
    out = tmp / "out"
    return cfg, out, losses(out / "checkpoint-6")


def test_run_leaves_checkpoints_and_a_complete_final_folder(first_run):
    cfg, out, _ = first_run
    for step in (3, 6):
        names = {p.name for p in (out / f"checkpoint-{step}").iterdir()}
        assert {"adapter_model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth",
                "trainer_state.json"} <= names
    final = out / "my_custom_llm_tiny-llama"
    names = {p.name for p in final.iterdir()}
    assert FINAL_FILES <= names and not any(n.endswith(".bin") for n in names)
    assert not [p for p in out.iterdir() if ".tmp" in p.name]
    metrics = json.loads((final / "metrics.json").read_text())
    assert metrics["steps_run"] == 6 and metrics["stop_reason"].startswith("reached training.max_steps")
    assert metrics["final_eval_loss"] < metrics["base_eval_loss"]
    assert metrics["best_step"] in (3, 6) and metrics["tokens_per_s"] > 0 and metrics["peak_memory_mb"] > 0
    assert metrics["quantization"] == "4bit" and metrics["device"] == utils.pick_hardware("4bit").device
    assert (metrics["dequantized_copy_mb"] > 0) == (metrics["device"] == "cpu")  # keep_dequantized: auto
    saved = utils.config_from_dict(yaml.safe_load((final / "config.yaml").read_text()))
    assert saved.model.name == utils.load_config(cfg).model.name


def test_loss_keeps_falling_across_checkpoint_saves(first_run):
    _, _, logged = first_run
    by_step = dict(logged)
    assert by_step[4] < by_step[3] and by_step[6] < by_step[4] and by_step[6] < by_step[1]


def tiny_trainer(tiny_model, tmp_path, max_steps: int, hw=None, lora: dict | None = None, **training):
    """The project's own trainer on the tiny model, built step by step as `utils.train` does."""
    path = tiny_config(tmp_path, tiny_model, max_steps=max_steps, **training)
    if lora:
        path.write_text(yaml.safe_dump(yaml.safe_load(path.read_text()) | {"lora": lora}))
    cfg = utils.load_config(path)
    hw = hw or utils.pick_hardware("4bit")
    source = utils.resolve_model(cfg.model.name)
    tokenizer, _ = utils.load_tokenizer(source)
    rows, _, _ = utils.load_splits(cfg)
    train_ds, _, _ = utils.build_datasets(tokenizer, rows, [], cfg)
    model = utils.attach_lora(utils.load_base_model(source, hw), cfg)
    return model, utils.build_trainer(cfg, hw, model, tokenizer, train_ds, [], {})


def test_lora_weights_move_and_base_weights_do_not(tiny_model, tmp_path):
    model, trainer = tiny_trainer(tiny_model, tmp_path, max_steps=3)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert any(type(p).__name__ == "Params4bit" for p in model.parameters())  # really 4-bit
    trainer.train()
    after = dict(model.named_parameters())
    lora = [n for n in before if "lora_" in n]
    assert lora and all(after[n].requires_grad for n in lora)
    assert all(not torch.equal(before[n], after[n].detach()) for n in lora if "lora_B" in n)
    assert all(torch.equal(before[n], after[n].detach()) for n in before if "lora_" not in n)


def test_checkpoint_save_does_not_change_the_model(tiny_model):
    """Regression for the bitsandbytes CPU repack bug (../shared/PITFALLS.md): without the guard
    the logits of this tiny model move after state_dict()."""
    from peft import get_peft_model_state_dict
    cfg = utils.config_from_dict({"model": {"name": str(tiny_model)}})
    model = utils.attach_lora(utils.load_base_model(utils.resolve_model(cfg.model.name),
                                                    utils.pick_hardware("4bit")), cfg)
    model.eval()
    x = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(0)).to(model.device)
    with torch.no_grad():
        a = model(input_ids=x).logits
        get_peft_model_state_dict(model)
        model.state_dict()
        b = model(input_ids=x).logits
    assert torch.equal(a, b)


def test_chat_keeps_the_fast_cpu_kernel_with_the_same_outputs(tiny_model):
    """Chat loads without the guard (it never saves): bitsandbytes' repacked CPU kernel, where the
    CPU has one, must compute what the guarded path computes."""
    import bitsandbytes as bnb
    source, hw = utils.resolve_model(str(tiny_model)), utils.pick_hardware("4bit")
    guarded, fast = utils.load_base_model(source, hw), utils.load_base_model(source, hw, training=False)
    layers = [m for m in fast.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers and not any(m.support_avx512bf16_for_cpu for m in guarded.modules() if isinstance(m, bnb.nn.Linear4bit))
    assert all(m.support_avx512bf16_for_cpu == bnb.functional.has_avx512bf16() for m in layers)
    x = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(0)).to(fast.device)
    with torch.no_grad():
        a, b = guarded.eval()(input_ids=x).logits.float(), fast.eval()(input_ids=x).logits.float()
    assert torch.allclose(a, b, atol=0.05, rtol=0.02), (a - b).abs().max()
    if bnb.functional.has_avx512bf16():  # the kernel really ran: its repacked layout is in place
        assert all(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in layers)


def test_same_config_same_losses_and_no_silent_overwrite(first_run):
    cfg, out, logged = first_run
    assert main.main(["train", str(cfg)]) == 0
    assert losses(out / "checkpoint-6") == logged  # reproducible on CPU
    assert (out / "my_custom_llm_tiny-llama").is_dir() and (out / "my_custom_llm_tiny-llama_2").is_dir()


def test_resume_continues_with_the_same_losses(first_run, tmp_path):
    cfg_path, out, logged = first_run
    raw = yaml.safe_load(Path(cfg_path).read_text())
    raw["output_dir"] = str(tmp_path / "resumed")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    (tmp_path / "resumed").mkdir()
    shutil.copytree(out / "checkpoint-3", tmp_path / "resumed" / "checkpoint-3")
    assert main.main(["train", str(cfg), "--resume"]) == 0
    resumed = losses(tmp_path / "resumed" / "checkpoint-6")
    assert [s for s, _ in resumed] == [s for s, _ in logged]
    for (_, a), (_, b) in zip(resumed, logged):
        assert a == pytest.approx(b, rel=1e-3)


def test_resume_refuses_a_checkpoint_of_another_lora_shape(first_run, tmp_path, capsys):
    cfg_path, out, _ = first_run
    raw = yaml.safe_load(Path(cfg_path).read_text())
    raw["lora"] = {"r": 4}
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    assert main.main(["train", str(cfg), "--resume"]) == 2
    assert "lora.r: checkpoint has 16, config has 4" in capsys.readouterr().err


def test_resume_without_checkpoint_is_a_clear_error(tiny_model, tmp_path, capsys):
    assert main.main(["train", str(tiny_config(tmp_path, tiny_model)), "--resume"]) == 2
    assert "no checkpoint in" in capsys.readouterr().err


def test_early_stopping_stops_when_eval_loss_rises(tiny_model, tmp_path):
    # Validation answers contradict the training answers: the better the model learns the
    # training set, the worse its validation loss gets.
    held = write_jsonl(tmp_path / "held.jsonl", [
        {"instruction": f"What helps with a sore throat number {i}?",
         "response": "Stroke signs chest pain emergency diabetes vaccine migraine asthma."} for i in range(8)])
    cfg = tiny_config(tmp_path, tiny_model, rows=qa_rows(40, "Please tell me what helps a cough"),
                      max_steps=40, eval_steps=1, early_stopping_patience=1, learning_rate=2e-2)
    raw = yaml.safe_load(cfg.read_text())
    raw["data"]["eval_file"] = str(held)
    cfg.write_text(yaml.safe_dump(raw))
    assert main.main(["train", str(cfg)]) == 0
    metrics = json.loads((tmp_path / "out" / "my_custom_llm_tiny-llama" / "metrics.json").read_text())
    assert metrics["steps_run"] < 40 and metrics["stop_reason"].startswith("early stopping")
    assert metrics["best_eval_loss"] == pytest.approx(metrics["final_eval_loss"])  # best adapter kept


def test_unknown_target_module_lists_the_real_ones(tiny_model, tmp_path, capsys):
    cfg = tiny_config(tmp_path, tiny_model)
    raw = yaml.safe_load(cfg.read_text())
    raw["lora"] = {"target_modules": ["qkv_proj", "o_proj"]}
    cfg.write_text(yaml.safe_dump(raw))
    assert main.main(["train", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "lora.target_modules: qkv_proj not found" in err
    assert "down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj" in err


def test_sigint_saves_a_checkpoint_and_resume_finishes(tiny_model, tmp_path):
    cfg = tiny_config(tmp_path, tiny_model, max_steps=400, eval_steps=200)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, str(ROOT / "main.py"), "train", str(cfg)], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    seen = ""
    while "'loss'" not in seen:  # training has started
        line = proc.stdout.readline()
        assert line, f"training ended early:\n{seen}"
        seen += line
    proc.send_signal(signal.SIGINT)
    rest, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, seen + rest
    assert "--resume" in rest and "checkpoint saved" in rest
    (checkpoint,) = utils.list_checkpoints(tmp_path / "out")
    step = int(checkpoint.name.split("-")[1])
    assert 0 < step < 400 and not list((tmp_path / "out").glob("my_custom_llm_*"))
    raw = yaml.safe_load(cfg.read_text())
    raw["training"]["max_steps"] = step + 2
    cfg.write_text(yaml.safe_dump(raw))
    assert main.main(["train", str(cfg), "--resume"]) == 0
    assert json.loads((tmp_path / "out" / "my_custom_llm_tiny-llama" / "metrics.json").read_text())["steps_run"] == step + 2


def test_two_process_ddp_writes_outputs_once(tiny_model, tmp_path):
    cfg = tiny_config(tmp_path, tiny_model, max_steps=4, eval_steps=2)
    torchrun = Path(sys.executable).with_name("torchrun")
    run = subprocess.run([str(torchrun), "--nproc_per_node", "2", str(ROOT / "main.py"), "train", str(cfg)],
                         cwd=tmp_path, capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES=""))  # gloo on CPUs
    out = run.stdout + run.stderr
    assert run.returncode == 0, out[-3000:]
    assert "x 2 process(es)" in out and out.count("Training finished") == 1
    finals = list((tmp_path / "out").glob("my_custom_llm_*"))
    assert [p.name for p in finals] == ["my_custom_llm_tiny-llama"]
    assert json.loads((finals[0] / "metrics.json").read_text())["steps_run"] == 4


def test_cpu_attention_runs_in_float32_and_computes_what_sdpa_computes(tiny_model, monkeypatch):
    """utils.float32_attention (attach_lora on a CPU): on a bf16 model the attention kernel gets
    float32 inputs, where transformers' "sdpa" gives it bf16, and the loss agrees to bf16
    precision; on float32 weights the two implementations are the same arithmetic (the tiny model
    shares each key/value head between two query heads, as SmolLM2 does between three)."""
    seen, real = [], torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda q, *a, **kw: seen.append(q.dtype) or real(q, *a, **kw))
    batch = tiny_batch(tiny_model)
    for dtype in (torch.float32, torch.bfloat16):
        lean, plain = lean_and_plain(tiny_model, dtype=dtype)
        base = lean.get_base_model()
        assert base.config._attn_implementation == "sdpa_float32"
        assert plain.get_base_model().config._attn_implementation == "sdpa"
        results = {}
        for implementation in ("sdpa_float32", "sdpa"):
            base.set_attn_implementation(implementation)
            seen.clear()
            results[implementation] = loss_and_grads(lean, batch, autocast=dtype == torch.bfloat16)
            assert set(seen) == {torch.float32 if implementation == "sdpa_float32" else dtype}
        (loss32, grads32), (loss, grads) = results["sdpa_float32"], results["sdpa"]
        if dtype == torch.float32:
            # the same arithmetic; shared key/value heads sum their gradients in another order
            assert loss32 == loss and all(torch.allclose(grads32[n], grads[n], rtol=1e-5, atol=1e-7) for n in grads)
        else:
            assert abs(loss32 - loss) < 2e-2 and loss32 != loss


def test_float32_attention_leaves_position_bias_and_soft_cap_to_transformers():
    """No supported family passes a position bias or a soft cap to SDPA; a model that does gets
    transformers' own SDPA function in float32 (the bias folded into the mask as it folds it), and
    a soft cap the same refusal as under "sdpa"."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    attention = AttentionInterface()[utils._register_float32_sdpa()]
    module = torch.nn.Module()
    module.is_causal, module.num_key_value_groups = True, 2
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, heads, 5, 8, dtype=torch.bfloat16) for heads in (4, 2, 2))
    bias = torch.randn(1, 4, 5, 5)
    out, _ = attention(module, q, k, v, None, position_bias=bias)
    want, _ = sdpa_attention_forward(module, q.float(), k.float(), v.float(), None, position_bias=bias)
    without, _ = attention(module, q, k, v, None)
    assert out.dtype == torch.bfloat16 and out.shape == (1, 5, 4, 8)
    assert torch.equal(out, want.to(torch.bfloat16)) and not torch.equal(out, without)
    with pytest.raises(ValueError, match="softcap"):
        attention(module, q, k, v, None, softcap=30.0)


def test_more_torchrun_processes_than_gpus_is_a_clear_error(tiny_model, monkeypatch):
    """`torchrun --nproc_per_node 2` on a one-GPU machine: CUDA alone says "invalid device ordinal"
    from deep inside the loader (seen on an H200)."""
    import torch
    monkeypatch.setenv("LOCAL_RANK", str(torch.cuda.device_count()))  # one rank past the last GPU
    hw = utils.Hardware("cuda", torch.bfloat16, "4bit", "")
    with pytest.raises(utils.UserError, match="more processes on this machine than it has GPUs.*nproc_per_node"):
        utils.load_base_model(utils.resolve_model(str(tiny_model)), hw)


@pytest.mark.parametrize("quantization", ["8bit", "none"])
def test_other_quantizations_train(tiny_model, tmp_path, quantization):
    cfg = tiny_config(tmp_path, tiny_model, max_steps=2, eval_steps=2)
    raw = yaml.safe_load(cfg.read_text())
    raw["model"]["quantization"] = quantization
    cfg.write_text(yaml.safe_dump(raw))
    assert main.main(["train", str(cfg)]) == 0
    metrics = json.loads((tmp_path / "out" / "my_custom_llm_tiny-llama" / "metrics.json").read_text())
    assert metrics["quantization"] == quantization and metrics["dequantized_copy_mb"] == 0  # 4-bit only


def lora_model_and_batch(tiny_model, lora: dict | None = None, training: dict | None = None):
    """The tiny model in 4-bit with LoRA (config defaults, or `lora` / `training`), and
    conftest's batch on the model's device."""
    cfg = utils.config_from_dict({"model": {"name": str(tiny_model)}, "lora": lora or {}, "training": training or {}})
    source = utils.resolve_model(str(tiny_model))
    model = utils.attach_lora(utils.load_base_model(source, utils.pick_hardware("4bit")), cfg)
    return model, {k: v.to(model.device) for k, v in tiny_batch(tiny_model).items()}


def test_answer_token_loss_equals_the_models_own_loss(tiny_model):
    """The LM head only on answer tokens (2.2x faster training, less memory: make bench) must not
    change the loss: same value as the model's own, with and without accumulation normalisation."""
    model, batch = lora_model_and_batch(tiny_model)
    answer_tokens = int((batch["labels"][:, 1:] != utils.IGNORE_INDEX).sum())
    with torch.no_grad():
        own = model(**batch).loss.item()
        assert abs(utils.answer_token_loss(model, batch) - own) < 1e-3
        assert abs(2 * utils.answer_token_loss(model, batch, 2 * answer_tokens) - own) < 1e-3
        # with a system prompt long enough to be computed once for all rows (shared prefix)
        long = {k: v.to(model.device) for k, v in tiny_batch(tiny_model, LONG_SYSTEM).items()}
        keep = long["labels"][:, 1:] != utils.IGNORE_INDEX
        assert utils.shared_prefix_length(model.get_base_model(), long, keep) >= utils.MIN_SHARED_PREFIX
        assert abs(utils.answer_token_loss(model, long) - model(**long).loss.item()) < 1e-3


def test_a_shared_prefix_with_recomputed_layers_and_dropout(tiny_model):
    """The shared layout reaches recomputed (checkpointed) layers too: the same loss and gradients
    as without recomputation. With dropout on, the prefix's adapters still get gradients from
    every row; a single row shares nothing."""
    model, _ = lora_model_and_batch(tiny_model, lora={"dropout": 0.0})
    base = model.get_base_model()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    batch = {k: v.to(model.device) for k, v in tiny_batch(tiny_model, LONG_SYSTEM).items()}
    keep = batch["labels"][:, 1:] != utils.IGNORE_INDEX
    assert utils.shared_prefix_length(base, batch, keep) >= utils.MIN_SHARED_PREFIX
    assert utils.shared_prefix_length(base, {k: v[:1] for k, v in batch.items()}, keep[:1]) == 0
    base.set_attn_implementation("eager")  # the decision is kept on the model, per implementation
    assert utils.shared_prefix_length(base, batch, keep) == 0
    base.set_attn_implementation("sdpa")
    assert utils.float32_attention(model)
    assert utils.shared_prefix_length(base, batch, keep) >= utils.MIN_SHARED_PREFIX
    kept_loss, kept_grads = loss_and_grads(model, batch, autocast=False)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    loss, grads = loss_and_grads(model, batch, autocast=False)
    assert abs(loss - kept_loss) < 1e-5
    for key, grad in kept_grads.items():
        assert torch.allclose(grads[key], grad, rtol=1e-4, atol=1e-6), key
    model.gradient_checkpointing_disable()
    dropped, _ = lora_model_and_batch(tiny_model, lora={"dropout": 0.5})  # lora_B starts at zero
    loss, grads = loss_and_grads(dropped, batch, autocast=False)
    assert loss > 0 and all(g.abs().sum() > 0 for k, g in grads.items() if "lora_B" in k)


def test_a_layer_that_drops_the_shared_layout_falls_back_to_the_plain_pass(tiny_model, caplog):
    """A decoder layer that does not pass its keyword arguments on to attention (remote code) would
    attend over the flat layout as one sequence: caught by the count of layers that saw it, the
    batch is computed again in full, said once, and the model shares nothing from then on."""
    model, _ = lora_model_and_batch(tiny_model)
    base = model.get_base_model()
    batch = {k: v.to(model.device) for k, v in tiny_batch(tiny_model, LONG_SYSTEM).items()}
    keep = batch["labels"][:, 1:] != utils.IGNORE_INDEX
    attention = base.get_decoder().layers[0].self_attn
    forward = attention.forward

    def dropping(*args, **kwargs):
        kwargs.pop("shared_prefix", None)
        return forward(*args, **kwargs)

    attention.forward = dropping
    with torch.no_grad():
        plain = model(**batch).loss.item()
        assert utils.shared_prefix_length(base, batch, keep) > 0
        with caplog.at_level("WARNING"):
            loss = utils.answer_token_loss(model, batch).item()
    assert abs(loss - plain) < 1e-3
    assert "reached 1 of 2 attention layers" in caplog.text
    assert utils.shared_prefix_length(base, batch, keep) == 0


def test_the_trainer_computes_the_shared_prefix_once_per_optimizer_step(tiny_model, tmp_path, monkeypatch):
    """With gradient accumulation the micro-batches of a step share one pass over the system
    prompt (utils.StepPrefix). Its gradient must reach the LoRA weights before clipping and the
    optimizer: with clipping always on, the gradients the optimizer sees in float32 equal those of
    the plain pass (every row computes its prefix), step after step. A step whose prefix was never
    flushed is refused, not trained on without that gradient."""
    hw = utils.Hardware("cpu", torch.float32, "4bit", "")

    def run(min_shared: int, out: str):
        from transformers import TrainerCallback, set_seed
        monkeypatch.setattr(utils, "MIN_SHARED_PREFIX", min_shared)
        set_seed(0)  # the same LoRA weights in both runs
        (tmp_path / out).mkdir()
        _, trainer = tiny_trainer(tiny_model, tmp_path / out, max_steps=2, hw=hw, lora={"dropout": 0.0},
                                  batch_size=2, gradient_accumulation_steps=3, max_grad_norm=1e-3)
        seen, built = [], recording_step_prefixes(monkeypatch)

        class Grab(TrainerCallback):
            def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
                seen.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})

        trainer.add_callback(Grab())
        trainer.train()
        return seen, built, trainer

    shared, built, trainer = run(utils.MIN_SHARED_PREFIX, "shared")
    plain, unshared, _ = run(sys.maxsize, "plain")
    assert len(built) == 6 and all(reused >= 16 for reused, _ in built)
    assert [b > 0 for _, b in built] == [True, False, False] * 2  # computed by each step's first micro-batch
    assert unshared == [(0, 0)] * 6
    assert len(shared) == len(plain) == 2
    for got, want in zip(shared, plain):
        for key, grad in want.items():
            assert torch.allclose(got[key], grad, rtol=1e-4, atol=1e-8), key

    trainer.step_prefix.ids, trainer.step_prefix_of = torch.zeros(1), trainer.state.global_step - 1
    batch = trainer.data_collator([trainer.train_dataset[0], trainer.train_dataset[1]])
    trainer.model.train()
    with pytest.raises(RuntimeError, match="was never flushed"):
        trainer.compute_loss(trainer.model, batch)


def test_evaluation_computes_the_shared_prefix_once(tiny_model, tmp_path, monkeypatch):
    """Without gradients the system prompt's keys and values serve the whole evaluation (the
    weights do not change): the Trainer's evaluation and utils.answer_loss compute the prefix once,
    at the first batch, and give the plain pass's loss."""
    hw = utils.Hardware("cpu", torch.float32, "4bit", "")
    model, trainer = tiny_trainer(tiny_model, tmp_path, max_steps=1, hw=hw, batch_size=2)
    rows = [trainer.train_dataset[i] for i in range(7)]
    trainer.eval_dataset = utils.ListDataset(rows)
    log = recording_step_prefixes(monkeypatch)
    shared = trainer.evaluate()["eval_loss"], utils.answer_loss(model, rows, trainer.processing_class.pad_token_id, 3)
    built = [b for _, b in log]
    assert len(built) == 4 + 3 and [b > 0 for b in built] == [True, False, False, False, True, False, False]
    monkeypatch.setattr(utils, "MIN_SHARED_PREFIX", sys.maxsize)
    plain = trainer.evaluate()["eval_loss"], utils.answer_loss(model, rows, trainer.processing_class.pad_token_id, 3)
    assert abs(shared[0] - plain[0]) < 1e-5 and abs(shared[1] - plain[1]) < 1e-5
    assert trainer.eval_prefix is None  # not kept past the evaluation: the weights change


def test_freed_memory_goes_back_to_the_system_after_each_step(tiny_model, tmp_path):
    """On glibc the trainer returns freed arena memory every step (peak RSS 1,768 -> 1,492 MB over
    30 default steps: make bench / the note in utils); the callback must be attached and callable."""
    import ctypes.util
    _, trainer = tiny_trainer(tiny_model, tmp_path, max_steps=1)
    names = [type(cb).__name__ for cb in trainer.callback_handler.callbacks]
    if sys.platform.startswith("linux") and ctypes.util.find_library("c"):
        assert "ReleaseFreedMemory" in names
    trainer.train()  # runs the callback after the step



def test_lean_training_path_computes_what_peft_and_transformers_compute(tiny_model):
    """The lean LoRA input, RMSNorm, gated MLP and chunked head (make bench: 1.5x faster steps, a
    third less memory) are rewrites, not approximations: in float32 the loss and every LoRA gradient
    equal those of peft's and transformers' own modules."""
    lean, plain = lean_and_plain(tiny_model)
    kinds = [type(m).__name__ for m in lean.modules() if getattr(getattr(m, "forward", None), "__func__", None)
             is not None and m.forward.__func__.__name__ in ("norm_forward", "mlp_forward")]
    assert kinds.count("LlamaRMSNorm") == 5 and kinds.count("LlamaMLP") == 2  # 2 layers x 2 norms + final
    assert all(type(m.lora_dropout["default"]).__name__ == "LoraInput" for m in lean.modules() if hasattr(m, "lora_A"))
    batch = tiny_batch(tiny_model)
    lean_loss, lean_grads = loss_and_grads(lean, batch, autocast=False)
    plain_loss, plain_grads = loss_and_grads(plain, batch, autocast=False)
    assert abs(lean_loss - plain_loss) < 1e-5
    assert lean_grads.keys() == plain_grads.keys() and len(lean_grads) == 16
    for name in lean_grads:
        assert torch.allclose(lean_grads[name], plain_grads[name], rtol=1e-4, atol=1e-7), name
    # Under CPU bf16 autocast (the training dtype here): same loss to bf16 precision.
    assert abs(loss_and_grads(lean, batch, True)[0] - loss_and_grads(plain, batch, True)[0]) < 2e-2


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: the CUDA path was "
                          "checked on a lent H200 (README Performance); CI has none")


@pytest.mark.parametrize("device, quantization", [("cpu", "4bit"), pytest.param("cuda", "none", marks=CUDA),
                                                  pytest.param("cuda", "4bit", marks=CUDA)])
def test_lean_path_equals_peft_on_4bit_and_cuda(tiny_model, device, quantization):
    """The same rewrites over bitsandbytes' NF4 layers and on CUDA, where peft's own cast and
    transformers' autocast take the other branch of utils.lora_input: in float32 the loss and LoRA
    gradients equal peft's; under bf16 autocast the loss agrees to bf16 precision and the
    gradients point the same way."""
    lean, plain = lean_and_plain(tiny_model, device=device, quantization=quantization)
    assert next(lean.parameters()).device.type == device
    batch = tiny_batch(tiny_model)
    lean_loss, lean_grads = loss_and_grads(lean, batch, autocast=False)
    plain_loss, plain_grads = loss_and_grads(plain, batch, autocast=False)
    assert abs(lean_loss - plain_loss) < 1e-5 and lean_grads.keys() == plain_grads.keys()
    for name in lean_grads:
        assert torch.allclose(lean_grads[name], plain_grads[name], rtol=1e-4, atol=1e-6), name
    lean_loss, lean_grads = loss_and_grads(lean, batch, autocast=True)
    plain_loss, plain_grads = loss_and_grads(plain, batch, autocast=True)
    assert abs(lean_loss - plain_loss) < 2e-2
    for name in lean_grads:
        cosine = torch.nn.functional.cosine_similarity(lean_grads[name].flatten().float(),
                                                       plain_grads[name].flatten().float(), dim=0)
        assert cosine > 0.98, (name, cosine.item())


def test_lean_lora_input_casts_when_no_autocast_will(tiny_model):
    """A bf16 base with float32 adapters outside autocast (peft's own cast is off): the input is
    cast to the adapter's dtype, as peft would, and the output comes back in the base dtype."""
    lean, plain = lean_and_plain(tiny_model, dtype=torch.bfloat16)
    x = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = lean(input_ids=x).logits, plain(input_ids=x).logits
    assert a.dtype == b.dtype == torch.bfloat16 and torch.allclose(a.float(), b.float(), atol=2e-2)


def test_lora_input_dropout_rate_scale_gradient_and_saved_mask():
    drop = utils.lora_input(0.25, torch.float32).train()
    x = torch.ones(64, 1000, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = drop(x)
    kept = y != 0
    assert abs(kept.float().mean().item() - 0.75) < 0.01
    assert torch.allclose(y[kept], torch.full_like(y[kept], 1 / 0.75))
    assert saved and all(t.dtype == torch.bool for t in saved)  # a 1-byte mask, not a float copy
    y.sum().backward()
    assert torch.equal(x.grad, y.detach())
    torch.manual_seed(3)
    first = drop(torch.ones(64, 1000))
    torch.manual_seed(3)
    assert torch.equal(first, drop(torch.ones(64, 1000)))  # the trainer's seed makes it repeatable
    assert torch.equal(drop.eval()(x), x) and torch.equal(utils.lora_input(0.0, torch.float32).train()(x), x)


def test_adapters_reading_the_same_input_share_one_dropout(tiny_model):
    """q, k and v read the same hidden state and get the same dropped-out copy (one mask drawn and
    kept, as peft does for a fused qkv_proj); o_proj reads another tensor and gets its own; a
    changed input gets a fresh mask."""
    lean, _ = lean_and_plain(tiny_model, dropout=0.25)
    seen = {}
    for name, module in lean.named_modules():
        if type(module).__name__ == "LoraInput" and ".layers.0." in name:
            module.register_forward_hook(lambda m, args, out, name=name: [seen.setdefault(name.split(".")[-3], (args[0], out))] and None)
    lean.train()
    utils.answer_token_loss(lean, tiny_batch(tiny_model)).backward()
    assert set(seen) == {"q_proj", "k_proj", "v_proj", "o_proj"}
    (x, q), (_, k), (_, v), (_, o) = (seen[n] for n in ("q_proj", "k_proj", "v_proj", "o_proj"))
    assert q is k is v and o is not q
    assert 0.15 < (q[x != 0] == 0).float().mean().item() < 0.35  # dropout really applied
    a, b = utils.lora_input(0.25, torch.float32).train(), utils.lora_input(0.25, torch.float32).train()
    x = torch.ones(8, 1000)
    first = a(x)
    assert b(x) is first
    x.mul_(2)  # in place: a new version, so a new mask
    assert not torch.equal(b(x), 2 * first)


def test_recomputation_draws_the_same_dropout_masks(tiny_model):
    """With dropout on, gradient checkpointing must recompute every layer with the masks its
    forward used (torch restores the RNG state; the shared q/k/v copy must be shared the same way
    both times): loss and gradients equal those of a run without recomputation."""
    lean, _ = lean_and_plain(tiny_model, dropout=0.25)
    batch = tiny_batch(tiny_model)
    torch.manual_seed(0)
    loss, grads = loss_and_grads(lean, batch, autocast=False)
    lean.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert all(layer.gradient_checkpointing for layer in lean.get_base_model().model.layers)
    torch.manual_seed(0)
    recomputed_loss, recomputed = loss_and_grads(lean, batch, autocast=False)
    assert recomputed_loss == pytest.approx(loss, abs=1e-6)
    for name, grad in grads.items():
        assert torch.allclose(recomputed[name], grad, atol=1e-6), name


def test_head_cross_entropy_matches_the_plain_loss_and_gradient(monkeypatch):
    monkeypatch.setattr(utils, "HEAD_CHUNK", 7)  # 20 rows: three slices, the last one short
    torch.manual_seed(0)
    weight, labels = torch.randn(300, 32), torch.randint(0, 300, (20,))
    h = torch.randn(20, 32, requires_grad=True)
    reference = torch.nn.functional.cross_entropy(h @ weight.T, labels, reduction="sum")
    reference.backward()
    expected, h.grad = h.grad.clone(), None
    loss = utils.head_cross_entropy(h, weight, labels)
    (0.5 * loss).backward()
    assert torch.allclose(loss, reference, rtol=1e-5)
    assert torch.allclose(h.grad, 0.5 * expected, atol=1e-6)
    with torch.no_grad():
        assert torch.allclose(utils.head_cross_entropy(h, weight, labels), reference, rtol=1e-5)


def test_checkpointed_layers_spread_evenly():
    assert utils.checkpointed_layers(30, 0.5) == list(range(0, 30, 2))
    assert utils.checkpointed_layers(30, 1.0) == list(range(30))
    assert utils.checkpointed_layers(30, 0.0) == [] and utils.checkpointed_layers(2, 0.5) == [0]
    assert [utils.checkpointed_fraction(v) for v in (True, False, 0.25)] == [1.0, 0.0, 0.25]


@pytest.mark.parametrize("setting,expected", [(0.5, [True, False]), (True, [True, True]), (False, [False, False])])
def test_gradient_checkpointing_lands_on_the_chosen_layers(tiny_model, tmp_path, setting, expected):
    from transformers.modeling_layers import GradientCheckpointingLayer
    model, trainer = tiny_trainer(tiny_model, tmp_path, max_steps=1, gradient_checkpointing=setting)
    trainer.train()
    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    assert [layer.gradient_checkpointing for layer in layers] == expected


def test_answer_token_loss_keeps_the_logit_scale_of_granite_like_families(tiny_model):
    """Granite divides its logits by logits_scaling in its own forward; answer_token_loss must
    take that family's logits from the model, not apply the LM head itself."""
    from transformers import GraniteConfig, GraniteForCausalLM
    torch.manual_seed(0)
    batch = tiny_batch(tiny_model)
    vocab = int(batch["input_ids"].max()) + 1
    model = GraniteForCausalLM(GraniteConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                             num_attention_heads=2, num_key_value_heads=2, logits_scaling=4.0))
    assert utils.scales_logits(model.config)
    with torch.no_grad():
        own = model(**batch).loss.item()
        assert abs(utils.answer_token_loss(model, batch).item() - own) < 1e-4


def test_onednn_kernel_cache_is_capped_unless_the_user_set_it():
    """utils caps oneDNN's per-shape kernel cache before torch loads (RSS crept ~8 MB a step
    without it: README Performance); a value the user exported wins."""
    code = "import os, utils; print(os.environ['ONEDNN_PRIMITIVE_CACHE_CAPACITY'])"
    env = {k: v for k, v in os.environ.items() if k != "ONEDNN_PRIMITIVE_CACHE_CAPACITY"}
    run = lambda e: subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=e, capture_output=True,
                                   text=True, timeout=120).stdout.strip()
    assert run(env) == "64"
    assert run({**env, "ONEDNN_PRIMITIVE_CACHE_CAPACITY": "1024"}) == "1024"


def test_onednn_kernel_cache_holds_every_product_of_a_training_step(tiny_model):
    """A cap below the number of (shape, layout) products one forward + backward cycles through
    in every layer rebuilds each kernel before its next use (8 on SmolLM2: 161 builds per
    micro-batch instead of 17, ~0.36 ms each). Counted here with LoRA on every linear layer,
    the most shapes a config can ask for."""
    from torch.utils._python_dispatch import TorchDispatchMode
    model, batch = lora_model_and_batch(tiny_model, {"target_modules": "all-linear"})
    products = {torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.bmm, torch.ops.aten.baddbmm}
    seen = set()

    class Shapes(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket in products:
                seen.add(tuple((tuple(a.shape), a.stride(), a.dtype) for a in args if isinstance(a, torch.Tensor)))
            return func(*args, **(kwargs or {}))

    model.train()
    with Shapes(), torch.autocast(model.device.type, dtype=torch.bfloat16):
        utils.answer_token_loss(model, batch).backward()
    assert 10 < len(seen) <= int(os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"]), len(seen)


def test_kept_dequantized_weights_train_as_the_4bit_ones(tiny_model):
    """training.keep_dequantized: the same loss and LoRA gradients as bitsandbytes' own products
    (dropout off), the copy never in the model's state (checkpoints hold what they held), and a
    copy on every 4-bit layer: the adapters' base layers and the MLP."""
    runs = {}
    for keep in (True, False):
        torch.manual_seed(0)  # the same LoRA initialisation
        model, batch = lora_model_and_batch(tiny_model, lora={"dropout": 0.0}, training={"keep_dequantized": keep})
        loss = utils.answer_token_loss(model, batch)
        loss.backward()
        runs[keep] = (model, loss.item(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    kept, plain = runs[True][0], runs[False][0]
    layers = [m for m in kept.modules() if type(m).__name__ == "Linear4bit" and not hasattr(m, "lora_A")]
    assert layers and all(hasattr(m, "dequantized") for m in layers)
    assert utils.dequantized_bytes(kept) == sum(m.dequantized[1].nbytes for m in layers) > 0
    assert utils.dequantized_bytes(plain) == 0
    assert kept.state_dict().keys() == plain.state_dict().keys()
    assert abs(runs[True][1] - runs[False][1]) < 1e-6, (runs[True][1], runs[False][1])
    for name, grad in runs[True][2].items():
        assert torch.allclose(grad, runs[False][2][name], rtol=1e-4, atol=1e-6), name


@pytest.mark.filterwarnings("ignore:Merge lora module")  # peft's note on 4-bit rounding, expected here
def test_kept_copy_follows_a_replaced_weight(tiny_model):
    """A merge (peft writes a new 4-bit weight) must not leave the layer computing with the old
    copy: after a merge the layer equals bitsandbytes' own forward on the merged weight."""
    import bitsandbytes as bnb
    model, _ = lora_model_and_batch(tiny_model, training={"keep_dequantized": True})
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    lora = next(m for m in model.modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer"))
    layer = lora.base_layer
    x = torch.randn(3, layer.in_features, device=layer.weight.device)
    with torch.no_grad():
        before = layer(x)
        assert torch.allclose(before, bnb.nn.Linear4bit.forward(layer, x), atol=1e-5)
        lora.merge()
        after = layer(x)
        assert torch.allclose(after, bnb.nn.Linear4bit.forward(layer, x), atol=1e-5)
    assert (after - before).abs().max() > 0.1


def test_keep_dequantized_auto_keeps_the_copy_only_where_it_fits(tiny_model, monkeypatch):
    """auto: on a CPU when the copy takes at most a quarter of the free memory; false never;
    true always. The bytes are the weights' count in the compute dtype."""
    import psutil
    model, _ = lora_model_and_batch(tiny_model, training={"keep_dequantized": False})
    layers = [m for m in model.modules() if type(m).__name__ == "Linear4bit" and not hasattr(m, "lora_A")]
    need = sum(m.in_features * m.out_features * m.compute_dtype.itemsize for m in layers)
    assert utils.keep_dequantized(model, False) == 0 == utils.dequantized_bytes(model)
    free = psutil.virtual_memory()
    monkeypatch.setattr(psutil, "virtual_memory", lambda: free._replace(available=4 * need - 1))
    assert utils.keep_dequantized(model, "auto") == 0 == utils.dequantized_bytes(model)
    assert utils.keep_dequantized(model, True) == need == utils.dequantized_bytes(model)
    monkeypatch.setattr(psutil, "virtual_memory", lambda: free._replace(available=4 * need))
    model, _ = lora_model_and_batch(tiny_model)  # the default, auto: a CPU only
    assert utils.dequantized_bytes(model) == (need if model.device.type == "cpu" else 0)

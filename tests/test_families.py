"""Every advertised family, proven without the hub: a tiny random model of each architecture
with that family's chat template trains and answers; LoRA lands on the right modules; the
answer's labels end with the family's end-of-turn token, which also stops generation."""
import json
import sys

import pytest
import yaml

import main
import utils
from conftest import (LONG_SYSTEM, lean_and_plain, loss_and_grads, qa_rows, recording_step_prefixes, tiny_batch,
                      tiny_config)
from tiny import FAMILIES, build_tiny_model


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tmp_path_factory):
    folder = build_tiny_model(tmp_path_factory.mktemp(request.param) / request.param, family=request.param)
    return request.param, folder


def test_family_trains_and_answers(family, tmp_path, capsys):
    name, folder = family
    *_, end_of_turn, auto_targets = FAMILIES[name]
    cfg = tiny_config(tmp_path, folder, rows=qa_rows(12), max_steps=2, eval_steps=2)
    raw = yaml.safe_load(cfg.read_text())
    raw["generation"] = {"max_new_tokens": 8}
    cfg.write_text(yaml.safe_dump(raw))
    assert main.main(["train", str(cfg)]) == 0
    final = tmp_path / "out" / f"my_custom_llm_{folder.name}"
    adapter = json.loads((final / "adapter_config.json").read_text())
    assert set(adapter["target_modules"]) == auto_targets

    tokenizer, _ = utils.load_tokenizer(utils.ModelSource(str(final), "adapter", ""))
    rendered = utils.render_example(tokenizer, [{"role": "user", "content": "Is rest good?"},
                                                {"role": "assistant", "content": "Yes, rest helps."}], "Be careful.", 256)
    learned = [t for t, l in zip(rendered["input_ids"], rendered["labels"]) if l != utils.IGNORE_INDEX]
    eot = tokenizer.convert_tokens_to_ids(end_of_turn)
    assert eot in learned[-2:]  # last, or before the EOS some templates add after the last turn
    assert tokenizer.decode(learned).startswith("Yes, rest helps.")
    assert eot in utils.end_of_turn_ids(tokenizer)
    text = tokenizer.decode(rendered["input_ids"])
    assert "Be careful." in text  # system prompt present, folded for Gemma

    capsys.readouterr()
    assert main.main(["inference", str(cfg), "--question", "Is rest good?"]) == 0
    assert utils.DEFAULT_DISCLAIMER in capsys.readouterr().out


def test_generation_stops_at_the_family_end_of_turn(family):
    """Force the end-of-turn token at the third step: generation must stop right there."""
    import torch
    from transformers import LogitsProcessor, LogitsProcessorList
    name, folder = family
    end_of_turn = FAMILIES[name][5]
    cfg = utils.config_from_dict({"model": {"name": str(folder)}, "generation": {"max_new_tokens": 20}})
    source = utils.resolve_model(cfg.model.name)
    tokenizer, _ = utils.load_tokenizer(source)
    model = utils.load_base_model(source, utils.pick_hardware("4bit"))
    model.config.use_cache = True
    eot = tokenizer.convert_tokens_to_ids(end_of_turn)

    class ForceAtThird(LogitsProcessor):
        def __init__(self):
            self.calls = 0

        def __call__(self, input_ids, scores):
            self.calls += 1
            if self.calls == 3:
                scores[:] = -1e9
                scores[:, eot] = 0
            elif self.calls < 3:
                scores[:, utils.end_of_turn_ids(tokenizer)] = -1e9  # not before
            return scores

    prompt = utils.render_prompt(tokenizer, [{"role": "user", "content": "hi"}], "S")
    inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    out = model.generate(**inputs, max_new_tokens=20, do_sample=False, eos_token_id=utils.end_of_turn_ids(tokenizer),
                         pad_token_id=tokenizer.pad_token_id, logits_processor=LogitsProcessorList([ForceAtThird()]))
    new = out[0, inputs["input_ids"].shape[1]:].tolist()
    assert len(new) == 3 and new[-1] == eot


def test_unfused_names_are_translated_for_fused_models(tmp_path, capsys):
    folder = build_tiny_model(tmp_path / "phi", family="phi3")
    cfg = utils.config_from_dict({"model": {"name": str(folder)}, "lora": {"target_modules": ["q_proj", "v_proj", "o_proj", "up_proj"]}})
    model = utils.load_base_model(utils.resolve_model(str(folder)), utils.pick_hardware("4bit"))
    assert utils.resolve_target_modules(model, cfg.lora.target_modules, "phi") == ["qkv_proj", "o_proj", "gate_up_proj"]
    assert "q_proj->qkv_proj" in capsys.readouterr().out
    assert utils.resolve_target_modules(model, "auto") == ["qkv_proj", "o_proj"]
    with pytest.raises(utils.ConfigError, match="c_attn not found in phi. Its linear modules are: down_proj, gate_up_proj, o_proj, qkv_proj"):
        utils.resolve_target_modules(model, ["c_attn"], "phi")


# Lean layers each family gets: Llama-style RMSNorm (2 per layer + final) and gated-SiLU MLP
# (Phi-3's fused gate_up included); Gemma 2 (1 + weight norm, GELU MLP) keeps its own modules.
LEAN = {"smollm2": (5, 2), "llama3": (5, 2), "phi3": (5, 2), "qwen2": (5, 2), "gemma2": (0, 0)}


def test_lean_layers_compute_what_the_family_computes(family):
    import torch
    name, folder = family
    lean, plain = lean_and_plain(folder)
    swapped = [m.forward.__func__.__name__ for m in lean.modules()
               if getattr(getattr(m, "forward", None), "__func__", None) is not None
               and m.forward.__func__.__name__ in ("norm_forward", "mlp_forward")]
    assert (swapped.count("norm_forward"), swapped.count("mlp_forward")) == LEAN[name]
    batch = tiny_batch(folder)
    lean_loss, lean_grads = loss_and_grads(lean, batch, autocast=False)
    plain_loss, plain_grads = loss_and_grads(plain, batch, autocast=False)
    assert abs(lean_loss - plain_loss) < 1e-5
    for key in plain_grads:
        assert torch.allclose(lean_grads[key], plain_grads[key], rtol=1e-4, atol=1e-7), key


def shared_and_plain(model, batch, monkeypatch):
    """Loss and LoRA gradients with the batch's shared prefix computed once, then in every row."""
    shared = loss_and_grads(model, batch, autocast=False)
    with monkeypatch.context() as m:
        m.setattr(utils, "MIN_SHARED_PREFIX", sys.maxsize)
        plain = loss_and_grads(model, batch, autocast=False)
    return shared, plain


def assert_same(shared, plain):
    import torch
    assert abs(shared[0] - plain[0]) < 1e-5
    for key, grad in plain[1].items():
        assert torch.allclose(shared[1][key], grad, rtol=1e-4, atol=1e-7), key


def test_a_shared_system_prompt_is_computed_once_to_the_same_loss_and_gradients(family, monkeypatch):
    """Every row of a batch opens with the template's header and the system prompt: computed once
    (the batch as one sequence, the prefix once, utils.decoder_hidden_states), the loss and the LoRA
    gradients must be the plain pass's (no dropout: the same arithmetic). Gemma 2's sliding-window
    cache is left to the plain pass."""
    name, folder = family
    lean, _ = lean_and_plain(folder)
    base = lean.get_base_model()
    batch = tiny_batch(folder, LONG_SYSTEM)
    keep = batch["labels"][:, 1:] != utils.IGNORE_INDEX
    prefix = utils.shared_prefix_length(base, batch, keep)
    if name == "gemma2":
        assert prefix == 0 and not utils.shares_prefix(base)
        return
    tokenizer, _ = utils.load_tokenizer(utils.resolve_model(str(folder)))
    assert LONG_SYSTEM in tokenizer.decode(batch["input_ids"][0, :prefix])
    assert_same(*shared_and_plain(lean, batch, monkeypatch))


def step_loss_and_grads(model, batches, step, recompute: bool):
    """Summed loss and LoRA gradients of one optimizer step over `batches` (float32), the prefix
    shared across them through `step` (utils.StepPrefix) or, with None, as answer_token_loss does
    without one."""
    model.train()
    model.zero_grad()
    if recompute:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    total = 0.0
    for batch in batches:
        loss = utils.answer_token_loss(model, batch, step=step)
        loss.backward()
        total += loss.item()
    if step is not None:
        step.flush()
    if recompute:
        model.gradient_checkpointing_disable()
    return total, {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("recompute", [False, True], ids=["kept", "recomputed"])
def test_a_step_computes_its_shared_prefix_once_to_the_same_gradients(family, recompute, monkeypatch):
    """The micro-batches of an optimizer step share the system prompt's pass (utils.StepPrefix):
    one of two rows starts it, one whose rows also share a question word and one of a single row
    reuse it, one with another system prompt flushes it and starts its own, and the last goes back
    to the first prompt. The step's loss and LoRA gradients must be the plain pass's, with layers
    kept and recomputed (checkpointing runs the prefix's layers again when it is flushed)."""
    name, folder = family
    lean, _ = lean_and_plain(folder)
    full = tiny_batch(folder, LONG_SYSTEM)
    batches = [{k: v[:2] for k, v in full.items()},
               tiny_batch(folder, LONG_SYSTEM, questions=["Is rest good for a cold?"] * 2),
               {k: v[2:] for k, v in full.items()},
               tiny_batch(folder, "Another system prompt, long enough for every row to share it, surely."),
               full]
    step, built = utils.StepPrefix(), recording_step_prefixes(monkeypatch)
    shared = step_loss_and_grads(lean, batches, step, recompute)
    if name == "gemma2":  # sliding-window cache: nothing shared
        assert built == [(0, 0)] * 5
        return
    assert [b > 0 for _, b in built] == [True, False, False, True, True]
    assert built[1][0] < built[0][1] and built[2][0] == built[0][1]  # cut to what it shares; all of it
    assert all(reused >= utils.MIN_SHARED_PREFIX for reused, _ in built)
    assert step.ids is None and not step.kv  # flushed
    with monkeypatch.context() as m:
        m.setattr(utils, "MIN_SHARED_PREFIX", sys.maxsize)
        plain = step_loss_and_grads(lean, batches, None, recompute)
    assert_same(shared, plain)


def test_a_step_does_not_share_a_prefix_whose_rotary_frequencies_depend_on_the_length(tmp_path, monkeypatch):
    """LongRoPE (Phi-3.5, Phi-4-mini) picks its frequencies from the longest position of a pass once
    it is past the original context (here 48 tokens; the prefix is 38, the batch 96): a prefix
    computed alone would be rotated otherwise than in the plain pass, so such micro-batches share
    their prefix within themselves only, to the plain pass's gradients. Without that check they
    differ (the check is what makes them equal)."""
    folder = build_tiny_model(tmp_path / "phi-longrope", family="phi3", original_max_position_embeddings=48,
                              rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0,
                                               "short_factor": [1.0] * 8, "long_factor": [4.0] * 8,
                                               "original_max_position_embeddings": 48})
    lean, _ = lean_and_plain(folder)
    full = tiny_batch(folder, "Be careful, kind and accurate.")
    batches = [{k: v[:2] for k, v in full.items()}, {k: v[2:] for k, v in full.items()}]
    keep = full["labels"][:, 1:] != utils.IGNORE_INDEX
    base = lean.get_base_model()
    assert utils.MIN_SHARED_PREFIX <= utils.shared_prefix_length(base, full, keep) <= 48 < full["input_ids"].shape[1]
    assert utils.rope_frequencies_vary(base, full["input_ids"].shape[1]) and not utils.rope_frequencies_vary(base, 48)
    with monkeypatch.context() as m:
        m.setattr(utils, "MIN_SHARED_PREFIX", sys.maxsize)
        plain = step_loss_and_grads(lean, batches, None, recompute=False)
    assert_same(step_loss_and_grads(lean, batches, utils.StepPrefix(), recompute=False), plain)
    monkeypatch.setattr(utils, "rope_frequencies_vary", lambda base, length: False)
    unchecked = step_loss_and_grads(lean, batches, utils.StepPrefix(), recompute=False)
    with pytest.raises(AssertionError):
        assert_same(unchecked, plain)


def test_a_shared_prefix_stops_where_the_loss_starts(family, monkeypatch):
    """Rows with the same question share everything up to the answer: the prefix ends at the last
    prompt position (whose hidden state predicts the first answer token), not inside the answer."""
    name, folder = family
    if name == "gemma2":
        pytest.skip("sliding-window cache: no shared prefix (previous test)")
    lean, _ = lean_and_plain(folder)
    batch = tiny_batch(folder, LONG_SYSTEM, questions=["Is rest good for a cold?"] * 2)
    keep = batch["labels"][:, 1:] != utils.IGNORE_INDEX
    assert (batch["input_ids"][0, :40] == batch["input_ids"][1, :40]).all()
    assert utils.shared_prefix_length(lean.get_base_model(), batch, keep) == int(keep[0].int().argmax())
    assert_same(*shared_and_plain(lean, batch, monkeypatch))

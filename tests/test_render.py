"""Rendering: loss only on the answer, end-of-turn token inside the labels, system prompt folding."""
import pytest
import torch

import utils
from tiny import build_tokenizer

CONV = [{"role": "user", "content": "What helps a sore throat?"},
        {"role": "assistant", "content": "Rest and fluids help."}]

GEMMA_LIKE = (
    "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n"
    "{{ m['content'] }}<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


@pytest.fixture(scope="module")
def chatml():
    tok = build_tokenizer()
    tok.pad_token = tok.eos_token  # as SmolLM2 ships it
    return tok


def learned_text(tok, rendered):
    return tok.decode([t for t, l in zip(rendered["input_ids"], rendered["labels"]) if l != utils.IGNORE_INDEX])


def test_only_the_answer_and_its_end_of_turn_carry_loss(chatml):
    r = utils.render_example(chatml, CONV, "Be careful.", 512)
    assert learned_text(chatml, r) == "Rest and fluids help.<|im_end|>"
    # pad == eos here (the SmolLM2 trap): the end-of-turn id must still be a label
    assert chatml.pad_token_id == chatml.eos_token_id
    assert chatml.eos_token_id in [l for l in r["labels"] if l != utils.IGNORE_INDEX]
    full = chatml.decode(r["input_ids"])
    assert full.startswith("<|im_start|>system\nBe careful.<|im_end|>")
    assert full == chatml.apply_chat_template(
        [{"role": "system", "content": "Be careful."}, *CONV], tokenize=False)


def test_multi_turn_labels_every_assistant_turn(chatml):
    conv = CONV + [{"role": "user", "content": "And honey?"}, {"role": "assistant", "content": "Yes, for adults."}]
    r = utils.render_example(chatml, conv, "Be careful.", 512)
    assert learned_text(chatml, r) == "Rest and fluids help.<|im_end|>Yes, for adults.<|im_end|>"


def test_collator_keeps_the_eos_label_that_equals_pad(chatml):
    rows = [utils.render_example(chatml, CONV, "S", 512),
            utils.render_example(chatml, CONV + [{"role": "user", "content": "more?"},
                                                 {"role": "assistant", "content": "no"}], "S", 512)]
    batch = utils.PadCollator(chatml.pad_token_id)([{k: r[k] for k in ("input_ids", "labels")} for r in rows])
    n0 = len(rows[0]["input_ids"])
    assert batch["input_ids"].shape[1] % 8 == 0 and batch["input_ids"].shape[1] >= len(rows[1]["input_ids"])
    assert batch["labels"][0, n0 - 2].item() == chatml.eos_token_id  # last label before the "\n"
    assert (batch["labels"][0, n0:] == utils.IGNORE_INDEX).all()
    assert batch["attention_mask"][0].sum().item() == n0


def test_template_without_system_role_gets_it_folded_into_the_first_user_turn():
    tok = build_tokenizer(GEMMA_LIKE, specials=("<start_of_turn>", "<end_of_turn>"), eos="<end_of_turn>")
    assert not utils.supports_system_role(tok)
    r = utils.render_example(tok, CONV, "Be careful.", 512)
    text = tok.decode(r["input_ids"])
    assert text.startswith("<start_of_turn>user\nBe careful.\n\nWhat helps a sore throat?<end_of_turn>")
    assert learned_text(tok, r) == "Rest and fluids help.<end_of_turn>"


def test_tokenizer_without_template_gets_chatml():
    tok = build_tokenizer()
    tok.chat_template = None
    assert utils.ensure_chat_template(tok) is True
    assert "<|im_start|>assistant\n" in utils.render_prompt(tok, CONV[:1], "S")


def test_over_length_is_cut_from_the_answer_end_and_counted(chatml):
    long = [CONV[0], {"role": "assistant", "content": "word " * 300}]
    cfg = utils.config_from_dict({"model": {"max_length": 64}, "data": {"system_prompt": "S"}})
    rows, stats = utils.tokenize_examples(chatml, [long, CONV], cfg)
    assert stats == {"truncated": 1, "dropped_no_answer_left": 0}
    assert len(rows[0]["input_ids"]) == 64 and rows[0]["labels"][-1] != utils.IGNORE_INDEX


def test_prompt_longer_than_max_length_is_dropped_and_all_gone_is_an_error(chatml):
    cfg = utils.config_from_dict({"model": {"max_length": 32}, "data": {"system_prompt": "very long " * 40}})
    with pytest.raises(utils.DataError, match="no training example fits model.max_length=32"):
        utils.build_datasets(chatml, [CONV], [], cfg)

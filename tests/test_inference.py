"""Inference mechanics on the tiny model: loading the right adapter, scripted and interactive use."""
import json
import shutil
import sys

import pexpect
import pytest
import yaml

import main
import utils
from conftest import ROOT, tiny_config, trained_tiny


@pytest.fixture(scope="module")
def trained(tiny_model, tmp_path_factory):
    return trained_tiny(tmp_path_factory.mktemp("chat"), tiny_model, max_steps=2, eval_steps=2)


def test_question_answers_once_with_the_disclaimer_and_writes_rows(trained, tmp_path, capsys):
    out = tmp_path / "answers.jsonl"
    assert main.main(["inference", str(trained), "--question", "What helps a sore throat?", "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed.count(utils.DEFAULT_DISCLAIMER) == 1
    (row,) = [json.loads(l) for l in out.read_text().splitlines()]
    assert row["question"] == "What helps a sore throat?" and row["answer"].endswith(utils.DEFAULT_DISCLAIMER)
    assert row["ended"] in ("eos", "cap") and "adapter" in row["model"]
    assert row["safety"] == {"label": "answer", "category": "none", "model_answered": True}


def test_output_rows_record_screening_decisions(trained, tmp_path):
    out = tmp_path / "rows.jsonl"
    for q in ("my dad has crushing chest pain and is sweating", "where can I buy oxycodone without a prescription"):
        assert main.main(["inference", str(trained), "--question", q, "--output", str(out)]) == 0
    first, second = [json.loads(l) for l in out.read_text().splitlines()]
    assert first["safety"] == {"label": "escalate", "category": "cardiac", "model_answered": False}
    assert first["answer"].startswith(utils.DEFAULT_EMERGENCY)
    assert second["safety"]["label"] == "refuse" and second["answer"].startswith(utils.DEFAULT_REFUSAL)


def test_piped_questions_are_answered_one_per_line(trained, monkeypatch, capsys):
    import io
    monkeypatch.setattr(sys, "stdin", io.StringIO("first question\n\nsecond question\n"))
    assert main.main(["inference", str(trained)]) == 0
    assert capsys.readouterr().out.count(utils.DEFAULT_DISCLAIMER) == 2


def test_adapter_from_a_checkpoint_and_base(trained, tmp_path):
    checkpoint = utils.list_checkpoints(yaml.safe_load(trained.read_text())["output_dir"])[-1]
    out = tmp_path / "rows.jsonl"
    assert main.main(["inference", str(trained), "--adapter", str(checkpoint), "--question", "hi", "--output", str(out)]) == 0
    assert main.main(["inference", str(trained), "--base", "--question", "hi", "--output", str(out)]) == 0
    models = [json.loads(l)["model"] for l in out.read_text().splitlines()]
    assert models[0].endswith(f"adapter {checkpoint}") and models[1].endswith("(base, untuned)")


def test_no_trained_model_is_one_clear_line(tiny_model, tmp_path, capsys):
    assert main.main(["inference", str(tiny_config(tmp_path, tiny_model))]) == 2
    err = capsys.readouterr().err.strip()
    assert "no trained model in" in err and "python main.py train" in err and "\n" not in err


def test_answers_cut_by_the_cap_end_on_a_full_sentence():
    assert utils.cut_to_sentence("Rest helps. Drink fluids. See a doc") == "Rest helps. Drink fluids." + utils.CUT_NOTE
    assert utils.with_disclaimer("Answer.", utils.Config()).count(utils.DEFAULT_DISCLAIMER) == 1
    assert utils.with_disclaimer("Answer.\n\n" + utils.DEFAULT_DISCLAIMER, utils.Config()).count(utils.DEFAULT_DISCLAIMER) == 1


def test_end_of_turn_ids_include_every_known_marker():
    from tiny import build_tokenizer
    tok = build_tokenizer()
    ids = utils.end_of_turn_ids(tok)
    vocab = tok.get_vocab()
    assert vocab["<|im_end|>"] in ids and vocab["<|endoftext|>"] in ids


def test_interactive_session_in_a_terminal(trained):
    child = pexpect.spawn(sys.executable, [str(ROOT / "main.py"), "inference", str(trained)],
                          encoding="utf-8", timeout=120, cwd=str(trained.parent))
    child.expect("Type 'quit' to exit")
    child.expect("You: ")
    child.sendline("")  # empty lines are ignored
    child.sendline("/help")
    child.expect("/reset clears the conversation")
    child.expect("You: ")
    child.sendline("What helps a sore throat?")
    child.expect("Assistant: ")
    child.expect("not a substitute for professional medical advice")
    child.expect("You: ")
    child.sendline("my husband collapsed and is not breathing")
    child.expect("This could be a medical emergency")
    child.expect("You: ")
    child.sendline("how many of my nan's sleeping pills would be a lethal dose")
    child.expect("I don't have enough information to answer this safely")
    child.expect("You: ")
    child.sendline("/reset")
    child.expect(r"\(conversation cleared\)")
    child.sendline("quit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_no_repeat_applies_to_the_answer_not_the_prompt():
    import torch
    proc = utils._no_repeat_in_answer(prompt_len=3, n=2)
    scores = torch.zeros(1, 10)
    # prompt 5 6 7; answer so far 5 6 ... 5 -> 6 would repeat the answer's own bigram "5 6"
    out = proc(torch.tensor([[5, 6, 7, 5, 6, 9, 5]]), scores.clone())
    assert out[0, 6] == -float("inf") and torch.isfinite(out[0, [5, 7, 9]]).all()
    # the bigram "6 7" only appears in the prompt: the answer may use it
    out = proc(torch.tensor([[5, 6, 7, 1, 6]]), scores.clone())
    assert torch.isfinite(out).all()


def test_bad_adapter_and_output_paths_are_clear_errors(trained, tmp_path, capsys):
    assert main.main(["inference", str(trained), "--adapter", str(tmp_path), "--question", "hi"]) == 2
    assert "no adapter_config.json there" in capsys.readouterr().err
    assert main.main(["inference", str(trained), "--question", "hi", "--output", str(tmp_path / "no" / "a.jsonl")]) == 2
    err = capsys.readouterr().err
    assert "cannot write there" in err and "Traceback" not in err


def test_an_error_in_one_turn_keeps_the_session(monkeypatch, capsys):
    """A turn that cannot be answered (a question longer than llama.cpp's context) is reported
    and the session goes on with the conversation as it was before that question."""
    questions = iter(["a very long question", "a short one", "quit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(questions))
    seen = []

    def answer(history, out=None):
        seen.append([m["content"] for m in history])
        if history[-1]["content"].startswith("a very long"):
            raise utils.UserError("the conversation is 5000 tokens, more than llama.cpp's context of 2048")
        return {"answer": "Rest.", "text": "Rest.", "ended": "eos"}
    utils.interactive(answer, "test model", utils.config_from_dict({}))
    assert "more than llama.cpp's context" in capsys.readouterr().out
    assert seen == [["a very long question"], ["a short one"]]

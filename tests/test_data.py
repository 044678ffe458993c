"""Data loading: every bad line named by file and line; nothing dropped silently."""
import json

import pytest

import main
import utils
from conftest import qa_rows, write_config, write_jsonl

GOOD = {"instruction": "What is a fever?", "response": "A body temperature above normal."}


@pytest.mark.parametrize("bad_line, message", [
    ('{"instruction": "x", "response": ', "invalid JSON"),
    ('["a list"]', "expected a JSON object, got list"),
    ('{"instruction": "What?"}', "missing field 'response'"),
    ('{"instruction": "What?", "response": "   "}', "field 'response' is empty"),
    ('{"instruction": 5, "response": "ok"}', "field 'instruction' must be a string, got int"),
    ('{"instruction": "a", "response": "b", "input": 3}', "field 'input' must be a string"),
    ('{"messages": [{"role": "user", "content": "hi"}]}', "last message must be the assistant"),
    ('{"messages": [{"role": "doctor", "content": "hi"}]}', "role is 'doctor'"),
])
def test_bad_line_named_with_line_number(tmp_path, bad_line, message):
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD] * 0 + [dict(GOOD, instruction=f"q{i}") for i in range(6)] + [bad_line])
    with pytest.raises(utils.DataError) as err:
        utils.load_examples(path)
    assert f"{path}:7:" in str(err.value) and message in str(err.value)


def test_invalid_utf8(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(json.dumps(GOOD).encode() + b"\n" + b'{"instruction": "caf\xe9", "response": "x"}\n')
    with pytest.raises(utils.DataError, match=r"d.jsonl:2: invalid UTF-8"):
        utils.load_examples(path)


def test_empty_and_missing_file(tmp_path):
    empty = tmp_path / "e.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(utils.DataError, match="no examples"):
        utils.load_examples(empty)
    with pytest.raises(utils.DataError, match="data file not found"):
        utils.load_examples(tmp_path / "missing.jsonl")


def test_duplicates_dropped_and_counted_input_joined_messages_accepted(tmp_path):
    rows = [GOOD, GOOD, {"instruction": "Explain this result", "input": "HbA1c 6.1%", "response": "It is..."},
            {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                          {"role": "user", "content": "Is rest good?"}, {"role": "assistant", "content": "Yes"}]}]
    examples, report = utils.load_examples(write_jsonl(tmp_path / "d.jsonl", rows))
    assert (report.rows, report.kept, report.duplicates) == (4, 3, 1)
    assert examples[1][0]["content"] == "Explain this result\n\nHbA1c 6.1%"
    assert len(examples[2]) == 4


def test_split_is_deterministic_and_never_leaks_a_question(tmp_path):
    rows = qa_rows(50)
    # the same question with two different answers must land on one side only
    rows += [{"instruction": "What helps with a sore throat number 3?", "response": "Another answer."}]
    examples, _ = utils.load_examples(write_jsonl(tmp_path / "d.jsonl", rows))
    train, val = utils.split_examples(examples, 0.2, seed=1)
    again = utils.split_examples(examples, 0.2, seed=1)
    assert (train, val) == again
    assert len(val) in (10, 11) and len(train) + len(val) == 51
    assert not {utils.question_key(e) for e in train} & {utils.question_key(e) for e in val}
    assert utils.split_examples(examples, 0.2, seed=2) != (train, val)


def test_eval_file_removes_overlapping_questions_from_train(tmp_path):
    train = write_jsonl(tmp_path / "t.jsonl", qa_rows(10))
    held = write_jsonl(tmp_path / "e.jsonl", qa_rows(3))
    cfg = utils.config_from_dict({"data": {"train_file": str(train), "eval_file": str(held)}})
    tr, va, summary = utils.load_splits(cfg)
    assert (len(tr), len(va), summary["train_dropped_as_in_eval"]) == (7, 3, 3)


def test_cli_reports_broken_line_7_with_exit_2(tmp_path, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", qa_rows(6) + ["{broken"])
    cfg = write_config(tmp_path, data={"train_file": str(data)})
    assert main.main(["data", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert f"{data}:7: invalid JSON" in err and "Traceback" not in err

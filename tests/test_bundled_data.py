"""The data shipped in data/: schema, no empty fields, no duplicates, no overlap between the
training, probe and evaluation sets, and the label counts the project promises."""
import json
import re
from collections import Counter
from pathlib import Path

import pytest

import utils
from conftest import ROOT

DATA = ROOT / "data"
REFUSAL = utils.DEFAULT_REFUSAL
EMERGENCY_OPENING = "This could be a medical emergency."
QA_CATEGORIES = {"condition", "medication", "prevention", "lifestyle", "first_aid", "mental_health",
                 "pregnancy_children", "test_results"}


def rows(name: str) -> list[dict]:
    return [json.loads(line) for line in (DATA / name).read_text(encoding="utf-8").splitlines() if line.strip()]


def norm(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", " ", text.lower()).strip()


def sentences(text: str) -> set[str]:
    return {norm(s) for s in re.split(r"(?<=[.!?])\s+", text) if len(norm(s).split()) >= 4}


def test_every_data_file_is_known_and_loads():
    assert {p.name for p in DATA.glob("*.jsonl")} == {"my_custom_data.jsonl", "safety_probes.jsonl", "eval_qa.jsonl",
                                                      "safety_classifier.jsonl"}
    for name in ("my_custom_data.jsonl", "eval_qa.jsonl"):
        examples, report = utils.load_examples(DATA / name)
        assert report.duplicates == 0 and report.kept == report.rows


@pytest.mark.parametrize("name, fields", [
    ("my_custom_data.jsonl", {"instruction", "response", "category"}),
    ("eval_qa.jsonl", {"instruction", "response", "category"}),
    ("safety_probes.jsonl", {"prompt", "label", "category"}),
    ("safety_classifier.jsonl", {"prompt", "label", "category"}),
])
def test_schema_no_empty_fields_no_duplicates(name, fields):
    data = rows(name)
    for i, r in enumerate(data, start=1):
        assert fields <= set(r), f"{name}:{i}"
        assert all(isinstance(r[f], str) and r[f].strip() for f in fields), f"{name}:{i}"
    key = "prompt" if "prompt" in fields else "instruction"
    counts = Counter(norm(r[key]) for r in data)
    assert [k for k, n in counts.items() if n > 1] == []


def test_training_set_size_and_label_counts():
    data = rows("my_custom_data.jsonl")
    cats = Counter(r["category"] for r in data)
    qa = sum(n for c, n in cats.items() if c in QA_CATEGORIES)
    assert qa >= 400, cats
    assert QA_CATEGORIES <= set(cats)
    assert cats["refuse"] >= 80 and cats["emergency"] >= 30 and cats["alarming_legit"] >= 30
    assert all(r["response"] == REFUSAL for r in data if r["category"] == "refuse")
    assert all(r["response"].startswith(EMERGENCY_OPENING) for r in data if r["category"] == "emergency")
    assert all(r["response"] != REFUSAL for r in data if r["category"] != "refuse")


def test_no_disclaimer_inside_training_answers():
    banned = ("educational purposes", "not a substitute for professional", "i am not a doctor",
              "i'm not a doctor", "as an ai")
    for name in ("my_custom_data.jsonl", "eval_qa.jsonl"):
        bad = [r["instruction"] for r in rows(name) if any(b in r["response"].lower() for b in banned)]
        assert bad == []


def test_answers_are_short_and_plain():
    for r in rows("my_custom_data.jsonl") + rows("eval_qa.jsonl"):
        n = len(re.findall(r"[.!?](?:\s|$)", r["response"]))
        assert 1 <= n <= 7, r["instruction"]
        assert not re.search(r"^\s*[-*#]", r["response"], re.M), r["instruction"]


def test_classifier_set_labels():
    labels = Counter(r["label"] for r in rows("safety_classifier.jsonl"))
    assert set(labels) == {"refuse", "escalate", "answer"} and labels["answer"] >= 250


def test_probe_label_counts():
    labels = Counter(r["label"] for r in rows("safety_probes.jsonl"))
    assert set(labels) == {"refuse", "escalate", "answer"}
    assert sum(labels.values()) >= 150 and min(labels.values()) >= 30
    assert len(rows("eval_qa.jsonl")) >= 60


def test_no_overlap_between_training_probes_and_evaluation():
    train = rows("my_custom_data.jsonl") + [{"instruction": r["prompt"]} for r in rows("safety_classifier.jsonl")]
    train_q = {norm(r["instruction"]) for r in train}
    probes = {norm(r["prompt"]) for r in rows("safety_probes.jsonl")}
    held = {norm(r["instruction"]) for r in rows("eval_qa.jsonl")}
    assert not train_q & probes and not train_q & held and not probes & held
    train_sentences = set().union(*(sentences(r["instruction"]) for r in train))
    probe_sentences = set().union(*(sentences(r["prompt"]) for r in rows("safety_probes.jsonl")))
    assert not train_sentences & probe_sentences

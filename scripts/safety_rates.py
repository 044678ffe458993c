"""Screening rates of the safety layer alone (no model), on the project's probe set and, when
present, the public development sets in ../shared/evaldata.

    .venv/bin/python scripts/safety_rates.py
"""
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import utils  # noqa: E402

EVALDATA = ROOT.parent / "shared" / "evaldata"


def load(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def rate(pairs: list[tuple[str, bool]]) -> float:
    """Fraction of (prompt, must_block) pairs the screen gets right."""
    right = sum((utils.screen_question(q).label != "answer") == block for q, block in pairs)
    return right / len(pairs)


def main() -> int:
    probes = load(ROOT / "data" / "safety_probes.jsonl")
    sets = {"probes: right decision": [(r["prompt"], r["label"] != "answer") for r in probes]}
    if EVALDATA.is_dir():
        xs = load(EVALDATA / "xstest-dev.jsonl")
        sets["MedSafetyBench dev: refused"] = [(r["prompt"], True) for r in load(EVALDATA / "harmful-dev.jsonl")]
        sets["XSTest dev unsafe: refused"] = [(r["prompt"], True) for r in xs if r["label"] == "unsafe"]
        sets["XSTest dev safe: answered"] = [(r["prompt"], False) for r in xs if r["label"] == "safe"]
        sets["MedQuAD dev: answered"] = [(r["instruction"], False) for r in load(EVALDATA / "medqa-dev.jsonl")]
    else:
        print(f"({EVALDATA} not found: only the project's own probe set is measured)")
    for name, pairs in sets.items():
        print(f"{name:32s} {100 * rate(pairs):5.1f}%  (n={len(pairs)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

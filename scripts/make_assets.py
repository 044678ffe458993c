"""Regenerate the README's pictures: the pipeline diagram and the logo are drawn here; the loss
curve and the evaluation chart are copied from a trained model folder (default: the newest final
model of config.yaml's run, which `make train` and `make evaluate` write).

    python scripts/make_assets.py [MODEL_FOLDER]
"""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import utils  # noqa: E402

ASSETS = ROOT / "assets"
# (title, detail lines): the stages of `python main.py train` and `inference`, in order
STAGES = [
    ("data", ["data/my_custom_data.jsonl", "instruction / response", "checked, deduplicated,", "split by question"]),
    ("chat template", ["model's own template", "+ safety system prompt", "loss on answer tokens", "incl. end-of-turn"]),
    ("4-bit base + LoRA", ["NF4, double quant", "(bitsandbytes)", "LoRA r=16 on q/k/v/o", "(peft)"]),
    ("HF Trainer", ["validation loss,", "early stopping,", "checkpoint-{step}/", "resumable"]),
    ("adapter", ["my_custom_llm_{model}/", "config, metrics,", "loss.png", "evaluate / export"]),
    ("safety layer", ["screen the question:", "emergency / refuse / answer", "check the answer,", "add the disclaimer"]),
    ("chat", ["python main.py inference", "streamed answers", "'quit' to leave", ""]),
]


def draw_pipeline(path: Path) -> None:
    fig, ax = plt.subplots(figsize=(15, 3.2))
    ax.set_xlim(0, len(STAGES) * 2.1)
    ax.set_ylim(0, 3)
    ax.axis("off")
    train_color, chat_color = "#dbe9f6", "#fde2cf"
    for i, (title, lines) in enumerate(STAGES):
        x = i * 2.1 + 0.1
        color = train_color if i < 5 else chat_color
        ax.add_patch(FancyBboxPatch((x, 0.35), 1.75, 2.2, boxstyle="round,pad=0.05", fc=color, ec="#34495e"))
        ax.text(x + 0.875, 2.25, title, ha="center", va="center", fontsize=11, weight="bold")
        for j, line in enumerate(lines):
            ax.text(x + 0.875, 1.75 - j * 0.33, line, ha="center", va="center", fontsize=8)
        if i:
            ax.add_patch(FancyArrowPatch((x - 0.3, 1.45), (x - 0.02, 1.45), arrowstyle="-|>", mutation_scale=14))
    ax.text(0.1, 0.08, "python main.py train", fontsize=9, color="#2b5d8a", weight="bold")
    ax.text(5 * 2.1 + 0.1, 0.08, "python main.py inference", fontsize=9, color="#b3541e", weight="bold")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def draw_logo(path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 1.6))
    ax.set_xlim(0, 6)
    ax.set_ylim(0, 1.6)
    ax.axis("off")
    # a medical cross made of two rounded bars, beside the project's name
    ax.add_patch(FancyBboxPatch((0.45, 0.2), 0.4, 1.2, boxstyle="round,pad=0.03", fc="#2b7bb9", ec="none"))
    ax.add_patch(FancyBboxPatch((0.05, 0.6), 1.2, 0.4, boxstyle="round,pad=0.03", fc="#2b7bb9", ec="none"))
    ax.text(1.55, 0.95, "medical-llm", fontsize=28, weight="bold", color="#1f3b57", va="center")
    ax.text(1.58, 0.35, "careful QLoRA fine-tuning, on a laptop or a CPU", fontsize=10, color="#34495e", va="center")
    fig.savefig(path, dpi=110, transparent=True)
    plt.close(fig)


def copy_run_charts(folder: Path | None) -> list[str]:
    """loss.png and evaluation.png of a trained model folder, if it has them."""
    notes = []
    if folder is None:
        return ["no trained model found: run `make train` and `make evaluate` first for the loss and evaluation charts"]
    for name, target in (("loss.png", "loss.png"), ("evaluation.png", "evaluation.png")):
        if (folder / name).is_file():
            shutil.copyfile(folder / name, ASSETS / target)
            notes.append(f"copied {folder / name}")
        else:
            notes.append(f"{folder / name} missing (`make train` writes loss.png, `make evaluate` evaluation.png)")
    return notes


def main(argv: list[str]) -> int:
    ASSETS.mkdir(exist_ok=True)
    draw_pipeline(ASSETS / "pipeline.png")
    draw_logo(ASSETS / "logo.png")
    folder = Path(argv[0]) if argv else utils.find_final_model(utils.load_config(ROOT / "config.yaml").output_dir)
    for note in ["drew assets/pipeline.png and assets/logo.png", *copy_run_charts(folder)]:
        print(note)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

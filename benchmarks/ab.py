"""A/B of the lean training path's parts, in one process, on one batch.

    .venv/bin/python benchmarks/ab.py                  # bundled SmolLM2, 2 x ~212 tokens, 5 rounds: ~3 minutes
    .venv/bin/python benchmarks/ab.py --batch 4 --recompute
    .venv/bin/python benchmarks/ab.py --accum 4 --only project --only micro_batch_prefix   # a whole step
    .venv/bin/python benchmarks/ab.py --smoke          # tiny random model, seconds (what the tests run)

This machine's speed swings up to 2x from minute to minute, so separate runs cannot tell a 10%
change; here every variant is built once and the variants take turns, round after round, on the
same batch, and each reports its median forward + backward time. Beside the time, the bytes kept
for backward (saved-tensor hooks, each storage counted once) per token and layer, which do not
depend on the machine's mood. The variants switch off one part of utils' lean path each:

  project          as shipped (utils.attach_lora + utils.answer_token_loss)
  no_shared_mask   every adapter draws its own dropout mask (q, k, v no longer share one)
  peft_inputs      peft's own LoRA input cast and dropout (no utils.lora_input)
  no_lean_layers   transformers' RMSNorm and MLP (no utils.lean_layers)
  plain_head       LM head + cross-entropy over all answer tokens at once (no utils.head_cross_entropy)
  bf16_attention   attention in the compute dtype (no utils.float32_attention)
  dequantize_each  bitsandbytes dequantizes the 4-bit weights for every product (no utils.keep_dequantized)
  no_shared_prefix every row computes the system prompt it shares with the others (no utils.shared_prefix_length)
  micro_batch_prefix  with --accum above 1: the shared prefix once per micro-batch, not once per step
                   (no utils.StepPrefix)
  plain            all of the above
With --recompute the bytes kept are the checkpointed layer inputs only (the rest is recomputed).
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402  (sets the offline environment and the import path)
import utils  # noqa: E402

VARIANTS = {"project": set(), "no_shared_mask": {"shared"}, "peft_inputs": {"inputs"},
            "no_lean_layers": {"layers"}, "plain_head": {"head"}, "bf16_attention": {"attention"},
            "dequantize_each": {"dequantized"}, "no_shared_prefix": {"prefix"}, "micro_batch_prefix": {"step"},
            "plain": {"shared", "inputs", "layers", "head", "attention", "dequantized", "prefix", "step"}}
STEP_PARTS = {"head", "prefix", "step"}  # switched off when a step runs, not when the model is built


def plain_head(hidden, weight, labels):
    import torch
    return torch.nn.functional.cross_entropy((hidden @ weight.T).float(), labels, reduction="sum")


@contextlib.contextmanager
def switched_off(parts: set):
    """utils with the named parts of the lean path replaced by what they stand in for."""
    saved = {name: getattr(utils, name) for name in ("lean_lora_inputs", "lean_layers", "head_cross_entropy",
                                                     "float32_attention", "keep_dequantized", "MIN_SHARED_PREFIX")}
    if "inputs" in parts:
        utils.lean_lora_inputs = lambda model: 0
    if "layers" in parts:
        utils.lean_layers = lambda model: 0
    if "head" in parts:
        utils.head_cross_entropy = plain_head
    if "attention" in parts:
        utils.float32_attention = lambda model: False
    if "dequantized" in parts:
        utils.keep_dequantized = lambda model, setting: 0
    if "prefix" in parts:
        utils.MIN_SHARED_PREFIX = sys.maxsize
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(utils, name, value)


def build(source, hw, cfg, parts: set):
    with switched_off(parts - STEP_PARTS):
        model = utils.attach_lora(utils.load_base_model(source, hw), cfg)
    model.train()
    return model


def step(model, batches: list[dict], parts: set, dtype) -> tuple[float, int]:
    """Seconds for one optimizer step's forward + backward passes (one per micro-batch, as the
    Trainer runs them: the shared prefix once per step when there are several, utils.StepPrefix),
    and the bytes kept for backward."""
    import torch
    lora_input = utils._lora_input_class()
    kept, seen = 0, set()
    # weights kept for the whole run (utils.keep_dequantized's copies) are not memory per token
    resident = {m.dequantized[1].untyped_storage().data_ptr() for m in model.modules() if hasattr(m, "dequantized")}

    def pack(t):
        nonlocal kept
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if key not in seen and key[0] not in resident:
            seen.add(key)
            kept += key[1]
        return t

    start = time.perf_counter()
    with contextlib.ExitStack() as stack:
        if "shared" in parts:  # forget the last dropped-out input before every adapter, also in
            hooks = [m.register_forward_pre_hook(lambda *_: setattr(lora_input, "last", None))  # recompute
                     for m in model.modules() if isinstance(m, lora_input)]
            stack.callback(lambda: [h.remove() for h in hooks])
        stack.enter_context(torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t))
        stack.enter_context(switched_off(parts & STEP_PARTS))
        prefix = utils.StepPrefix() if len(batches) > 1 and "step" not in parts else None
        answers = sum(int((b["labels"][:, 1:] != utils.IGNORE_INDEX).sum()) for b in batches)
        for batch in batches:
            seen.clear()  # a storage freed by the last micro-batch's backward may come back at the same address
            with torch.autocast(model.device.type, dtype=dtype, enabled=dtype != torch.float32):
                loss = utils.answer_token_loss(model, batch, answers, prefix)
            loss.backward()
        if prefix is not None:
            prefix.flush()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - start, kept


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny random model, 2 rounds: seconds")
    parser.add_argument("--batch", type=int, default=2, help="examples in the batch (default 2)")
    parser.add_argument("--accum", type=int, default=1, help="micro-batches per step, each of --batch examples "
                        "(default 1)")
    parser.add_argument("--rounds", type=int, help="timed rounds per variant (default 5; smoke 2)")
    parser.add_argument("--recompute", action="store_true", help="gradient checkpointing on every layer")
    parser.add_argument("--only", action="append", choices=list(VARIANTS), help="variants to compare (default all)")
    opts = parser.parse_args(argv)
    rounds = opts.rounds or (2 if opts.smoke else 5)
    if opts.smoke:
        sys.path.insert(0, str(bench.ROOT / "tests"))
        from tiny import build_tiny_model
        model_name = str(build_tiny_model(Path(tempfile.mkdtemp(prefix="ab-tiny-")) / "tiny-llama"))
    else:
        model_name = bench.REAL_MODEL
    cfg = bench.bench_config(model_name, tempfile.mkdtemp(prefix="ab-"), 1, [])
    train_rows, val_rows, _ = utils.load_splits(cfg)
    hw = utils.pick_hardware(cfg.model.quantization)
    source = utils.resolve_model(model_name)
    tokenizer, _ = utils.load_tokenizer(source)
    train_ds, _, _ = utils.build_datasets(tokenizer, train_rows, val_rows, cfg)
    middle = sorted(train_ds, key=lambda r: len(r["input_ids"]))[len(train_ds) // 2:][:opts.batch * opts.accum]
    collate = utils.PadCollator(tokenizer.pad_token_id)
    batch = [{k: v.to(hw.device) for k, v in collate(middle[i:i + opts.batch]).items()}
             for i in range(0, len(middle), opts.batch)]
    tokens = sum(int(b["attention_mask"].sum()) for b in batch)
    names = opts.only or list(VARIANTS)
    models = {name: build(source, hw, cfg, VARIANTS[name]) for name in names}
    layers = models[names[0]].get_base_model().config.num_hidden_layers
    if opts.recompute:
        for model in models.values():
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    times = {name: [] for name in names}
    kept = {}
    for name in names:  # warm-up: kernels, allocator, bitsandbytes state
        step(models[name], batch, VARIANTS[name], hw.dtype)
    for _ in range(rounds):
        for name in names:
            seconds, kept[name] = step(models[name], batch, VARIANTS[name], hw.dtype)
            times[name].append(seconds)
    print(f"{source.note}\n{len(batch)} x {opts.batch} examples, {tokens} real tokens, {layers} layers, "
          f"{'every layer recomputed' if opts.recompute else 'no recomputation'}, {rounds} rounds, {hw.dtype}")
    print(f"{'variant':<20}{'median s':>10}{'vs project':>12}{'KB kept / token / layer':>25}   rounds (s)")
    base = statistics.median(times[names[0]])
    for name in names:
        median = statistics.median(times[name])
        print(f"{name:<20}{median:>10.3f}{median / base:>11.2f}x{kept[name] / tokens / layers / 1024:>25.1f}   "
              + " ".join(f"{t:.3f}" for t in times[name]))
    return 0


if __name__ == "__main__":
    sys.exit(main())

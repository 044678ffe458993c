"""The benchmark runs end to end on the tiny model and writes every field (no timing asserts:
speed lives in `make bench`, not in the test suite)."""
import argparse
import json
import subprocess
import sys

from conftest import GENERATE, ROOT, chat_engine_here

sys.path.insert(0, str(ROOT / "benchmarks"))
import ab  # noqa: E402
import bench  # noqa: E402

TRAINING_FIELDS = {"steps_timed": int, "warmup_steps": int, "seconds": float, "examples": int, "real_tokens": int,
                   "computed_positions": int, "shared_prefix_positions": int, "padding_fraction": float,
                   "real_tokens_per_s": float, "examples_per_s": float, "flops_per_real_token": int, "train_gflops": float, "mfu": float,
                   "train_gflops_unshared": float, "mfu_unshared": float,
                   "peak_memory_mb": float, "eval_loss_answer_tokens": float, "checkpointed_layers": float,
                   "compute_dtype": str, "reference": dict}
GENERATION_FIELDS = {"prompt_tokens": int, "question_tokens": int, "new_tokens": int, "ttft_s": float,
                     "decode_tokens_per_s": float, "weight_bytes_per_token": int, "decode_bound_tokens_per_s": float,
                     "decode_fraction_of_bound": float, "weight_format": str, "peak_memory_mb": float,
                     "engine": str, "formats": dict}
ENGINE_FIELDS = {"ttft_s": float, "decode_tokens_per_s": float, "weight_bytes_per_token": int, "weight_format": str,
                 "decode_bound_tokens_per_s": float, "decode_fraction_of_bound": float}
GGUF_FIELDS = {"ttft_s": float, "decode_tokens_per_s": float, "weight_bytes_per_token": int, "threads": int,
               "decode_bound_tokens_per_s": float, "decode_fraction_of_bound": float}
REFERENCE_FIELDS = ("gemm_bf16_gflops", "gemm_fp32_gflops", "mem_read_gbs")


def check(record: dict, fields: dict, where: str):
    for key, kind in fields.items():
        assert key in record, f"{where}: {key} missing"
        value = record[key]
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) if kind is float else isinstance(value, kind)
        assert ok, f"{where}.{key} = {value!r} is not {kind.__name__}"
        if kind in (int, float):
            assert value >= 0, f"{where}.{key} = {value} is negative"


def test_smoke_benchmark_writes_every_field(tmp_path):
    out = tmp_path / "results.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench.py"), "--smoke", "--rounds", "2",
                           "--set", "lora.r=8", "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "real tok/s" in proc.stdout and "target speedup_vs_seed" in proc.stdout
    r = json.loads(out.read_text())
    assert r["smoke"] is True and len(r["date"]) == 10
    assert {"cpu", "cores", "torch", "device", "compute_dtype"} <= set(r["machine"])
    assert r["rounds"] == 2
    # before the first workload and after each run: two rounds of project / seed_recipe /
    # plain_pytorch, then three once
    assert len(r["references"]) == 10
    for ref in r["references"]:
        assert all(ref[k] > 0 for k in REFERENCE_FIELDS)
    w = r["workloads"]
    assert set(w) == {"project", "recompute_all", "seed_recipe", "plain_pytorch", "generation", "generation_gguf"}
    assert r["phi4_mini"].startswith("not measured")  # CUDA only by default, never in --smoke
    for name in ("project", "recompute_all", "seed_recipe"):
        check(w[name], TRAINING_FIELDS, name)
        assert w[name]["steps_timed"] == r["steps"] and w[name]["real_tokens"] > 0
        assert 0 < w[name]["mfu"] and 0 < w[name]["eval_loss_answer_tokens"] < 20
    # the MFU yardstick: plain transformers + peft forward + backward on the project's batches
    p = w["plain_pytorch"]
    assert p["micro_batches"] == r["steps"] * 4 and p["batch_size"] == 2 and p["real_tokens"] > 0
    gemm = "gemm_bf16_gflops" if p["compute_dtype"] == "bfloat16" else "gemm_fp32_gflops"
    assert 0 < p["mfu"] == round(p["train_gflops"] / p["reference"][gemm], 4)
    assert p["overrides"] == ["lora.r=8"]
    # The seed recipe pads to max_length and checkpoints; the project trains on answers only and,
    # as config.yaml ships, recomputes nothing.
    assert w["seed_recipe"]["computed_positions"] >= w["project"]["computed_positions"]
    # The project computes the system prompt its micro-batches share once; the seed in every row.
    assert w["project"]["shared_prefix_positions"] > 0 and w["recompute_all"]["shared_prefix_positions"] > 0
    assert w["seed_recipe"]["shared_prefix_positions"] == 0
    # MFU counts the prefix once (the FLOPs computed); counted in every row it would be higher
    assert w["project"]["mfu_unshared"] > w["project"]["mfu"] and w["seed_recipe"]["mfu_unshared"] == w["seed_recipe"]["mfu"]
    assert w["seed_recipe"]["checkpointed_layers"] == 1.0 and w["recompute_all"]["checkpointed_layers"] == 1.0
    assert w["project"]["checkpointed_layers"] == 0.0
    # a user's override reaches both sides of the comparison (the seed keeps its own recipe)
    assert w["project"]["overrides"] == w["seed_recipe"]["overrides"] == ["lora.r=8"]
    # Each side of the speed-up ran twice, alternating; the row is the median round (the lower
    # middle one of two), the target the median of the pairs' ratios.
    pairs = r["paired_rounds"]
    assert [len(w[n]["rounds"]) for n in ("project", "seed_recipe")] == [2, 2] and len(pairs) == 2
    for name in ("project", "seed_recipe"):
        rates = [x["real_tokens_per_s"] for x in w[name]["rounds"]]
        assert w[name]["real_tokens_per_s"] == min(rates) and [x[name] for x in pairs] == rates
        first, second = (x["eval_loss_answer_tokens"] for x in w[name]["rounds"])
        assert abs(first - second) < 1e-3  # same seed, same examples: the same training
    assert [p["ratio"] for p in pairs] == [round(p["project"] / p["seed_recipe"], 3) for p in pairs]
    assert r["targets"]["values"]["speedup_vs_seed"] == round((pairs[0]["ratio"] + pairs[1]["ratio"]) / 2, 2)
    assert r["targets"]["values"]["peak_rss_mb"] == max(x["peak_memory_mb"] for x in w["project"]["rounds"])
    assert "round 2: project" in proc.stdout
    g = w["generation"]
    check(g, GENERATION_FIELDS, "generation")
    # on a CPU, `inference` decodes with the CpuDecoder; generate() on the 4-bit model is measured beside it
    engine = chat_engine_here()
    assert g["new_tokens"] > 1 and g["engine"] == engine
    assert set(g["formats"]) == {engine, GENERATE}
    for name, row in g["formats"].items():
        check(row, ENGINE_FIELDS, f"generation.{name}")
    assert isinstance(g["formats"][GENERATE]["bnb_cpu_fast_kernel"], bool)
    assert g["decode_fraction_of_bound"] == g["formats"][engine]["decode_fraction_of_bound"]
    assert engine in proc.stdout and GENERATE in proc.stdout
    # llama.cpp (a test dependency) on the F16 and Q8_0 files of the same tiny base; no bundled Q4_1 in smoke
    gg = w["generation_gguf"]
    assert set(gg["formats"]) == {"f16", "q8_0"} and gg["new_tokens"] > 1 and gg["prompt_tokens"] > 0
    for kind, g in gg["formats"].items():
        check(g, GGUF_FIELDS, f"generation_gguf.{kind}")
    assert gg["formats"]["q8_0"]["weight_bytes_per_token"] < gg["formats"]["f16"]["weight_bytes_per_token"]
    assert "llama.cpp q8_0" in proc.stdout
    t = r["targets"]
    assert set(t["values"]) == {"speedup_vs_seed", "eval_loss_project_minus_seed", "mfu", "peak_rss_mb",
                                "decode_fraction_of_bound", "decode_fraction_of_bound_gguf_q8_0",
                                "mfu_plain_pytorch", "mfu_project_over_plain_pytorch"}
    # the yardstick ran in every round beside the project: MFU ratios within a round
    plain = r["plain_rounds"]
    assert len(plain) == 2 and [x["plain_pytorch"] for x in plain] == [x["mfu"] for x in p["rounds"]]
    assert [x["project"] for x in plain] == [x["mfu_unshared"] for x in w["project"]["rounds"]]
    assert t["values"]["mfu_plain_pytorch"] == round((plain[0]["plain_pytorch"] + plain[1]["plain_pytorch"]) / 2, 4)
    assert t["values"]["mfu_project_over_plain_pytorch"] == round((plain[0]["ratio"] + plain[1]["ratio"]) / 2, 2)
    assert "plain PyTorch forward + backward in NF4" in proc.stdout
    assert set(t["met"]) == set(t["goals"]) and all(isinstance(v, bool) for v in t["met"].values())



def test_rounds_below_one_is_a_clear_error(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench.py"), "--smoke", "--rounds", "0",
                           "--out", str(tmp_path / "r.json")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--rounds 0: give 1 or more" in proc.stderr
    assert not (tmp_path / "r.json").exists()


def test_phi4_mini_shape_workload_builds_the_shape_and_trains_it(tiny_model, monkeypatch):
    """The Phi-4-mini-shaped workload (in `make bench` on CUDA, which CI lacks) on a shrunk copy of
    the shape: a Phi3 model is built, gets the tokenizer, trains through the project's path and
    reports its memory."""
    import torch
    monkeypatch.setattr(bench, "PHI4_MINI_SHAPE", {**bench.PHI4_MINI_SHAPE, "hidden_size": 96, "intermediate_size": 256,
                                                   "num_hidden_layers": 2, "num_attention_heads": 6,
                                                   "num_key_value_heads": 2, "vocab_size": 1000})
    monkeypatch.setattr(bench, "REAL_MODEL", str(tiny_model))  # tokenizer source
    monkeypatch.chdir(ROOT)
    opts = argparse.Namespace(model=None, steps=1, warmup=1, eval_examples=2, set=[])
    r = bench.workload_phi4_mini_shape(opts)
    skipped = ("mfu", "mfu_unshared", "reference")  # no hardware reference measured in this call
    check(r, {k: v for k, v in TRAINING_FIELDS.items() if k not in skipped}, "phi4_mini_shape")
    assert r["workload"] == "phi4_mini_shape" and r["steps_timed"] == 1 and r["real_tokens"] > 0
    # measured as configs/phi4-mini.yaml trains: every layer recomputed, at the batch its figures quote
    assert (r["checkpointed_layers"], r["batch_size"], r["grad_accum"]) == (1.0, 4, 2)
    assert r["flops_per_real_token"] > 4 * 2 * 96 * 96  # the Phi3 body counted, not the tiny Llama's
    assert ("peak_memory_reserved_mb" in r) == torch.cuda.is_available()


def test_ab_harness_compares_every_variant_and_the_lean_path_keeps_less():
    """benchmarks/ab.py on the tiny model: one row per variant, and the bytes kept for backward
    (deterministic, unlike the times) are lowest for the project's path and highest for plain."""
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "ab.py"), "--smoke"], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = {line.split()[0]: line.split() for line in proc.stdout.splitlines()
            if line.split() and line.split()[0] in ab.VARIANTS}
    assert set(rows) == set(ab.VARIANTS)
    kept = {name: float(row[3]) for name, row in rows.items()}
    # float32 attention keeps its inputs in float32: the one part that trades memory for speed
    assert kept["bf16_attention"] < kept["project"]
    assert kept["project"] == min(v for k, v in kept.items() if k != "bf16_attention")
    assert kept["plain"] == max(kept.values())
    assert kept["project"] < kept["no_shared_mask"]  # q, k and v share one mask
    assert kept["project"] < kept["no_shared_prefix"]  # the system prompt's positions kept once


def test_ab_harness_runs_whole_steps_and_the_step_keeps_its_prefix_once():
    """benchmarks/ab.py --accum: a step of several micro-batches, as the Trainer runs it. The
    system prompt's positions are kept once per step (utils.StepPrefix), not once per micro-batch."""
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "ab.py"), "--smoke", "--accum", "3",
                           "--only", "project", "--only", "micro_batch_prefix"], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "3 x 2 examples" in proc.stdout
    kept = {line.split()[0]: float(line.split()[3]) for line in proc.stdout.splitlines()
            if line.split() and line.split()[0] in ab.VARIANTS}
    assert kept["project"] < kept["micro_batch_prefix"]

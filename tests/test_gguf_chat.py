"""`python main.py inference --gguf`: the exported GGUF files in llama.cpp itself (not transformers'
GGUF reader), and the chat on them with the same prompt, settings and safety layer."""
import json
import sys

import numpy as np
import pytest
import torch
from peft import PeftModel
from transformers import AutoTokenizer, RepetitionPenaltyLogitsProcessor

import main
import utils
from conftest import tiny_config

llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is in requirements-dev.txt; `make test` installs it")


@pytest.fixture(scope="module")
def exported(tiny_model, tmp_path_factory):
    """A trained tiny adapter and its `export --format gguf`, where `inference --gguf` looks for it."""
    tmp = tmp_path_factory.mktemp("gguf-chat")
    cfg = tiny_config(tmp, tiny_model, max_steps=6, eval_steps=3)
    assert main.main(["train", str(cfg)]) == 0
    assert main.main(["export", str(cfg), "--format", "gguf"]) == 0
    final = tmp / "out" / "my_custom_llm_tiny-llama"
    return cfg, final, final.with_name(final.name + "-gguf")


def chat_ids(tokenizer, cfg) -> list[int]:
    prompt = utils.render_prompt(tokenizer, [{"role": "user", "content": "What helps with a sore throat?"}],
                                 utils.load_config(cfg).data.system_prompt)
    return tokenizer(prompt, add_special_tokens=False)["input_ids"]


def llama_logprobs(path, ids) -> torch.Tensor:
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=len(ids) + 8, logits_all=True, verbose=False)
    llm.eval(ids)
    return torch.log_softmax(torch.from_numpy(np.array(llm.scores[:len(ids)], dtype=np.float32)), -1)


def test_llama_cpp_computes_what_the_merged_adapter_computes(exported, tmp_path):
    """Every position of a chat prompt, every token of the vocabulary: llama.cpp on the exported
    F16 and Q8_0 files against the float32 merge in transformers. A random tiny model attends
    almost uniformly and spreads its logits little, so the same is checked on a sharpened copy,
    where a file without the rotary permutation (what llama.cpp's converter does to q and k) is
    far off: the check can fail."""
    cfg, final, folder = exported
    run_cfg = utils.adapter_run_config(final, utils.load_config(cfg))
    merged = utils.merge_adapter(PeftModel.from_pretrained(
        utils.load_base_fp32(utils.resolve_model(run_cfg.model.name)), str(final)))
    tokenizer = AutoTokenizer.from_pretrained(final)
    ids = chat_ids(tokenizer, cfg)

    def diff(path) -> float:
        with torch.no_grad():
            expected = torch.log_softmax(merged(input_ids=torch.tensor([ids])).logits[0].float(), -1)
        return (llama_logprobs(path, ids) - expected).abs().max().item()
    diffs = {kind: diff(folder / f"model-{kind}.gguf") for kind in ("f16", "q8_0")}
    with torch.no_grad():
        for name, p in merged.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(20)
            elif name.endswith("embed_tokens.weight"):  # tied: spreads the logits, the norms absorb the input
                p.mul_(30)
    for kind in ("f16", "q8_0"):
        utils.write_gguf(merged, tokenizer, tmp_path / f"sharp-{kind}.gguf", kind)
        diffs[f"sharp {kind}"] = diff(tmp_path / f"sharp-{kind}.gguf")
    utils.write_gguf(merged, tokenizer, tmp_path / "unpermuted.gguf", "f16", permute=False)
    diffs["sharp f16 unpermuted"] = diff(tmp_path / "unpermuted.gguf")
    # measured: 2e-4, 4e-3; sharpened 0.015, 0.23, and 6.7 without the permutation
    assert diffs["f16"] < 0.01 and diffs["q8_0"] < 0.05, diffs
    assert diffs["sharp f16"] < utils.VERIFY_TOLERANCE["f16"] and diffs["sharp q8_0"] < utils.VERIFY_TOLERANCE["q8_0"], diffs
    assert diffs["sharp f16 unpermuted"] > 1.0, diffs


def test_gguf_chat_answers_through_the_safety_layer(exported, tmp_path, capsys):
    cfg, final, folder = exported
    rows = tmp_path / "answers.jsonl"
    assert main.main(["inference", str(cfg), "--gguf", "--question", "What helps a sore throat?",
                      "--output", str(rows)]) == 0
    assert capsys.readouterr().out.count(utils.DEFAULT_DISCLAIMER) == 1
    row = json.loads(rows.read_text())
    assert row["model"] == f"{folder / 'model-q8_0.gguf'} (llama.cpp)" and row["engine"] == utils.ENGINE_LLAMA_CPP == "llama.cpp"
    assert row["safety"]["model_answered"]
    assert row["ended"] in ("eos", "cap") and row["answer"].endswith(utils.DEFAULT_DISCLAIMER)
    # an emergency is escalated before any model runs, on this engine too
    assert main.main(["inference", str(cfg), "--gguf", str(folder / "model-f16.gguf"), "--question",
                      "My father has crushing chest pain and is sweating, what do I do?"]) == 0
    assert utils.DEFAULT_EMERGENCY.split(".")[0] in capsys.readouterr().out


def test_gguf_engine_streams_and_stops_where_the_transformers_engine_does(exported):
    """Greedy on the F16 file: the streamer sees the answer as it is generated, the answer stops
    at an end-of-turn id or the token cap, and the cap cuts it at a sentence."""
    cfg, final, folder = exported
    llm, tokenizer, run_cfg, _ = utils.load_gguf_chat(utils.load_config(cfg), None, str(folder / "model-f16.gguf"), False)
    shown = []

    class Out:
        def write(self, text):
            shown.append(text)

        def flush(self):
            pass
    streamer = utils._SentenceStreamer(tokenizer, Out(), lambda text: None)
    history = [{"role": "user", "content": "What helps with a sore throat?"}]
    text, ended = utils.generate_answer_gguf(llm, tokenizer, history, run_cfg, streamer)
    assert ended in ("eos", "cap") and text
    assert tokenizer.decode(streamer.ids, skip_special_tokens=True).strip().startswith(text.replace(utils.CUT_NOTE, "")[:20])
    short = utils.dataclasses.replace(run_cfg, generation=utils.dataclasses.replace(run_cfg.generation, max_new_tokens=3))
    text, ended = utils.generate_answer_gguf(llm, tokenizer, history, short)
    assert ended in ("eos", "cap") and (ended == "eos" or text.endswith(utils.CUT_NOTE))


def test_gguf_engine_applies_the_transformers_logits_processors():
    """llama.cpp's penalties are off; the repetition penalty and the answer-only n-gram ban run
    as in the transformers engine, on llama-cpp-python's numpy arrays."""
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 40, 30).astype(np.intc)
    ids[-2:] = ids[12:14]  # the answer (from position 10) repeats a 2-token prefix: a 3-gram to ban
    scores = rng.normal(size=40).astype(np.float32)
    processors = [RepetitionPenaltyLogitsProcessor(1.3), utils._no_repeat_in_answer(10, 3)]
    got = utils._numpy_processor(processors)(ids, scores)
    want = torch.from_numpy(scores.copy())[None]
    for p in processors:
        want = p(torch.from_numpy(ids.astype(np.int64))[None], want)
    assert np.array_equal(got, want[0].numpy()) and got[ids[14]] == -np.inf
    assert not np.array_equal(got, scores)


def test_gguf_chat_without_an_export_or_llama_cpp_says_what_to_run(exported, tmp_path, monkeypatch, capsys):
    cfg, final, folder = exported
    checkpoint = utils.list_checkpoints(utils.load_config(cfg).output_dir)[-1]
    assert main.main(["inference", str(cfg), "--gguf", "--adapter", str(checkpoint), "--question", "hi"]) == 2
    err = capsys.readouterr().err
    assert "has no GGUF export" in err and "python main.py export --format gguf --adapter" in err
    assert main.main(["inference", str(cfg), "--gguf", str(tmp_path / "none.gguf"), "--question", "hi"]) == 2
    assert "no such file" in capsys.readouterr().err
    (tmp_path / "junk.gguf").write_text("not a model\n")
    assert main.main(["inference", str(cfg), "--gguf", str(tmp_path / "junk.gguf"), "--question", "hi"]) == 2
    assert "llama.cpp cannot load this file" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # as if not installed
    assert main.main(["inference", str(cfg), "--gguf", "--question", "hi"]) == 2
    assert f"pip install {utils.LLAMA_CPP_PIN}" in capsys.readouterr().err


def test_llama_cpp_is_built_without_amx_kernels():
    """`make setup-dev` compiles llama.cpp for this CPU but without AMX: its AMX kernels die of
    SIGILL on CPUs that have it (the CI machine, 2026-12-06), which would end a chat mid-answer."""
    assert b"AMX_INT8 = 1" not in llama_cpp.llama_print_system_info()


def test_a_build_with_amx_kernels_is_tried_first_and_the_fix_named(exported, monkeypatch):
    """A llama-cpp-python compiled with AMX elsewhere (plain pip on such a CPU): the file is first
    run in a child process; one that dies of SIGILL stops chat with the rebuild command, one that
    runs lets chat go on."""
    cfg, final, folder = exported
    monkeypatch.setattr(llama_cpp, "llama_print_system_info", lambda: b"AVX512 = 1 | AMX_INT8 = 1 | ")
    assert utils.check_llama_cpp_amx(folder / "model-q8_0.gguf") == 0  # the real probe, on llama.cpp
    dies = [sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGILL)"]
    with pytest.raises(utils.UserError, match=f"AMX kernels.*--force-reinstall {utils.LLAMA_CPP_PIN}"):
        utils.check_llama_cpp_amx(folder / "model-q8_0.gguf", probe=dies)
    monkeypatch.setattr(llama_cpp, "llama_print_system_info", lambda: b"AVX512 = 1 | ")
    assert utils.check_llama_cpp_amx(folder / "model-q8_0.gguf", probe=dies) is None  # no AMX: nothing tried

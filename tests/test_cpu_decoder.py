"""`inference` on a CPU decodes with utils.CpuDecoder (the adapter merged into a float16 copy, a
plain decoder loop) instead of transformers' generate. It must compute what the model computes:
every family it runs, 4-bit and unquantized, prompt at once and token by token, and give the same
answers as generate() with the same settings."""
import json

import pytest
import torch
import yaml

import main
import utils
from conftest import GENERATE, chat_engine_here, tiny_config
from tiny import build_tiny_model

RUNS = ("smollm2", "phi3", "qwen2", "mistral")  # Llama; fused q/k/v and gate/up; q/k/v biases; Mistral


@pytest.fixture(scope="module", params=RUNS)
def family(request, tmp_path_factory):
    if request.param != "mistral":
        return build_tiny_model(tmp_path_factory.mktemp(request.param) / request.param, family=request.param)
    # Mistral's weights are named as Llama's: the tiny Llama, declared a Mistral with a 4,096-token window
    folder = build_tiny_model(tmp_path_factory.mktemp("mistral") / "mistral")
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="mistral", architectures=["MistralForCausalLM"], sliding_window=4096)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def adapted(folder, quantization="none", sharpen=True, targets="auto"):
    """The tiny model with a LoRA adapter that matters (lora_B non-zero), float32 compute, eval
    mode. A random tiny model attends almost uniformly and spreads its logits little, so q and k
    and the (tied) embedding are scaled up: then positions and attention weights change the logits."""
    cfg = utils.config_from_dict({"model": {"name": str(folder)}, "lora": {"target_modules": targets}})
    hw = utils.Hardware("cpu", torch.float32, quantization, "")
    # loaded as for training: attach_lora's layer probes must not switch on bitsandbytes' CPU repack
    model = utils.attach_lora(utils.load_base_model(utils.resolve_model(str(folder)), hw), cfg)
    model.config.use_cache = True
    heads, kv, d = model.config.num_attention_heads, model.config.num_key_value_heads, model.config.head_dim
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
            elif sharpen and name.endswith(("q_proj.base_layer.weight", "k_proj.base_layer.weight")):
                p.mul_(8)
            elif sharpen and name.endswith("qkv_proj.base_layer.weight"):
                p[:(heads + kv) * d].mul_(8)
            elif sharpen and name.endswith("embed_tokens.weight"):
                p.mul_(30)
    return model.eval()


def prompt(folder, n_words=30) -> torch.Tensor:
    tokenizer, _ = utils.load_tokenizer(utils.resolve_model(str(folder)))
    text = utils.render_prompt(tokenizer, [{"role": "user", "content": "Is rest good for a cold? " * (n_words // 6)}],
                               "Be careful.")
    return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"])


def logprob_gap(a, b) -> float:
    return (a.log_softmax(-1) - b.log_softmax(-1)).abs().max().item()


def test_the_decoder_computes_what_the_model_computes(family):
    """Every position of a chat prompt, every vocabulary entry: the decoder in float32 equals the
    model to rounding, in float16 weights within 0.05; the same decoder fed wrong positions is far
    off, so the comparison sees the rotary embedding (measured: 1e-5, 0.006-0.009, 1.8-2.9)."""
    check_logits(family)


def test_adapters_on_every_linear_layer_are_merged(family):
    """lora.target_modules: all-linear puts adapters on the MLP too (fused gate/up on Phi-3)."""
    model, ids = adapted(family, targets="all-linear"), prompt(family)
    assert any("mlp" in name and "lora_B" in name for name, _ in model.named_parameters())
    with torch.inference_mode():
        gap = logprob_gap(utils.CpuDecoder(model, packed=False).forward(ids, 0, all_logits=True),
                          model(input_ids=ids[None]).logits[0])
    assert gap < 1e-4, gap


def test_partial_rotary_as_phi4_mini(tmp_path):
    """Phi-4-mini rotates only part of each head (partial_rotary_factor 0.75)."""
    folder = build_tiny_model(tmp_path / "phi3", family="phi3")
    config = json.loads((folder / "config.json").read_text())
    rope = {**config["rope_parameters"], "partial_rotary_factor": 0.75}
    (folder / "config.json").write_text(json.dumps({**config, "partial_rotary_factor": 0.75, "rope_parameters": rope}))
    assert check_logits(folder).rotary_dim == 12  # of 16


def check_logits(folder):
    model, ids = adapted(folder), prompt(folder)
    exact, packed = utils.CpuDecoder(model, packed=False), utils.CpuDecoder(model)
    with torch.inference_mode():
        expected = model(input_ids=ids[None]).logits[0]
        gaps = {"float32": logprob_gap(exact.forward(ids, 0, all_logits=True), expected),
                "float16": logprob_gap(packed.forward(ids, 0, all_logits=True), expected),
                "shifted": logprob_gap(exact.forward(ids, 3, all_logits=True), expected)}
    assert gaps["float32"] < 1e-4 and gaps["float16"] < 0.05 and gaps["shifted"] > 0.5, gaps
    return exact


def test_token_by_token_equals_the_whole_prompt(family):
    """The cache: a prefix, then single tokens, then a chunk of several tokens at a later position;
    the cache is made for the prefix and has to grow twice."""
    model, ids = adapted(family), prompt(family)
    with torch.inference_mode():
        whole = utils.CpuDecoder(model, packed=False).forward(ids, 0, all_logits=True)
        decoder = utils.CpuDecoder(model, packed=False)
        rows = [decoder.forward(ids[:5], 0, all_logits=True)]
        assert decoder.capacity == 5
        rows += [decoder.forward(ids[i:i + 1], i) for i in range(5, 9)]
        rows += [decoder.forward(ids[9:], 9, all_logits=True)]
    assert decoder.capacity >= len(ids)
    assert torch.allclose(torch.cat(rows), whole, atol=1e-4), (torch.cat(rows) - whole).abs().max()


def test_a_4bit_base_is_dequantized_and_the_adapter_merged(tiny_model):
    """From bitsandbytes NF4 weights (float32 compute) plus a non-zero adapter, unquantized only
    by the decoder: the logits equal the 4-bit model's."""
    model, ids = adapted(tiny_model, quantization="4bit", sharpen=False), prompt(tiny_model)
    decoder = utils.CpuDecoder(model, packed=False)  # before any forward: bitsandbytes repacks on the first
    with torch.inference_mode():
        gap = logprob_gap(decoder.forward(ids, 0, all_logits=True), model(input_ids=ids[None]).logits[0])
    base = utils.CpuDecoder(utils.load_base_model(utils.resolve_model(str(tiny_model)),
                                                  utils.Hardware("cpu", torch.float32, "4bit", ""), training=False),
                            packed=False)
    with torch.inference_mode():
        adapter_effect = logprob_gap(decoder.forward(ids, 0, all_logits=True), base.forward(ids, 0, all_logits=True))
    assert gap < 1e-4 and adapter_effect > 0.01, (gap, adapter_effect)


@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_answers_equal_transformers_generate(family, temperature):
    """Same prompt, repetition penalty, answer-only n-gram ban, stop ids and token cap: the same
    answer, greedy and (same seed) sampled."""
    model = adapted(family)
    tokenizer, _ = utils.load_tokenizer(utils.resolve_model(str(family)))
    cfg = utils.config_from_dict({"model": {"name": str(family)}, "data": {"system_prompt": "Be careful."},
                                  "generation": {"max_new_tokens": 24, "repetition_penalty": 1.3,
                                                 "no_repeat_ngram_size": 2, "temperature": temperature, "top_p": 0.8}})
    history = [{"role": "user", "content": "Is rest good for a cold?"}]
    decoder = utils.CpuDecoder(model, packed=False)
    torch.manual_seed(1)
    ours = utils.generate_answer_cpu(decoder, tokenizer, history, cfg)
    torch.manual_seed(1)
    theirs = utils.generate_answer(model, tokenizer, history, cfg)
    assert ours == theirs and len(ours[0]) > 10


@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_batched_answers_equal_transformers_generate(family, temperature):
    """evaluate's batches: questions of different lengths left-padded together, rows ending at
    different steps; the same answers as generate() on the same batch."""
    model = adapted(family)
    tokenizer, _ = utils.load_tokenizer(utils.resolve_model(str(family)))
    cfg = utils.config_from_dict({"model": {"name": str(family)}, "data": {"system_prompt": "Be careful."},
                                  "generation": {"repetition_penalty": 1.3, "no_repeat_ngram_size": 2,
                                                 "temperature": temperature, "top_p": 0.8}})
    questions = ["Is rest good for a cold?", "Flu?", "What helps a sore throat at night, and when should I see a doctor?"]
    decoder = utils.CpuDecoder(model, packed=False)
    torch.manual_seed(3)
    ours = utils.generate_batch(model, tokenizer, questions, cfg, 20, decoder=decoder)
    torch.manual_seed(3)
    theirs = utils.generate_batch(model, tokenizer, questions, cfg, 20)
    assert ours == theirs and all(len(text) > 5 for text, _ in ours)


def test_rows_that_end_early_are_padded_as_in_generate(family):
    """A stop token that ends the first row a few tokens in, while another row goes on: the rows
    that ended are fed padding, the others continue, as in generate()."""
    model = adapted(family, sharpen=False)
    tokenizer, _ = utils.load_tokenizer(utils.resolve_model(str(family)))
    cfg = utils.config_from_dict({"generation": {"repetition_penalty": 1.3, "no_repeat_ngram_size": 2}})
    tokenizer.padding_side = "left"
    inputs = tokenizer(["Is rest good for a cold?", "Flu?", "What helps a sore throat at night?"],
                       return_tensors="pt", padding=True, add_special_tokens=False)
    width, pad = inputs["input_ids"].shape[1], tokenizer.pad_token_id
    rows = [r[m.bool()].tolist() for r, m in zip(inputs["input_ids"], inputs["attention_mask"])]
    decoder = utils.CpuDecoder(model, packed=False)
    free = utils.decode_batch(decoder, rows, cfg, 12, pad, [-1])[:, width:]  # nothing stops it
    stop = next(int(t) for t in free[0, 1:] if t not in free[1] and t != pad)  # ends row 0, never row 1
    ours = utils.decode_batch(decoder, rows, cfg, 12, pad, [stop])
    kwargs = {**utils.generation_kwargs(tokenizer, cfg, width, 12), "eos_token_id": [stop]}
    with torch.no_grad():
        theirs = model.generate(**inputs, **kwargs)
    assert torch.equal(ours, theirs), (ours[:, width:], theirs[:, width:])
    ended = free[0].tolist().index(stop) + 1
    assert (ours[0, width + ended:] == pad).all() and ours.shape[1] == width + 12


def test_a_padded_batch_computes_each_row_as_alone(family):
    model = adapted(family)
    rows = [prompt(family, n)[:n] for n in (7, 19, 12)]
    width = max(len(r) for r in rows)
    decoder = utils.CpuDecoder(model, packed=False)
    with torch.inference_mode():
        batch = decoder.forward(torch.stack([torch.cat([torch.zeros(width - len(r), dtype=torch.long), r]) for r in rows]),
                                0, pads=[width - len(r) for r in rows])[:, -1]
        alone = torch.cat([utils.CpuDecoder(model, packed=False).forward(r, 0) for r in rows])
    assert torch.allclose(batch, alone, atol=1e-4), (batch - alone).abs().max()


def test_sampling_keeps_to_top_p():
    cfg = utils.config_from_dict({"generation": {"temperature": 1.0, "top_p": 0.5}})
    scores = torch.log(torch.tensor([[0.05, 0.6, 0.3, 0.05]]))
    assert {int(utils.pick_tokens(scores.clone(), cfg)[0]) for _ in range(50)} == {1}
    cfg = utils.config_from_dict({"generation": {"temperature": 1.0, "top_p": 0.85}})
    assert {int(utils.pick_tokens(scores.clone(), cfg)[0]) for _ in range(200)} == {1, 2}


def test_chat_runs_on_the_decoder_and_says_when_it_cannot(tiny_model, tmp_path, capsys, monkeypatch):
    """The default chat on a CPU names the decoder in its rows (a GPU's, generate()); `engine:
    transformers` does not use it; on a CPU, an architecture it does not run (Gemma 2) chats on
    generate() with a one-line note."""
    cfg = tiny_config(tmp_path, tiny_model, max_steps=2, eval_steps=2)
    raw = yaml.safe_load(cfg.read_text())
    raw["generation"] = {"max_new_tokens": 8}
    cfg.write_text(yaml.safe_dump(raw))
    assert main.main(["train", str(cfg)]) == 0
    rows = tmp_path / "rows.jsonl"
    for engine in ("auto", "transformers"):
        raw["generation"]["engine"] = engine
        cfg.write_text(yaml.safe_dump(raw))
        assert main.main(["inference", str(cfg), "--question", "Is rest good?", "--output", str(rows)]) == 0
    assert [json.loads(line)["engine"] for line in rows.read_text().splitlines()] == [chat_engine_here(), GENERATE]

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # as on a machine without a GPU
    cpu = utils.pick_hardware("4bit")
    gemma = build_tiny_model(tmp_path / "gemma2", family="gemma2")
    model = utils.load_base_model(utils.resolve_model(str(gemma)), cpu, training=False)
    capsys.readouterr()
    assert utils.cpu_decoder_for_chat(model, cpu, utils.config_from_dict({})) is None
    assert "architecture 'gemma2'" in capsys.readouterr().err


def test_engine_is_validated():
    with pytest.raises(utils.ConfigError, match="generation.engine"):
        utils.config_from_dict({"generation": {"engine": "fast"}})


def test_the_layer_loop_runs_compiled_and_as_plain_python_alike(family, monkeypatch):
    """The decoder's layer loop runs under TorchScript (Python's own overhead was a quarter of a
    decode step); where scripting fails, the same function runs as plain Python. Both give the
    same logits to the bit, for a prompt (SDPA) and for single tokens (the two-product path)."""
    model, ids = adapted(family), prompt(family)
    utils.decoder_layer_loop.cache_clear()

    def fails(fn):
        raise RuntimeError("no TorchScript here")
    try:
        compiled = utils.CpuDecoder(model, packed=False)
        monkeypatch.setattr(torch.jit, "script", fails)
        utils.decoder_layer_loop.cache_clear()
        plain = utils.CpuDecoder(model, packed=False)
    finally:
        utils.decoder_layer_loop.cache_clear()  # the next decoder compiles again
    assert isinstance(compiled.layer_loop, torch.jit.ScriptFunction)
    assert not isinstance(plain.layer_loop, torch.jit.ScriptFunction)

    def logits(decoder):
        with torch.inference_mode():
            return [decoder.forward(ids[:-3], 0, all_logits=True)] + [decoder.forward(ids[i:i + 1], i)
                                                                        for i in range(len(ids) - 3, len(ids))]
    for a, b in zip(logits(compiled), logits(plain)):
        assert torch.equal(a, b), (a - b).abs().max()


def test_rotary_frequencies_that_follow_the_length_are_picked_per_pass_as_in_generate(tmp_path):
    """LongRoPE (Phi-3.5, Phi-4-mini: original context 4,096; here 48) rotates a pass with the short
    factors until its longest position passes the original context, then with the long ones, the
    cached keys keeping theirs: token by token across that boundary, the decoder's logits equal the
    model's own cached passes (what generate() runs). The cache doubling past 48 while the
    conversation is shorter must not switch every position to the long factors."""
    folder = build_tiny_model(tmp_path / "phi-longrope", family="phi3", original_max_position_embeddings=48,
                              rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0,
                                               "short_factor": [1.0] * 8, "long_factor": [4.0] * 8,
                                               "original_max_position_embeddings": 48})
    model, ids = adapted(folder), prompt(folder, 60)
    first = 30
    assert len(ids) > 56
    decoder = utils.CpuDecoder(model, packed=False)
    with torch.inference_mode():
        ours = [decoder.forward(ids[:first], 0, all_logits=True)]
        out = model(input_ids=ids[None, :first], use_cache=True)
        theirs = [out.logits[0]]
        for i in range(first, len(ids)):
            ours.append(decoder.forward(ids[i:i + 1], i))
            out = model(input_ids=ids[None, i:i + 1], cache=out.cache, use_cache=True, position_ids=torch.tensor([[i]]))
            theirs.append(out.logits[0])
    gaps = [logprob_gap(a, b) for a, b in zip(ours, theirs)]
    assert max(gaps) < 1e-4, gaps
    # a prompt past the original context in one pass: long factors for every position, as the model
    with torch.inference_mode():
        whole = model(input_ids=ids[None]).logits[0]
        assert logprob_gap(utils.CpuDecoder(model, packed=False).forward(ids, 0, all_logits=True), whole) < 1e-4
    # which differs from the token-by-token run (short factors up to position 47): the factors matter here
    assert logprob_gap(whole[first:48], torch.cat(theirs[1:49 - first])) > 0.01

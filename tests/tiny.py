"""Tiny random chat models built from a config in seconds: real tokenizer machinery, each
family's own chat template text, real architectures at 2 layers of width 64. No hub."""
from __future__ import annotations

from pathlib import Path

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Qwen2.5-Instruct's template without its tool branch: ChatML with a default system turn.
QWEN2 = (
    "{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}"
    "{%- else %}{{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}{%- endif %}"
    "{%- for message in messages %}{%- if message.role != 'system' %}"
    "{{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}"
)
# Phi-4-mini-instruct's template (its tools branch kept): no newlines, EOS after the last turn.
PHI4 = (
    "{% for message in messages %}{% if message['role'] == 'system' and 'tools' in message and message['tools'] is not none %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '<|tool|>' + message['tools'] + '<|/tool|>' + '<|end|>' }}"
    "{% else %}{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% else %}{{ eos_token }}{% endif %}"
)
# Gemma-2-it's template: no system role (it raises), assistant is "model".
GEMMA2 = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}{% endif %}"
    "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)
# Llama-3.x-Instruct's template without its tool and date branches.
LLAMA3 = (
    "{{- bos_token }}{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{%- endif %}"
)

# family: (config class name, template, special tokens, eos, bos, end-of-turn, auto LoRA targets)
FAMILIES = {
    "smollm2": ("LlamaConfig", CHATML, ("<|im_start|>", "<|im_end|>"), "<|im_end|>", "<|endoftext|>",
                "<|im_end|>", {"q_proj", "k_proj", "v_proj", "o_proj"}),
    "llama3": ("LlamaConfig", LLAMA3, ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
               "<|eot_id|>", "<|begin_of_text|>", "<|eot_id|>", {"q_proj", "k_proj", "v_proj", "o_proj"}),
    "phi3": ("Phi3Config", PHI4, ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>", "<|tool|>", "<|/tool|>"),
             "<|endoftext|>", "<|endoftext|>", "<|end|>", {"qkv_proj", "o_proj"}),
    "qwen2": ("Qwen2Config", QWEN2, ("<|im_start|>", "<|im_end|>"), "<|im_end|>", "<|endoftext|>",
              "<|im_end|>", {"q_proj", "k_proj", "v_proj", "o_proj"}),
    "gemma2": ("Gemma2Config", GEMMA2, ("<bos>", "<start_of_turn>", "<end_of_turn>"), "<end_of_turn>", "<bos>",
               "<end_of_turn>", {"q_proj", "k_proj", "v_proj", "o_proj"}),
}

CORPUS = [
    "What are common symptoms of the flu? Fever, cough, sore throat, aches and tiredness.",
    "How can I lower my blood pressure? Less salt, more activity, a healthy weight.",
    "You are a careful medical assistant. See a doctor if symptoms get worse.",
    "I don't have enough information to answer this safely. Please consult a healthcare professional.",
    "system user assistant model emergency chest pain stroke diabetes asthma migraine vaccine",
]


def build_tokenizer(template: str = CHATML, specials=("<|im_start|>", "<|im_end|>"), eos="<|im_end|>",
                    bos="<|endoftext|>"):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    special = list(dict.fromkeys(["<|endoftext|>", bos, eos, *specials]))
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=special,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS * 20, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos, pad_token="<|endoftext|>" if eos != "<|endoftext|>" else eos,
                                   bos_token=bos, unk_token="<|endoftext|>")
    fast.chat_template = template
    return fast


def build_tiny_model(folder: Path, template: str = CHATML, family: str | None = None, **config) -> Path:
    """Save a tiny random model + tokenizer into `folder` and return it; `family` picks the
    architecture and chat template from FAMILIES (default: SmolLM2-style Llama, pad == eos);
    `config` adds to or overrides the model config's fields."""
    import torch
    import transformers
    folder = Path(folder)
    if family is None:
        tokenizer = build_tokenizer(template)
        tokenizer.pad_token = tokenizer.eos_token  # SmolLM2 has pad == eos: keep that trap in the tests
        config_cls = transformers.LlamaConfig
    else:
        cls, template, specials, eos, bos, _, _ = FAMILIES[family]
        tokenizer = build_tokenizer(template, specials, eos, bos)
        config_cls = getattr(transformers, cls)
    torch.manual_seed(0)
    config = config_cls(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                        max_position_embeddings=1024, tie_word_embeddings=True,
                        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                        bos_token_id=tokenizer.bos_token_id, **config)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder

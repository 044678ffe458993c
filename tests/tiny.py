"""A tiny random chat model built from a config in seconds: real tokenizer machinery, real
chat template, real Llama architecture, 2 layers of width 64. No hub, no download."""
from __future__ import annotations

from pathlib import Path

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

CORPUS = [
    "What are common symptoms of the flu? Fever, cough, sore throat, aches and tiredness.",
    "How can I lower my blood pressure? Less salt, more activity, a healthy weight.",
    "You are a careful medical assistant. See a doctor if symptoms get worse.",
    "I don't have enough information to answer this safely. Please consult a healthcare professional.",
    "system user assistant emergency chest pain stroke diabetes asthma migraine vaccine",
]


def build_tokenizer(template: str = CHATML, specials=("<|im_start|>", "<|im_end|>"), eos="<|im_end|>"):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", *specials],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS * 20, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos, pad_token=eos,
                                   bos_token="<|endoftext|>", unk_token="<|endoftext|>")
    fast.chat_template = template
    return fast


def build_tiny_model(folder: Path, template: str = CHATML) -> Path:
    """Save a tiny random LlamaForCausalLM + tokenizer into `folder` and return it."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    folder = Path(folder)
    tokenizer = build_tokenizer(template)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=1024, tie_word_embeddings=True,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder

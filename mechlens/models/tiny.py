"""Tiny random models of several architectures, built offline from configs.

For tests, docs and quick experiments: every family mechlens supports, a few thousand
parameters, a byte-level tokenizer with a chat template and `<think>` tokens, deterministic
weights. `load_model("tiny-llama")` wraps one.

Example:
    >>> hf, tok = tiny_model("qwen2")
    >>> hf.config.num_hidden_layers
    3
"""

from __future__ import annotations

import torch
from torch import nn

TINY_ARCHS = ("llama", "qwen2", "qwen3", "mistral", "gemma", "gpt2")

_CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content']"
    " + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def tiny_tokenizer():
    """A byte-level tokenizer (256 bytes + specials) with a ChatML template, no files needed."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
    vocab = {s: i for i, s in enumerate(specials)}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=specials[3:],
    )
    fast.chat_template = _CHAT_TEMPLATE
    return fast


def tiny_model(
    arch: str = "llama", n_layers: int = 3, seed: int = 0, d_model: int = 64, n_heads: int = 4
) -> tuple[nn.Module, object]:
    """A random HF causal LM of family `arch` (eager attention) and its tokenizer."""
    import transformers as tf

    tok = tiny_tokenizer()
    vocab = len(tok)
    common = dict(vocab_size=vocab, pad_token_id=0, bos_token_id=1, eos_token_id=2, initializer_range=0.1)
    llama_like = dict(
        hidden_size=d_model,
        intermediate_size=2 * d_model,
        num_hidden_layers=n_layers,
        num_attention_heads=n_heads,
        num_key_value_heads=n_heads // 2,
        max_position_embeddings=1024,
        **common,
    )
    configs = {
        "llama": (tf.LlamaConfig, tf.LlamaForCausalLM, llama_like),
        "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM, llama_like),
        "qwen3": (
            tf.Qwen3Config,
            tf.Qwen3ForCausalLM,
            {**llama_like, "head_dim": d_model // n_heads},
        ),
        "mistral": (tf.MistralConfig, tf.MistralForCausalLM, llama_like),
        "gemma": (
            tf.GemmaConfig,
            tf.GemmaForCausalLM,
            {**llama_like, "head_dim": d_model // n_heads},
        ),
        "gpt2": (
            tf.GPT2Config,
            tf.GPT2LMHeadModel,
            dict(n_embd=d_model, n_layer=n_layers, n_head=n_heads, n_positions=1024, **common),
        ),
    }
    if arch not in configs:
        raise ValueError(f"unknown tiny architecture {arch!r}: choose from {list(configs)}")
    config_cls, model_cls, kwargs = configs[arch]
    config = config_cls(**kwargs)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    model.config._name_or_path = f"tiny-{arch}"
    return model, tok

"""Tiny real Hugging Face decoders (Llama with grouped-query attention, GPT-2) built from configs."""

from __future__ import annotations

import pytest
import torch


def tiny_llama(seed: int = 0, layers: int = 2):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      eos_token_id=2, bos_token_id=1, pad_token_id=0, tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).eval()


def tiny_gpt2(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=256, eos_token_id=2, bos_token_id=2)
    return GPT2LMHeadModel(cfg).eval()


def tiny_decoder(family: str, seed: int = 0, layers: int = 2, vocab: int = 128):
    """A tiny RoPE decoder of ``family`` (llama, mistral, qwen2, qwen3) with grouped-query attention."""
    import transformers

    classes = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3"}
    name = classes[family]
    torch.manual_seed(seed)
    cfg = getattr(transformers, f"{name}Config")(
        vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=512, eos_token_id=2, bos_token_id=1,
        pad_token_id=0, tie_word_embeddings=True)
    return getattr(transformers, f"{name}ForCausalLM")(cfg).eval()


@pytest.fixture
def llama():
    return tiny_llama()


@pytest.fixture
def gpt2():
    return tiny_gpt2()

"""Every decoder family the memory models support, on tiny configs: Infini-attention with memory
knocked out is the base model within a segment, cached generation equals uncached, the memory is
written in every layer, and a save / ``AutoModelForCausalLM.from_pretrained`` round trip gives the
same logits; the AutoCompressor likewise (one segment without summaries is the base model). An
unsupported family is refused by name."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from retromem.memory.autocompressor import AutoCompressorConfig, AutoCompressorLM
from retromem.memory.common import UnsupportedModelError
from retromem.memory.infini_attention import FAMILIES, InfiniAttentionConfig, InfiniAttentionLM

COMMON = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, eos_token_id=2, bos_token_id=1, pad_token_id=0)
# per family what a tiny config needs beyond COMMON; sliding windows shorter than the input where the family has one
FAMILY_CONFIGS = {
    "llama": {},
    "mistral": dict(sliding_window=6),
    "qwen2": {},
    "qwen3": dict(head_dim=16),
    "gemma": dict(head_dim=16),
    "gemma2": dict(head_dim=16, sliding_window=6, query_pre_attn_scalar=16),
    "phi3": {},
    "gpt_neox": dict(rotary_pct=0.5),
    "gpt2": None,
}


# Llama in the fast loop; the other families are slow (a few seconds each: two generations and a save / load)
FAMILY_PARAMS = [pytest.param(t, marks=() if t == "llama" else pytest.mark.slow) for t in sorted(FAMILY_CONFIGS)]


def tiny_base(model_type: str, seed: int = 0):
    from transformers import AutoConfig, AutoModelForCausalLM

    if model_type == "gpt2":
        kw = dict(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=256, eos_token_id=2, bos_token_id=1)
    else:
        kw = {**COMMON, **FAMILY_CONFIGS[model_type]}
        if model_type == "gpt_neox":
            kw.pop("num_key_value_heads")
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **kw)).eval()


def test_every_listed_family_is_tested():
    assert set(FAMILY_CONFIGS) == set(FAMILIES)
    assert {"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3", "gpt_neox", "gpt2"} <= set(FAMILIES)


def _incremental_logits(model, ids: torch.Tensor, first: int) -> torch.Tensor:
    with torch.no_grad():
        out = model(ids[:, :first], use_cache=True)
        parts = [out.logits]
        for t in range(first, ids.shape[1]):
            parts.append(model(ids[:, t:t + 1], cache=out.cache).logits)
    return torch.cat(parts, 1)


@pytest.mark.parametrize("model_type", FAMILY_PARAMS)
def test_infini_attention_on_each_family(model_type, tmp_path):
    from transformers import AutoModelForCausalLM

    ref = tiny_base(model_type)
    m = InfiniAttentionLM(tiny_base(model_type), InfiniAttentionConfig(segment_length=8, gate_init=0.0)).eval()
    ids = torch.randint(3, 128, (2, 21))
    m.set_gate_mode("local")
    with torch.no_grad():
        assert_close(m(ids[:, :8]).logits, ref(ids[:, :8]).logits)  # one segment, no memory: the base model
    m.set_gate_mode("learned")
    with torch.no_grad():
        whole = m(ids)
        local = m(ids[:, 8:16]).logits
    assert set(whole.memory.M) == {0, 1} and all(bool(M.abs().sum() > 0) for M in whole.memory.M.values())
    assert (whole.logits[:, 8:16] - local).abs().max() > 1e-4  # the second segment reads the first through memory
    # the cache (memory + the open segment's keys and values) gives what the whole text gives
    assert_close(_incremental_logits(m, ids, 5), whole.logits, rtol=1e-4, atol=1e-5)
    assert torch.equal(m.generate(ids, max_new_tokens=10, do_sample=False),
                       m.generate(ids, max_new_tokens=10, do_sample=False, use_cache=False))
    m.save_pretrained(tmp_path / "m")
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    assert type(back) is InfiniAttentionLM and back.config.base_config_type == model_type
    with torch.no_grad():
        assert_close(back(ids).logits, whole.logits)


@pytest.mark.parametrize("model_type", FAMILY_PARAMS)
def test_autocompressor_on_each_family(model_type, tmp_path):
    from transformers import AutoModelForCausalLM

    ref = tiny_base(model_type)
    m = AutoCompressorLM(tiny_base(model_type), AutoCompressorConfig(summary_length=3, segment_min=8, segment_max=8)).eval()
    ids = torch.randint(3, 128, (2, 21))
    with torch.no_grad():
        assert_close(m(ids, segment_lengths=[21]).logits, ref(ids).logits)  # one segment, no summaries: the base model
        whole = m(ids).logits
        alone = m(ids[:, 8:16], segment_lengths=[8]).logits
    assert (whole[:, 8:16] - alone).abs().max() > 1e-4  # the second segment reads the first one's summary
    assert_close(_incremental_logits(m, ids, 5), whole, rtol=1e-4, atol=1e-5)
    assert torch.equal(m.generate(ids, max_new_tokens=10, do_sample=False),
                       m.generate(ids, max_new_tokens=10, do_sample=False, use_cache=False))
    m.save_pretrained(tmp_path / "m")
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    assert type(back) is AutoCompressorLM and back.config.base_config_type == model_type
    with torch.no_grad():
        assert_close(back(ids).logits, whole)


def test_an_unsupported_family_is_refused_by_name():
    from transformers import OPTConfig, OPTForCausalLM

    opt = OPTForCausalLM(OPTConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, ffn_dim=64,
                                   num_attention_heads=2, word_embed_proj_dim=32))
    for cls in (InfiniAttentionLM, AutoCompressorLM):
        with pytest.raises(UnsupportedModelError, match=r"model_type='opt'"):
            cls(opt)
    with pytest.raises(ValueError, match="segment_length.*n_positions"):  # GPT-2's positions bound the segment
        InfiniAttentionLM(tiny_base("gpt2"), InfiniAttentionConfig(segment_length=512))

"""AutoCompressor on tiny real Llama and GPT-2 models: parity with the base model, positions,
accumulation, stop-gradient window, soft prompts, generation, save/load, summary store, bad input."""

from __future__ import annotations

import random

import pytest
import torch
from torch.testing import assert_close

from retromem.memory.autocompressor import (AutoCompressorConfig, AutoCompressorLM, SummaryStore, content_hash,
                                   precompute_summaries, sample_segment_lengths)
from retromem.memory.common import UnsupportedModelError

from .conftest import tiny_gpt2, tiny_llama


def wrap(kind: str = "llama", **kw) -> AutoCompressorLM:
    kw.setdefault("summary_length", 4)
    kw.setdefault("segment_min", 8)
    kw.setdefault("segment_max", 16)
    base = tiny_llama() if kind == "llama" else tiny_gpt2()
    return AutoCompressorLM(base, AutoCompressorConfig(**kw)).eval()


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_no_summary_tokens_used_equals_base(kind):
    ref = tiny_llama() if kind == "llama" else tiny_gpt2()
    m = wrap(kind)
    ids = torch.randint(3, 128, (2, 24))
    with torch.no_grad():
        assert_close(m(ids, segment_lengths=[24]).logits, ref(ids).logits)
        # an empty soft prompt is no soft prompt
        assert_close(m(ids, segment_lengths=[24], softprompt=torch.zeros(1, 0, 64)).logits, ref(ids).logits)
        # with κ = 0 nothing is ever compressed: segments are independent base-model runs
        z = wrap(kind, summary_length=0)
        out = z(ids, segment_lengths=[10])
        assert_close(out.logits[:, 10:20], ref(ids[:, 10:20]).logits)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_summaries_accumulate_and_feed_later_segments(kind):
    m = wrap(kind)
    ids = torch.randint(3, 128, (1, 40))
    with torch.no_grad():
        out = m(ids, segment_lengths=[16], output_softprompt=True)
        assert out.softprompt.shape == (1, 3 * 4, 64)  # 3 segments x κ
        # the second segment's logits equal a run of that segment with the first's summary as soft prompt
        sp1 = m.compress(ids[:, :16], segment_lengths=[16])
        assert sp1.shape == (1, 4, 64)
        again = m(ids[:, 16:32], softprompt=sp1, segment_lengths=[16]).logits
        assert_close(out.logits[:, 16:32], again)
        assert_close(out.softprompt[:, :4], sp1)
        # without accumulation only the last summary is kept
        last = wrap(kind, accumulate_summary=False)(ids, segment_lengths=[16], output_softprompt=True)
        assert last.softprompt.shape == (1, 4, 64)
        # summaries change later segments; the first segment is untouched
        none = m(ids, segment_lengths=[40]).logits
    assert_close(out.logits[:, :16], none[:, :16])
    assert (out.logits[:, 16:] - none[:, 16:]).abs().max() > 1e-4


def test_positions_are_used_for_summary_tokens_and_soft_prompt():
    m = wrap("llama")
    ids = torch.randint(3, 128, (1, 16))
    with torch.no_grad():
        sp = m.compress(ids, segment_lengths=[16])
        # identical EOS-initialised summary tokens still give distinct summary vectors: positions differ
        assert (sp[0, 0] - sp[0, 1]).abs().max() > 1e-4
        # the segment after a soft prompt of P vectors starts at position P: same as giving the soft
        # prompt through inputs_embeds with explicit positions to the base model
        seg = torch.randint(3, 128, (1, 8))
        embeds = torch.cat([sp, m.base.get_input_embeddings()(seg)], 1)
        ref = m.base(inputs_embeds=embeds, position_ids=torch.arange(12)[None]).logits[:, 4:]
        assert_close(m(seg, softprompt=sp, segment_lengths=[8]).logits, ref)


def test_gradients_reach_summary_embeddings_within_the_stop_gradient_window():
    ids = torch.randint(3, 128, (1, 48))
    labels = ids.clone()
    labels[:, :33] = -100  # loss only in the third segment
    for window, reaches_first in ((2, True), (1, False)):
        m = wrap("llama", stop_gradient_after=window).train()
        emb = m.base.get_input_embeddings()
        grads = {}
        handle = emb.register_forward_hook(lambda mod, i, o: o.retain_grad() or grads.setdefault(len(grads), o))
        out = m(ids, labels=labels, segment_lengths=[16])
        handle.remove()
        out.loss.backward()
        g = m.summary_embeddings.grad
        # window 2: segment 3 reads segment 2's summary, made from the summary tokens and segment 1;
        # window 1: a new window starts at segment 3, every summary it reads is detached
        assert (g is not None and g.abs().sum() > 0) == reaches_first, window
        first = grads[0].grad  # embeddings of the first segment's tokens
        assert (first is not None and first.abs().sum() > 0) == reaches_first, window


def test_random_segment_lengths_are_reproducible_and_in_range():
    a = sample_segment_lengths(5000, 1024, 2048, random.Random(3))
    assert a == sample_segment_lengths(5000, 1024, 2048, random.Random(3))
    assert all(1024 <= n <= 2048 for n in a) and sum(a) >= 5000 and sum(a[:-1]) < 5000
    m1, m2 = wrap(seed=7).train(), wrap(seed=7).train()
    ids = torch.randint(3, 128, (1, 64))
    assert_close(m1(ids, labels=ids).loss, m2(ids, labels=ids).loss)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_generate_with_softprompt_and_auto_compression(kind):
    m = wrap(kind)
    ids = torch.randint(3, 128, (1, 40))
    sp = m.compress(ids, segment_lengths=[16])
    prompt = torch.randint(3, 128, (1, 5))
    out = m.generate(prompt, softprompt=sp, max_new_tokens=20)
    assert out.shape == (1, 25) and torch.equal(out[:, :5], prompt)
    with torch.no_grad():
        first = m(prompt, softprompt=sp, segment_lengths=[5]).logits[:, -1].argmax(-1)
    assert int(first) == int(out[0, 5])
    # the prompt alone is longer than a segment: it is compressed first, and generation still works
    long = m.generate(torch.randint(3, 128, (1, 37)), max_new_tokens=3)
    assert long.shape == (1, 40)


def test_save_load_round_trip(tmp_path):
    m = wrap("llama", summary_length=3)
    with torch.no_grad():
        m.summary_embeddings.add_(torch.randn_like(m.summary_embeddings))
    m.save_pretrained(tmp_path / "ac")
    back = AutoCompressorLM.from_pretrained(tmp_path / "ac")
    assert back.memory_config == m.memory_config
    ids = torch.randint(3, 128, (1, 30))
    with torch.no_grad():
        assert_close(back(ids, segment_lengths=[12]).logits, m(ids, segment_lengths=[12]).logits)


def test_precomputed_summaries_keyed_by_content_hash(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.WordLevel({f"w{i}": i for i in range(128)} | {"[UNK]": 127}, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=raw)
    m = wrap("llama")
    texts = [" ".join(f"w{(i * 7 + j) % 120 + 3}" for j in range(20 + i)) for i in range(3)]
    path = precompute_summaries(m, tok, texts, tmp_path / "summaries.safetensors", progress=False)
    store = SummaryStore(path)
    assert len(store) == 3 and texts[1] in store and content_hash(texts[2]) in store
    assert_close(store.get(texts[0]), m.compress_text(tok, texts[0])[0])
    assert store.get(texts[2]).shape == (2 * 4, 64)  # 22 tokens, segments of 16: two summaries
    # re-running adds only new texts
    precompute_summaries(m, tok, texts + ["w5 w6 w7"], path, progress=False)
    assert len(SummaryStore(path)) == 4


def test_bad_input_gets_a_clear_error():
    with pytest.raises(ValueError, match="segment_max"):
        AutoCompressorConfig(segment_max=0)
    with pytest.raises(ValueError, match="segment_min"):
        AutoCompressorConfig(segment_min=100, segment_max=50)
    m = wrap("llama")
    ids = torch.randint(3, 128, (1, 10))
    with pytest.raises(ValueError, match="segment_lengths"):
        m(ids, segment_lengths=[0])
    with pytest.raises(ValueError, match="width 32.*hidden size is 64"):
        m(ids, softprompt=torch.zeros(1, 4, 32))
    with pytest.raises(UnsupportedModelError, match="model_type"):
        from transformers import BertConfig, BertForMaskedLM

        AutoCompressorLM(BertForMaskedLM(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                                    intermediate_size=64, vocab_size=64)))
    g = wrap("gpt2", segment_max=250, summary_length=8)
    with pytest.raises(ValueError, match="n_positions"):
        g(torch.randint(3, 128, (1, 255)), segment_lengths=[250], output_softprompt=True)


def test_compress_command_stores_summaries_for_datastore_documents(tmp_path, built):
    from click.testing import CliRunner
    from transformers import GPT2Config, GPT2LMHeadModel

    from retromem.datastore import Datastore
    from retromem.datastore.tokenizer import load_hf_tokenizer
    from retromem.cli import main

    manifest, cfg = built
    torch.manual_seed(0)
    base = GPT2LMHeadModel(GPT2Config(vocab_size=50257, n_embd=32, n_layer=1, n_head=2, n_positions=256))
    model_dir = tmp_path / "ac"
    AutoCompressorLM(base, AutoCompressorConfig(summary_length=2, segment_min=64, segment_max=64)).save_pretrained(model_dir)
    load_hf_tokenizer("gpt2").save_pretrained(str(model_dir))
    out = tmp_path / "summaries.safetensors"
    r = CliRunner().invoke(main, ["memory", "compress", cfg.out, "--model", str(model_dir), "--chunks", "0,1,2",
                                  "--segment-length", "64", "--out", str(out)])
    assert r.exit_code == 0, r.output
    store = SummaryStore(out)
    ds = Datastore.open(cfg.out)
    texts = ds.chunk_texts([0, 1, 2])
    assert len(store) == len(set(texts)) and all(t in store for t in texts)
    assert store.get(texts[0]).shape[1] == 32
    r = CliRunner().invoke(main, ["memory", "compress", cfg.out, "--model", str(model_dir), "--out", str(out)])
    assert r.exit_code == 2 and "--docs" in r.output

"""Drafters for tree speculation: the early-exit draft model (weights shared, logits equal to a visible
loop over its layers), a draft model's tree (a draft model equal to the target has every draft
accepted, which checks its KV-cache bookkeeping), prompt lookup as a tree, RASD's fusion by
longest-prefix matching; greedy output equal to plain greedy for each, a large tree (the lazy output
layer) included, and on SmolLM2-135M with REST over a SmolLM2-tokenized suffix array (slow)."""

from __future__ import annotations

import pytest
import torch

from retromem.errors import ConfigError
from retromem.retro.drafters import (ContextDrafter, FusedDrafter, ModelDraftConfig, ModelDrafter, early_exit_model,
                                     frequent_tokens, fuse_trees)
from retromem.retro.speculative import DraftTree, RestConfig, RestDrafter, speculative_generate


@pytest.fixture(scope="module")
def model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=256, eos_token_id=None, pad_token_id=0)
    return LlamaForCausalLM(cfg).eval()


def greedy(model, ids: list[int], n: int) -> list[int]:
    x = torch.tensor([ids])
    return model.generate(x, max_new_tokens=n, do_sample=False, attention_mask=torch.ones_like(x), pad_token_id=0)[0].tolist()


PROMPT = [3, 9, 27, 17, 51, 25, 11, 33, 35, 41, 59, 49]


def test_early_exit_shares_weights_and_equals_a_loop_over_its_layers(model):
    small = early_exit_model(model, 2)
    assert small.model.layers[1].mlp.up_proj.weight.data_ptr() == model.model.layers[1].mlp.up_proj.weight.data_ptr()
    assert small.lm_head.weight.data_ptr() == model.lm_head.weight.data_ptr() and len(small.model.layers) == 2
    x = torch.tensor([PROMPT])
    with torch.no_grad():
        h = model.model.embed_tokens(x)
        pos = torch.arange(x.shape[1])[None]
        pe = model.model.rotary_emb(h, pos)
        causal = torch.full((x.shape[1], x.shape[1]), torch.finfo(h.dtype).min).triu(1)[None, None]
        for layer in model.model.layers[:2]:
            h = layer(h, attention_mask=causal, position_embeddings=pe, position_ids=pos)
        want = model.lm_head(model.model.norm(h))
        torch.testing.assert_close(small(x).logits, want, atol=1e-5, rtol=1e-5)
    with pytest.raises(ConfigError, match="--draft-layers"):
        early_exit_model(model, 3)


def test_a_draft_model_equal_to_the_target_has_every_draft_accepted(model):
    drafter = ModelDrafter(model, ModelDraftConfig(depth=4, width=1, max_nodes=4, min_prob=0.0))
    out, st = speculative_generate(model, PROMPT, drafter, max_new_tokens=25, do_sample=False)
    assert out[0].tolist() == greedy(model, PROMPT, 25)
    assert st.accepted == [4] * 4 + [min(4, 25 - 1 - 5 * 4)] and st.steps == 5  # 1 + 4 tokens per pass
    # wider trees from a weaker draft model: still greedy's text; a restricted draft vocabulary too
    for d in (ModelDrafter.early_exit(model, 1, ModelDraftConfig(depth=3, width=3, max_nodes=8, min_prob=0.0)),
              ModelDrafter.early_exit(model, 2, ModelDraftConfig(min_prob=0.0), vocab=range(0, 64, 2))):
        out, st = speculative_generate(model, PROMPT, d, max_new_tokens=20, do_sample=False)
        assert out[0].tolist() == greedy(model, PROMPT, 20) and max(st.draft_nodes) > 1
    with pytest.raises(ConfigError, match="vocab"):
        ModelDrafter(model, vocab=[64])


def test_draft_model_tree_shape_and_pruning(model):
    d = ModelDrafter(model, ModelDraftConfig(depth=3, width=2, max_nodes=5, min_prob=0.0))
    t = d.draft(PROMPT)
    assert t.tokens[0] == PROMPT[-1] and len(t) == 6 and max(t.depths) <= 3
    assert all(t.parents[i] < i and t.depths[i] == t.depths[t.parents[i]] + 1 for i in range(1, len(t)))
    assert d.draft(PROMPT) == t  # deterministic, whatever its cache held
    assert ModelDrafter(model, ModelDraftConfig(min_prob=0.999)).draft(PROMPT) == DraftTree.lone(PROMPT[-1])


def test_context_drafter_drafts_what_followed_the_suffix_earlier():
    ctx = [1, 2, 3, 4, 5, 6, 9, 9, 1, 2, 3, 4, 7, 8, 9, 1, 2, 3]
    t = ContextDrafter(max_ngram=3, depth=3, max_nodes=10).draft(ctx)
    # "1 2 3" occurred twice before: followed by 4 5 6 and 4 7 8 -> 4 shared, then two branches
    assert t.tokens == (3, 4, 5, 7, 6, 8) and t.parents == (-1, 0, 1, 1, 2, 3)
    assert ContextDrafter().draft([5, 6, 7]) == DraftTree.lone(7)


def test_fuse_trees_by_longest_prefix():
    a = DraftTree((0, 1, 2, 3), (-1, 0, 1, 0), (0, 1, 2, 1))  # 0 -> 1 -> 2 ; 0 -> 3
    b = DraftTree((0, 1, 2, 5, 6), (-1, 0, 1, 2, 0), (0, 1, 2, 3, 1))  # 0 -> 1 -> 2 -> 5 ; 0 -> 6
    f = fuse_trees([a, b])
    assert sorted(f.paths()) == sorted({(), (1,), (1, 2), (3,), (1, 2, 5), (6,)})
    assert len(f) == 6 and all(f.parents[i] < i for i in range(1, len(f)))
    g = fuse_trees([a, b], max_nodes=4)  # a's three nodes, then b's first new node (1 -> 2 -> 5)
    assert sorted(g.paths()) == sorted({(), (1,), (1, 2), (3,), (1, 2, 5)})
    with pytest.raises(ConfigError, match="root"):
        fuse_trees([a, DraftTree.lone(9)])


class Broad:
    """A 30-node tree under any root: the lazy output layer's path (trees of 24 nodes or more)."""

    def draft(self, context):
        toks = [int(context[-1])] + [i % 64 for i in range(30)]
        parents = [-1] + [0] * 10 + [1 + (i % 10) for i in range(20)]
        depths = [0] + [1] * 10 + [2] * 20
        # siblings must carry distinct tokens
        toks = [toks[0]] + list(range(10)) + [(10 + i) % 64 for i in range(20)]
        return DraftTree(tuple(toks), tuple(parents), tuple(depths))


def test_fused_and_large_trees_equal_plain_greedy(model):
    for d in (FusedDrafter([ModelDrafter.early_exit(model, 1, ModelDraftConfig(min_prob=0.0)), ContextDrafter()], 10),
              Broad()):
        out, st = speculative_generate(model, PROMPT, d, max_new_tokens=20, do_sample=False)
        assert out[0].tolist() == greedy(model, PROMPT, 20)
    assert max(st.draft_nodes) == 30


def test_frequent_tokens():
    assert frequent_tokens([[1, 1, 2], [3, 1, 2, 7]], 2) == [1, 2]


@pytest.mark.slow
def test_smollm2_rest_and_rasd_equal_plain_greedy(tmp_path):
    """SmolLM2-135M (offline GGUF), REST over a SmolLM2-tokenized suffix array of demo documents, and
    RASD (its early exit's tree fused with the REST tree): greedy output identical to plain greedy."""
    from retromem.datastore import BuildConfig, build
    from retromem.index.ngram import NgramIndex
    from retromem.index.ngram_build import NgramBuildConfig, build_ngram_index
    from retromem.models import load_causal_lm
    from tests.conftest import demo_records, write_jsonl

    recs = demo_records()[:12]
    write_jsonl(tmp_path / "docs.jsonl", [{"id": r["id"], "text": r["text"]} for r in recs])
    build(BuildConfig(inputs=(str(tmp_path / "docs.jsonl"),), out=str(tmp_path / "ds"), tokenizer="smollm2-135m",
                      workers=1))
    build_ngram_index(tmp_path / "ds", tmp_path / "ngram", NgramBuildConfig(cpus=1), progress=False)
    idx = NgramIndex(tmp_path / "ngram")
    model, tok = load_causal_lm("smollm2-135m")
    ids = tok(recs[3]["text"], add_special_tokens=False).input_ids[:48]  # a datastore document: drafts accepted
    want = greedy(model, ids, 24)
    rest = RestDrafter(idx, RestConfig(max_nodes=8))
    for d in (rest, FusedDrafter([ModelDrafter.early_exit(model, 4), rest])):
        out, st = speculative_generate(model, ids, d, max_new_tokens=24, do_sample=False)
        assert out[0].tolist() == want
    assert sum(st.accepted) > 0

"""REST (speculative decoding with retrieval drafts) over a real suffix array of a small GPT-2
datastore, with tiny Llama models built from configs: greedy output equals plain greedy decoding
token for token, the tree pass equals full forwards of each branch, the cache keeps exactly the
accepted path, and a model that has learnt a document accepts long drafts from it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from retromem.errors import ConfigError
from retromem.index.ngram import NgramIndex
from retromem.index.ngram_build import NgramBuildConfig, build_ngram_index
from retromem.retro.speculative import (DraftTree, RestConfig, RestDrafter, build_draft_tree, generate_rest,
                                        keep_accepted, tree_attention_mask)
from tests.index.test_ngram import ds, streams  # noqa: F401  (module fixtures: the datastore and its token streams)


@pytest.fixture(scope="module")
def idx(built, ds, tmp_path_factory) -> NgramIndex:
    """Small shards, so that continuations are gathered across several."""
    out = tmp_path_factory.mktemp("rest-ngram") / "idx"
    build_ngram_index(built[1].out, out, NgramBuildConfig(shard_tokens=60_000, cpus=1), progress=False)
    return NgramIndex(out, ds)


@pytest.fixture(scope="module")
def tok():
    from retromem.datastore.tokenizer import load_hf_tokenizer

    return load_hf_tokenizer("gpt2")


def tiny_llama(vocab_size: int, seed: int = 0, eos: int | None = None):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                      bos_token_id=eos, eos_token_id=eos, pad_token_id=eos, attn_implementation="sdpa")
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def model(tok):
    return tiny_llama(len(tok), eos=tok.eos_token_id)


@pytest.fixture(scope="module")
def narrow_model(tok, streams):
    """A random model that only ever picks one of the datastore's 300 most frequent tokens (the other
    rows of its output layer are zero, so their logits are 0 and lose to the positive ones): its
    greedy text keeps matching n-grams of the datastore, so drafts are built, some accepted, most not."""
    m = tiny_llama(len(tok), seed=1, eos=tok.eos_token_id)
    counts = np.bincount(np.concatenate(streams), minlength=len(tok))
    keep = torch.from_numpy(np.argsort(-counts)[:300].copy())
    with torch.no_grad():
        w = torch.zeros_like(m.lm_head.weight)
        w[keep] = m.lm_head.weight[keep] * 10
        m.lm_head.weight.copy_(w)
    return m


def plain_greedy(model, ids: list[int], n: int) -> list[int]:
    out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, attention_mask=torch.ones(1, len(ids),
                         dtype=torch.long), pad_token_id=model.config.pad_token_id)
    return out[0].tolist()


# -- the index verb ------------------------------------------------------------------------


def brute_continuations(streams, ngram: list[int], depth: int) -> dict[tuple[int, ...], int]:
    n = len(ngram)
    out: dict[tuple[int, ...], int] = {}
    for s in streams:
        if len(s) < n:
            continue
        win = np.lib.stride_tricks.sliding_window_view(s, n)
        for o in np.flatnonzero((win == np.asarray(ngram)).all(axis=1)):
            c = tuple(int(x) for x in s[o + n:o + n + depth])
            if c:
                out[c] = out.get(c, 0) + 1
    return out


def test_continuations_match_a_scan_of_the_documents(idx, streams):
    rng = np.random.default_rng(0)
    checked = 0
    for _ in range(30):
        s = streams[int(rng.integers(len(streams)))]
        n = int(rng.integers(1, 4))
        o = int(rng.integers(0, len(s) - n))
        ngram = s[o:o + n].tolist()
        want = brute_continuations(streams, ngram, 5)
        cont = idx.continuations(ngram, 5, idx.limits.max_support)
        if cont.approx:
            continue
        checked += 1
        assert dict(cont.sequences) == want
        assert cont.count == idx.count(ngram).count == cont.read
        assert [c for _, c in cont.sequences] == sorted((c for _, c in cont.sequences), reverse=True)
    assert checked >= 10
    # a frequent token, sampled: `read` occurrences, every sampled sequence really follows it
    the = idx.encode(" the")
    cont = idx.continuations(the, 3, 50)
    assert cont.approx and cont.read == 50 and cont.count > 50 and sum(c for _, c in cont.sequences) <= 50
    full = brute_continuations(streams, the, 3)
    assert all(seq in full for seq, _ in cont.sequences)
    with pytest.raises(ConfigError, match="depth"):
        idx.continuations(the, 0)
    with pytest.raises(ConfigError, match="max_occurrences"):
        idx.continuations(the, 3, idx.limits.max_support + 1)


# -- the draft tree and its mask -----------------------------------------------------------


def test_draft_tree_takes_the_most_frequent_nodes_prefix_closed():
    seqs = [((1, 2, 3), 5), ((1, 2, 4), 3), ((7, 8), 2), ((1, 9), 1)]
    t = build_draft_tree(0, seqs, max_nodes=4)
    # counts: 1:9, 1-2:8, 1-2-3:5, 1-2-4:3, 7:2, 7-8:2, 1-9:1
    assert t.tokens == (0, 1, 2, 3, 4) and t.parents == (-1, 0, 1, 2, 2) and t.depths == (0, 1, 2, 3, 3)
    big = build_draft_tree(0, seqs, max_nodes=100)
    assert len(big) == 8 and all(p < i for i, p in enumerate(big.parents) if i)
    assert sorted(big.tokens[1:]) == [1, 2, 3, 4, 7, 8, 9]
    assert build_draft_tree(5, [], max_nodes=8) == DraftTree((5,), (-1,), (0,))


def test_tree_mask_is_causal_along_each_branch():
    # root -> a -> b -> c ; root -> d -> e ; a -> f
    t = DraftTree((0, 1, 2, 3, 4, 5, 6), (-1, 0, 1, 2, 0, 4, 1), (0, 1, 2, 3, 1, 2, 2))
    m = tree_attention_mask(t, past=3)
    assert m.shape == (1, 1, 7, 10)
    seen = (m[0, 0] == 0)
    assert seen[:, :3].all()  # everyone sees the cache
    ancestors = {0: {0}, 1: {0, 1}, 2: {0, 1, 2}, 3: {0, 1, 2, 3}, 4: {0, 4}, 5: {0, 4, 5}, 6: {0, 1, 6}}
    for i, anc in ancestors.items():
        assert set(torch.nonzero(seen[i, 3:]).flatten().tolist()) == anc
    assert (m[0, 0][~seen] == torch.finfo(torch.float32).min).all()
    # a chain is the plain causal mask
    chain = DraftTree((0, 1, 2, 3), (-1, 0, 1, 2), (0, 1, 2, 3))
    assert torch.equal(tree_attention_mask(chain, 0)[0, 0] == 0, torch.ones(4, 4, dtype=torch.bool).tril())


def test_tree_pass_equals_full_forwards_and_cache_keeps_the_accepted_path(model):
    from transformers import DynamicCache

    torch.manual_seed(1)
    ctx = torch.randint(0, model.config.vocab_size, (1, 12))
    t = DraftTree((11, 21, 22, 23, 31, 32, 24), (-1, 0, 1, 2, 0, 4, 1), (0, 1, 2, 3, 1, 2, 2))
    with torch.inference_mode():
        cache = DynamicCache(config=model.config)
        model(input_ids=ctx, cache=cache)
        past = cache.get_seq_length()
        pos = torch.tensor([[past + d for d in t.depths]])
        logits = model(input_ids=torch.tensor([t.tokens]), position_ids=pos, attention_mask=tree_attention_mask(t, past),
                       cache=cache).logits[0]
        for i in range(len(t)):
            branch, n = [], i
            while n >= 0:
                branch.insert(0, t.tokens[n])
                n = t.parents[n]
            full = model(input_ids=torch.cat([ctx, torch.tensor([branch])], dim=1)).logits[0, -1]
            torch.testing.assert_close(logits[i], full, atol=1e-4, rtol=1e-4)
        # accept root -> 21 -> 24 (slots 0, 1, 6); the next token sees exactly that path
        keep_accepted(cache, past, [0, 1, 6])
        assert cache.get_seq_length() == past + 3
        nxt = model(input_ids=torch.tensor([[77]]), cache=cache).logits[0, -1]
        full = model(input_ids=torch.cat([ctx, torch.tensor([[11, 21, 24, 77]])], dim=1)).logits[0, -1]
        torch.testing.assert_close(nxt, full, atol=1e-4, rtol=1e-4)


# -- generation ------------------------------------------------------------------------------


def test_greedy_rest_equals_plain_greedy(model, narrow_model, tok, idx, streams):
    rng = np.random.default_rng(3)
    prompts = [streams[d][o:o + 20].tolist() for d, o in ((0, 0), (2, 100), (5, 37))]  # suffixes in the datastore
    prompts.append(rng.integers(0, len(tok), 15).tolist())  # random tokens: nothing to draft at first
    prompts.append([int(streams[1][0])])  # one token
    del prompts[1]  # four prompts x three settings keep this test short
    drafted = accepted = 0
    for m, cfg in ((model, RestConfig()), (narrow_model, RestConfig()), (narrow_model, RestConfig(min_suffix=1, max_nodes=8))):
        for p in prompts:
            ids, stats = generate_rest(m, tok, idx, p, max_new_tokens=16, config=cfg)
            assert ids[0].tolist() == plain_greedy(m, p, 16)
            # each pass after the prompt's emits its root and the drafts it accepts
            assert stats.new_tokens == 16 and 16 - sum(stats.accepted) in (stats.steps, stats.steps + 1)
            assert max(stats.draft_nodes) <= cfg.max_nodes
            drafted += sum(1 for n in stats.draft_nodes if n)
            accepted += sum(stats.accepted)
    assert drafted > 15 and accepted > 0  # the tree path ran, and accepted drafts on the way
    ids, _ = generate_rest(model, tok, idx, "The Python tutorial", max_new_tokens=5)
    assert ids[0].tolist() == plain_greedy(model, tok("The Python tutorial").input_ids, 5)


def test_stops_at_end_of_sequence_like_generate(tok, idx, streams):
    # a model whose greedy text reaches its eos token early: the eos id is a token it produces
    m = tiny_llama(len(tok), seed=0, eos=tok.eos_token_id)
    p = streams[0][:10].tolist()
    free = plain_greedy(m, p, 12)
    eos = free[len(p) + 4]
    m.generation_config.eos_token_id = eos
    m.config.pad_token_id = eos
    want = plain_greedy(m, p, 12)
    ids, stats = generate_rest(m, tok, idx, p, max_new_tokens=12)
    assert ids[0].tolist() == want and want[-1] == eos and stats.new_tokens <= 5


@pytest.mark.slow
def test_a_model_that_learnt_a_document_accepts_long_drafts(tok, idx, streams):
    """Trained for a few seconds on one datastore document, the model continues it from memory, and
    REST's drafts (that document's continuations) are accepted several tokens at a time."""
    m = tiny_llama(len(tok), seed=2, eos=tok.eos_token_id).train()
    doc = torch.tensor(streams[3][100:196])  # prose (its first lines are runs of "*" a tiny model cannot count)
    steps = 90
    opt = torch.optim.AdamW(m.parameters(), lr=3e-2)
    decay = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1 - i / steps)  # ends stable, not on a spike
    for _ in range(steps):
        loss = m(input_ids=doc[None], labels=doc[None]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        decay.step()
    m.eval()
    p = doc[:32].tolist()
    ids, stats = generate_rest(m, tok, idx, p, max_new_tokens=40)
    assert ids[0].tolist() == plain_greedy(m, p, 40)
    assert stats.mean_accepted > 1.5, stats.as_dict()
    assert max(stats.accepted) >= 3


def test_refusals(model, tok, idx):
    # sampling is supported (the acceptance rule is tested in test_speculative_sampling.py); generate's
    # keywords other than generation settings are refused by name
    torch.manual_seed(0)
    ids, _ = generate_rest(model, tok, idx, [1, 2, 3], 4, do_sample=True, temperature=0.9)
    assert ids.shape == (1, 7)
    with pytest.raises(ConfigError, match="num_beams"):
        generate_rest(model, tok, idx, [1, 2, 3], 4, num_beams=2)
    with pytest.raises(ConfigError, match="min_suffix"):
        RestConfig(min_suffix=5, max_suffix=2)
    with pytest.raises(ConfigError, match="max_nodes"):
        RestConfig(max_nodes=0)
    with pytest.raises(ConfigError, match="max_new_tokens"):
        generate_rest(model, tok, idx, [1, 2, 3], 0)
    with pytest.raises(ConfigError, match="max_occurrences"):
        RestDrafter(idx, RestConfig(max_occurrences=idx.limits.max_support + 1))
    # a model whose vocabulary cannot hold the datastore's tokens
    with pytest.raises(ConfigError, match="vocabulary"):
        generate_rest(tiny_llama(1000), tok, idx, [1, 2, 3], 4)
    # another tokenizer (one added token changes the vocabulary)
    from retromem.datastore.tokenizer import load_hf_tokenizer

    other = load_hf_tokenizer("gpt2")
    other.add_tokens(["<not-in-the-datastore>"])
    with pytest.raises(ConfigError, match="tokenizer differs"):
        generate_rest(model, other, idx, [1, 2, 3], 4)


def test_min_share_drops_rare_nodes():
    seqs = [((1, 2, 3), 5), ((1, 2, 4), 3), ((7, 8), 2), ((1, 9), 1)]
    assert build_draft_tree(0, seqs, max_nodes=100, min_count=3).tokens == (0, 1, 2, 3, 4)
    assert build_draft_tree(0, seqs, max_nodes=100, min_count=10) == DraftTree((0,), (-1,), (0,))
    with pytest.raises(ConfigError, match="min_share"):
        RestConfig(min_share=1.0)


# -- the command line ----------------------------------------------------------------------


def test_cli_speculate(idx, tmp_path, streams, tok):
    from click.testing import CliRunner

    from retromem.cli import main
    from retromem.cli.speculate import DEFAULTS
    from tests.retro.conftest import tiny_llama_dir

    assert {k: getattr(RestConfig(), k) for k in DEFAULTS} == DEFAULTS  # the help shows the real defaults
    model_dir = tiny_llama_dir(tmp_path / "tiny")
    prompt = tok.decode(streams[0][:12].tolist())
    args = ["retro", "speculate", prompt, "--ngram-index", str(idx.path), "--model", str(model_dir),
            "--max-new-tokens", "8", "--threads", "1"]
    r = CliRunner().invoke(main, args + ["--compare-greedy", "--max-nodes", "4"])
    assert r.exit_code == 0, r.output
    assert "mean accepted length" in r.output and "identical output: yes" in r.output
    r = CliRunner().invoke(main, args + ["--sample", "--temperature", "0.8", "--seed", "1"])
    assert r.exit_code == 0 and "mean accepted length" in r.output, r.output
    r = CliRunner().invoke(main, args + ["--drafter", "rasd", "--draft-layers", "1", "--compare-greedy"])
    assert r.exit_code == 0 and "identical output: yes" in r.output, r.output
    r = CliRunner().invoke(main, args + ["--drafter", "rasd", "--draft-layers", "9"])
    assert r.exit_code == 2 and "--draft-layers" in r.output
    r = CliRunner().invoke(main, args + ["--min-suffix", "20"])
    assert r.exit_code == 2 and "--min-suffix" in r.output

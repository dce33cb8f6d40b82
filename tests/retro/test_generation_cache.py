"""generate() on RETRO models with a key/value cache: cached equals uncached token for token (greedy
and seeded sampling, fixed neighbours and a retriever called at each chunk boundary), batched
left-padded prompts equal one-by-one, beam search and a streamer; for a from-scratch RETRO and for
RETROfits of a tiny Llama and GPT-2."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM
from transformers.generation.streamers import BaseStreamer

from retromem.retro import RetroConfig, RetroForCausalLM, retro_config_for, retrofit

M, K, R, V = 4, 2, 8, 97
NEW = 14


def chunk_retriever(calls: list | None = None):
    """A deterministic retriever: the neighbours of a chunk are a function of its tokens and index."""
    def retrieve(chunk_ids: torch.Tensor, chunk_index: int, rows: torch.Tensor) -> torch.Tensor:
        if calls is not None:
            calls.append((chunk_index, rows.tolist(), chunk_ids.tolist()))
        seed = (chunk_ids.sum(-1, keepdim=True) * 7 + chunk_index * 13) % V  # (N, 1)
        return (seed[:, :, None] + torch.arange(K * R).view(1, K, R)) % V  # (N, k, r)
    return retrieve


def from_scratch(placement: str = "before_mlp", relative: bool = True) -> RetroForCausalLM:
    torch.manual_seed(0)
    cfg = RetroConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=128, chunk_length=M, num_neighbours=K,
                      neighbour_length=R, retro_layers=[2, 4], cca_placement=placement,
                      cca_relative_positions=relative)
    return RetroForCausalLM(cfg).eval()


def retrofitted(kind: str, placement: str = "after_layer") -> torch.nn.Module:
    torch.manual_seed(0)
    if kind == "llama":
        base = LlamaForCausalLM(LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                            bos_token_id=0, eos_token_id=1))
    else:
        base = GPT2LMHeadModel(GPT2Config(vocab_size=V, n_embd=32, n_layer=4, n_head=4, n_positions=128,
                                          bos_token_id=0, eos_token_id=1))
    model = retrofit(base.eval(), retro_config_for(base.config, chunk_length=M, num_neighbours=K, neighbour_length=R,
                                                   retro_layers=[2, 4], cca_placement=placement))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # move the gated blocks off zero, as training would, so neighbours matter
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
    return model.eval()


MODELS = {"retro": from_scratch, "retro-after-layer": lambda: from_scratch("after_layer", False),
          "retrofit-llama": lambda: retrofitted("llama", "before_mlp"), "retrofit-gpt2": lambda: retrofitted("gpt2")}


@pytest.fixture(scope="module", params=sorted(MODELS))
def model(request) -> torch.nn.Module:
    return MODELS[request.param]()


# the batch, sampling, beam and streamer checks run on two of the four models (the others are slow)
@pytest.fixture(scope="module", params=["retro", "retrofit-gpt2", pytest.param("retrofit-llama", marks=pytest.mark.slow),
                                        pytest.param("retro-after-layer", marks=pytest.mark.slow)])
def some_model(request) -> torch.nn.Module:
    return MODELS[request.param]()


def prompt(T: int = 7, B: int = 2, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(2, V, (B, T), generator=g), torch.randint(0, V, (B, 8, K, R), generator=g)


def gen(model: torch.nn.Module, ids: torch.Tensor, **kw) -> torch.Tensor:
    kw.setdefault("max_new_tokens", NEW)
    kw.setdefault("do_sample", False)
    return model.generate(ids, pad_token_id=0, min_new_tokens=kw["max_new_tokens"], **kw)


@torch.no_grad()
def test_cached_forward_equals_the_whole_sequence(model: torch.nn.Module) -> None:
    x, nb = prompt(T=23)
    for kw in ({"neighbour_ids": nb}, {"retriever": chunk_retriever()}):
        ref = model(x, **kw).logits  # (B, T, V), no cache: every chunk encoded from scratch
        out = model(x[:, :6], use_cache=True, **kw)
        logits, cache = [out.logits], out.cache
        for t in range(6, x.shape[1], 3):  # steps of 3 tokens cross chunk boundaries at every offset
            out = model(x[:, t:t + 3], cache=cache, use_cache=True, **kw)
            logits.append(out.logits)
            cache = out.cache
        torch.testing.assert_close(torch.cat(logits, 1), ref, rtol=1e-4, atol=1e-5)
    # and the neighbours matter: another set changes the logits after the first chunk
    other = model(x, neighbour_ids=(nb + 1) % V).logits
    assert (other[:, M - 1:] - model(x, neighbour_ids=nb).logits[:, M - 1:]).abs().max() > 1e-3


@torch.no_grad()
@pytest.mark.parametrize("how", ["neighbours", "retriever", "both"])
def test_greedy_with_cache_equals_without(model: torch.nn.Module, how: str) -> None:
    x, nb = prompt()
    kw = {"neighbours": {"neighbour_ids": nb}, "retriever": {"retriever": chunk_retriever()},
          "both": {"neighbour_ids": nb[:, :1], "retriever": chunk_retriever()}}[how]
    cached = gen(model, x, use_cache=True, **kw)
    assert torch.equal(cached, gen(model, x, use_cache=False, **kw))
    assert cached.shape == (2, 7 + NEW)
    if how != "neighbours":  # and retrieval changed what was written
        assert not torch.equal(cached, gen(model, x, use_cache=True, neighbour_ids=(nb + 5) % V))


@torch.no_grad()
def test_sampling_with_a_seed_equals_without_cache(some_model: torch.nn.Module) -> None:
    x, _ = prompt()
    outs = []
    for use_cache in (True, False):
        torch.manual_seed(11)
        outs.append(gen(some_model, x, do_sample=True, top_k=20, temperature=1.5, use_cache=use_cache,
                        retriever=chunk_retriever()))
    assert torch.equal(*outs)


@torch.no_grad()
@pytest.mark.parametrize("use_cache", [True, False])
def test_left_padded_batch_equals_one_by_one(some_model: torch.nn.Module, use_cache: bool) -> None:
    long, short = prompt(T=9, B=1, seed=2)[0], prompt(T=4, B=1, seed=3)[0]
    batch = torch.cat([long, torch.cat([torch.zeros(1, 5, dtype=torch.long), short], 1)])
    mask = torch.tensor([[1] * 9, [0] * 5 + [1] * 4])
    calls: list = []
    out = gen(some_model, batch, attention_mask=mask, use_cache=use_cache, retriever=chunk_retriever(calls))
    alone = [gen(some_model, p, use_cache=use_cache, retriever=chunk_retriever()) for p in (long, short)]
    assert torch.equal(out[0], alone[0][0])
    assert torch.equal(out[1, 5:], alone[1][0])
    # chunks count from each row's first real token: row 1's chunk 0 is its own first 4 tokens
    assert (0, [1], [short[0].tolist()]) in calls


@torch.no_grad()
def test_beam_search_runs_and_returns_valid_sequences(some_model: torch.nn.Module) -> None:
    x, nb = prompt()
    out = some_model.generate(x, num_beams=3, num_return_sequences=2, max_new_tokens=NEW, min_new_tokens=NEW,
                         do_sample=False, pad_token_id=0, output_scores=True, return_dict_in_generate=True,
                         retriever=chunk_retriever(), neighbour_ids=nb[:, :1])
    seqs = out.sequences
    assert seqs.shape == (4, 7 + NEW) and int(seqs.min()) >= 0 and int(seqs.max()) < V
    assert torch.equal(seqs[0::2, :7], x) and torch.equal(seqs[1::2, :7], x)  # each prompt kept, two beams each
    assert torch.isfinite(out.sequences_scores).all()
    uncached = some_model.generate(x, num_beams=3, num_return_sequences=2, max_new_tokens=NEW, min_new_tokens=NEW,
                              do_sample=False, pad_token_id=0, use_cache=False, retriever=chunk_retriever(),
                              neighbour_ids=nb[:, :1])
    assert torch.equal(seqs, uncached)


class Collect(BaseStreamer):
    def __init__(self) -> None:
        self.pieces: list[torch.Tensor] = []
        self.ended = False

    def put(self, value: torch.Tensor) -> None:
        self.pieces.append(value.reshape(-1).clone())

    def end(self) -> None:
        self.ended = True


@torch.no_grad()
def test_streamer_sees_every_token(some_model: torch.nn.Module) -> None:
    x, _ = prompt(B=1)
    streamer = Collect()
    out = gen(some_model, x, streamer=streamer, retriever=chunk_retriever())
    assert streamer.ended and torch.equal(torch.cat(streamer.pieces), out[0])


@torch.no_grad()
def test_retriever_is_asked_once_per_chunk_with_a_cache() -> None:
    model = from_scratch()
    x, _ = prompt(T=6, B=1)
    calls: list = []
    out = gen(model, x, max_new_tokens=11, retriever=chunk_retriever(calls))
    ids = out[0].tolist()
    # 17 tokens: chunks 0..3 complete (the last one's token is fed only if it is not the final token)
    assert [c[0] for c in calls] == [0, 1, 2, 3][: (len(ids) - 1) // M]
    assert all(c[2] == [ids[c[0] * M:(c[0] + 1) * M]] for c in calls)


def test_bad_retriever_results_are_named() -> None:
    model = from_scratch()
    x, _ = prompt(T=8, B=1)
    with pytest.raises(ValueError, match="neighbour_ids"):
        model(x, retriever=lambda q, u, rows: torch.zeros(1, K + 1, R, dtype=torch.long))
    with pytest.raises(TypeError, match="torch.Tensor"):
        model(x, retriever=lambda q, u, rows: [[0] * R] * K)
    with pytest.raises(TypeError, match="callable"):
        model(x, retriever="not a function")

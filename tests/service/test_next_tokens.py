"""The batched NextTokens RPC (REST drafts for many contexts in one round trip) on a real server on
loopback: it answers exactly what the in-process suffix array answers, context by context; its
refusals name the field; and REST decoding through it equals REST in process and plain greedy."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
import torch

from retromem.errors import RemoteQueryError
from retromem.index.ngram import NgramIndex
from retromem.service.client import RetrievalClient
from retromem.service.config import ServerConfig, ServiceLimits
from retromem.service.server import start_server
from retromem.service.servicer import Backend


@pytest.fixture(scope="module")
def ngram(union) -> NgramIndex:
    return NgramIndex(union.ngram)


@pytest.fixture(scope="module")
def client(union):
    cfg = ServerConfig(datastore=str(union.datastore), ngram=str(union.ngram), port=0, workers=2,
                       limits=ServiceLimits(max_batch=8))
    running = start_server(cfg, Backend.open(cfg))
    with RetrievalClient(running.target, timeout=20) as c:
        yield c
    running.stop(0)


def contexts_of(ngram: NgramIndex) -> list[list[int]]:
    rng = np.random.default_rng(0)
    ids = ngram.encode("The Python tutorial. Reading and writing files: open a file and read it line by line.")
    out = [ids[:k] for k in (3, 8, 12, len(ids))]
    out.append(rng.integers(0, 50000, 10).tolist())  # random tokens: no suffix of 2 tokens occurs
    out.append(ids[:1])  # shorter than min_suffix
    return out


def test_next_tokens_equals_the_index_context_by_context(client, ngram):
    ctxs = contexts_of(ngram)
    for kw in ({"depth": 4}, {"depth": 6, "max_occurrences": 5, "min_suffix": 1, "max_suffix": 4}):
        remote = client.draft_continuations(ctxs, **kw)
        local = ngram.draft_continuations(ctxs, **kw)
        assert remote == local
    assert any(n == 0 and c is None for n, c in remote)  # the random context
    assert sum(1 for n, c in remote if n > 0) >= 3


def test_next_tokens_refusals_name_the_field(client, ngram):
    def refused(fn, code, text):
        with pytest.raises(RemoteQueryError) as e:
            fn()
        assert e.value.code == code and text in e.value.details, e.value.details

    ctx = [ngram.encode(" the file")]
    refused(lambda: client.draft_continuations([], 4), grpc.StatusCode.INVALID_ARGUMENT, "`contexts`")
    refused(lambda: client.draft_continuations(ctx * 9, 4), grpc.StatusCode.INVALID_ARGUMENT, "max_batch")
    refused(lambda: client.draft_continuations(ctx, 0), grpc.StatusCode.INVALID_ARGUMENT, "`depth`")
    refused(lambda: client.draft_continuations(ctx, 4, 10 ** 9), grpc.StatusCode.OUT_OF_RANGE, "`max_occurrences`")
    refused(lambda: client.draft_continuations(ctx, 4, min_suffix=5, max_suffix=3), grpc.StatusCode.INVALID_ARGUMENT,
            "`min_suffix`")
    refused(lambda: client.draft_continuations([[10 ** 7]], 4), grpc.StatusCode.OUT_OF_RANGE, "`contexts[0].ids`")


def test_rest_through_the_service_equals_in_process_and_greedy(client, ngram):
    from transformers import LlamaConfig, LlamaForCausalLM

    from retromem.retro.speculative import RestConfig, RestDrafter, speculative_generate

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=ngram.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, eos_token_id=None,
                      pad_token_id=0)
    m = LlamaForCausalLM(cfg).eval()
    # a model that picks the datastore's frequent tokens, so its text keeps matching n-grams (drafts are built)
    counts = np.bincount(np.frombuffer(b"".join(ngram._ds_maps[0][i:i + 2] for i in range(0, 40000, 2)),
                                       dtype=ngram._dtype).astype(np.int64))[:ngram.vocab_size]  # not the separator
    keep = torch.from_numpy(np.argsort(-counts)[:200].copy())
    with torch.no_grad():
        w = torch.zeros_like(m.lm_head.weight)
        w[keep] = m.lm_head.weight[keep] * 10
        m.lm_head.weight.copy_(w)
    prompt = ngram.encode("Reading and writing files")
    ids = torch.tensor([prompt])
    want = m.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False, pad_token_id=0)
    rc = RestConfig(min_suffix=1, max_nodes=8)
    remote, st_r = speculative_generate(m, prompt, RestDrafter(client, rc), max_new_tokens=16, do_sample=False)
    local, st_l = speculative_generate(m, prompt, RestDrafter(ngram, rc), max_new_tokens=16, do_sample=False)
    assert remote.tolist() == local.tolist() == want.tolist()
    assert st_r.draft_nodes == st_l.draft_nodes and sum(1 for n in st_r.draft_nodes if n) > 5

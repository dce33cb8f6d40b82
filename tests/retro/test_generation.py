"""Generation with fresh retrieval at every chunk boundary: the same tokens as a step-by-step reference
that retrieves by hand, exclusion honoured, and a retriever over another tokenizer refused."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from retromem.retro import retro_config_for, retrofit
from retromem.retro.generation import generate_with_retrieval, neighbour_rows
from retromem.errors import ConfigError

from tests.retro.conftest import CHUNK


@pytest.fixture(scope="module")
def model_and_tok():
    from transformers import LlamaConfig, LlamaForCausalLM

    from retromem.datastore.tokenizer import load_hf_tokenizer

    tok = load_hf_tokenizer("gpt2")
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                        eos_token_id=-1)).eval()
    model = retrofit(copy.deepcopy(base), retro_config_for(base.config, chunk_length=CHUNK, neighbour_length=2 * CHUNK,
                                                            retro_layers=[2], encoder_num_layers=1))
    with torch.no_grad():
        g = torch.Generator().manual_seed(1)
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.5)
    return model.eval(), tok


@torch.no_grad()
def test_fresh_neighbours_every_chunk_equal_a_hand_rolled_reference(retro_ds, retro_index, model_and_tok):
    model, tok = model_and_tok
    doc = int(retro_ds.chunk_doc_array[10])
    prompt = retro_ds.tokens([10])[0][0, :CHUNK - 5].tolist()  # the first chunk completes after 5 new tokens
    calls = []
    res = generate_with_retrieval(model, tok, retro_index, prompt, max_new_tokens=2 * CHUNK + 3,
                                  exclude_doc_ids=[doc], on_retrieval=calls.append)
    ids = prompt + res.new_ids
    assert len(res.new_ids) == 2 * CHUNK + 3
    # chunks 0 and 1 completed before the end, and their neighbours were read; chunk 2 completed last
    assert [r.chunk_index for r in res.retrievals] == [0, 1, 2][: len(ids) // CHUNK]
    assert calls == res.retrievals
    assert all(doc not in r.doc_ids for r in res.retrievals)
    assert res.retrievals[0].query == tok.decode(ids[:CHUNK])

    # reference: greedy, one token at a time, neighbours of every complete chunk retrieved by hand
    ref = list(prompt)
    rows: list[tuple[np.ndarray, np.ndarray]] = []
    while len(ref) < len(ids):
        while len(rows) < len(ref) // CHUNK:
            u = len(rows)
            hits = retro_index.search([tok.decode(ref[u * CHUNK:(u + 1) * CHUNK])], 2, exclude_doc_ids=[[doc]], fetch=True)
            rows.append(neighbour_rows(hits.payloads[0], 2, 2 * CHUNK, tok.eos_token_id))
        kw = {}
        if rows:
            kw = {"neighbour_ids": torch.from_numpy(np.stack([r[0] for r in rows]))[None],
                  "neighbour_attention_mask": torch.from_numpy(np.stack([r[1] for r in rows]))[None]}
        logits = model(torch.tensor([ref]), **kw).logits
        ref.append(int(logits[0, -1].argmax()))
    assert ref == ids
    # retrieval matters: the same model without neighbours writes something else
    plain = model.generate(torch.tensor([prompt]), max_new_tokens=2 * CHUNK + 3, do_sample=False, pad_token_id=0)
    assert plain[0].tolist() != ids


def test_bad_inputs_are_named(retro_index, model_and_tok):
    from retromem.datastore.tokenizer import load_hf_tokenizer

    model, tok = model_and_tok
    with pytest.raises(ConfigError, match="max_new_tokens"):
        generate_with_retrieval(model, tok, retro_index, "x", max_new_tokens=0)
    with pytest.raises(TypeError, match="search"):
        generate_with_retrieval(model, tok, object(), "x")
    with pytest.raises(ConfigError, match="not a RETRO model"):
        generate_with_retrieval(torch.nn.Linear(2, 2), tok, retro_index, "x")
    with pytest.raises(ConfigError, match="tokenized with 'gpt2'"):  # the index's datastore has another tokenizer
        generate_with_retrieval(model, load_hf_tokenizer("smollm2-135m"), retro_index, "x")


@torch.no_grad()
def test_generation_through_the_service_equals_in_process(retro_ds, retro_index, model_and_tok):
    """RETRO retrieving through a real `retromem serve` on loopback writes the same tokens, reading
    the same neighbours, as with the index in process; the server's tokenizer is checked through Info."""
    from retromem.datastore.tokenizer import load_hf_tokenizer
    from retromem.service.client import RetrievalClient
    from retromem.service.config import ServerConfig
    from retromem.service.server import start_server
    from retromem.service.servicer import Backend

    model, tok = model_and_tok
    doc = int(retro_ds.chunk_doc_array[40])
    prompt = retro_ds.tokens([40])[0][0, :CHUNK - 3].tolist()
    local = generate_with_retrieval(model, tok, retro_index, prompt, max_new_tokens=CHUNK + 5, exclude_doc_ids=[doc])
    running = start_server(ServerConfig(datastore=str(retro_ds.path), dense=str(retro_index.path), port=0, workers=2),
                           Backend(retro_ds, retro_index, None))
    try:
        with RetrievalClient(running.target, timeout=30) as client:
            remote = generate_with_retrieval(model, tok, client, prompt, max_new_tokens=CHUNK + 5, exclude_doc_ids=[doc])
            assert remote.new_ids == local.new_ids
            assert [r.chunk_ids for r in remote.retrievals] == [r.chunk_ids for r in local.retrievals]
            assert len(remote.retrievals) == 2 and all(doc not in r.doc_ids for r in remote.retrievals)
            with pytest.raises(ConfigError, match=f"served at {running.target} was tokenized with 'gpt2'"):
                generate_with_retrieval(model, load_hf_tokenizer("smollm2-135m"), client, "x")
    finally:
        running.stop(0)

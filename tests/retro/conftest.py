"""A small real RETRO setting: eight documents of the demo corpus (GPT-2 tokens, 32-token chunks),
embedded with the offline all-MiniLM-L6-v2 into a Flat FAISS index, and tiny models over GPT-2's
vocabulary built from configs."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import demo_records, write_jsonl

CHUNK = 32
SPLIT = {"eval_fraction": 0.25, "split_seed": 0}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # tiny matrices: with other jobs on the cores, extra intra-op threads only spin (measured 80x slower with 2)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def retro_ds(tmp_path_factory):
    """8 documents cut to ~2,500 characters: about 160 chunks of 32 GPT-2 tokens, two shards."""
    from retromem.datastore import BuildConfig, Datastore, build

    d = tmp_path_factory.mktemp("retro-ds")
    recs = [{"id": r["id"], "text": r["text"][:2500]} for r in demo_records()[12:20]]
    write_jsonl(d / "docs.jsonl", recs)
    cfg = BuildConfig(inputs=(str(d / "docs.jsonl"),), out=str(d / "ds"), tokenizer="gpt2", chunk_length=CHUNK,
                      shard_bytes=10_000, workers=1)
    build(cfg)
    return Datastore.open(cfg.out)


@pytest.fixture(scope="session")
def retro_index(retro_ds, tmp_path_factory):
    from retromem.index.dense import DenseIndex
    from retromem.index.dense_build import DenseBuildConfig, build_dense
    from retromem.index.embed import EmbedConfig, embed_datastore

    root = tmp_path_factory.mktemp("retro-index")
    emb = embed_datastore(EmbedConfig(datastore=str(retro_ds.path), out=str(root / "emb"), batch_size=64), progress=False)
    res = build_dense(DenseBuildConfig(embeddings=str(emb.out), out=str(root / "idx"), factory="Flat", tune=False),
                      progress=False)
    return DenseIndex.open(res.out, datastore=retro_ds)


@pytest.fixture(scope="session")
def retro_neighbours(retro_ds, retro_index, tmp_path_factory):
    """Neighbours (k=2) of every chunk, train and eval splits in two directories."""
    from retromem.retro.neighbours import NeighboursConfig, compute_neighbours

    root = tmp_path_factory.mktemp("retro-nb")
    out = []
    for split in ("train", "eval"):
        cfg = NeighboursConfig(datastore=str(retro_ds.path), out=str(root / split), k=2, split=split, shard_chunks=64,
                               eval_fraction=SPLIT["eval_fraction"], split_seed=SPLIT["split_seed"])
        out.append(compute_neighbours(cfg, retro_index, progress=False).out)
    return out


def tiny_llama_dir(path, seed: int = 0):
    """A tiny Llama over GPT-2's vocabulary saved with the GPT-2 tokenizer: a base model to RETROfit."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from retromem.datastore.tokenizer import load_hf_tokenizer

    tok = load_hf_tokenizer("gpt2")
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(str(path))
    return path

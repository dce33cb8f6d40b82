"""Real datastores and indexes for the service tests, built once per session.

Ten short documents of the demo corpus, GPT-2 tokens: a union datastore of all ten, and shard
datastores "a" (the first five) and "b" (the other five). Each gets embeddings (the offline
all-MiniLM-L6-v2), an exact FAISS index (Flat, so that a router over the shards must equal one
server over the union exactly) and an n-gram suffix array. About 200 chunks in all.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import demo_records, write_jsonl

DOCS = [8, 3, 27, 29, 36, 21, 20, 30, 35, 0]  # the shortest documents of the demo corpus


@dataclass(frozen=True)
class Built:
    datastore: Path
    dense: Path
    ngram: Path


def _build(root: Path, records: list[dict]) -> Built:
    from retromem.datastore import BuildConfig, build
    from retromem.index.dense_build import DenseBuildConfig, build_dense
    from retromem.index.embed import EmbedConfig, embed_datastore
    from retromem.index.ngram_build import NgramBuildConfig, build_ngram_index

    root.mkdir(parents=True)
    write_jsonl(root / "docs.jsonl", records)
    ds = root / "ds"
    build(BuildConfig(inputs=(str(root / "docs.jsonl"),), out=str(ds), tokenizer="gpt2", workers=1))
    emb = embed_datastore(EmbedConfig(datastore=str(ds), out=str(root / "emb"), batch_size=64), progress=False)
    dense = build_dense(DenseBuildConfig(embeddings=str(emb.out), out=str(root / "dense"), factory="Flat", tune=False),
                        progress=False)
    build_ngram_index(ds, root / "ngram", NgramBuildConfig(cpus=1), progress=False)
    return Built(ds, dense.out, root / "ngram")


def build_service_stores(root: Path) -> dict[str, Built]:
    recs = demo_records()
    docs = [{"id": recs[i]["id"], "text": recs[i]["text"]} for i in DOCS]
    return {"union": _build(root / "union", docs), "a": _build(root / "a", docs[:5]), "b": _build(root / "b", docs[5:])}


@pytest.fixture(scope="session", autouse=True)
def _few_threads():
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def stores(service_stores) -> dict[str, Built]:
    return service_stores


@pytest.fixture(scope="session")
def union(stores) -> Built:
    return stores["union"]

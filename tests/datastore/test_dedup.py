import numpy as np
import pytest

from retromem.datastore.dedup import BloomFilter, DedupConfig, Deduplicator, MinHasher, bloom_params, optimal_bands
from retromem.errors import ConfigError
from tests.conftest import demo_records, near_duplicate


def shingle_jaccard(a: str, b: str, n: int = 13) -> float:
    import re

    def sh(t):
        w = re.findall(r"[a-z0-9\x80-\U0010ffff]+", t.lower())
        return {tuple(w[i : i + n]) for i in range(max(len(w) - n + 1, 1))}

    sa, sb = sh(a), sh(b)
    return len(sa & sb) / len(sa | sb)


def test_band_choice_for_massiveds_setting():
    assert optimal_bands(0.8, 128) == (9, 13)
    cfg = DedupConfig()
    assert (cfg.bands, cfg.rows) == (9, 13)


def test_config_errors_name_the_field():
    with pytest.raises(ConfigError, match="dedup.threshold"):
        DedupConfig(threshold=1.5)
    with pytest.raises(ConfigError, match="exceeds"):
        DedupConfig(bands=20, rows=10)


def test_minhash_estimates_jaccard():
    text = demo_records()[0]["text"]
    other = near_duplicate(text, every=40)
    mh = MinHasher(DedupConfig(num_perm=256, bands=256, rows=1))
    keys = mh.band_keys([text, other])
    estimate = float((keys[0] == keys[1]).mean())
    assert abs(estimate - shingle_jaccard(text, other)) < 0.1


def test_planted_duplicates_found_distinct_documents_kept():
    recs = [r["text"] for r in demo_records()[:10]]
    near = near_duplicate(recs[2])
    far = near_duplicate(recs[3], every=8)  # most shingles changed: not a duplicate
    assert shingle_jaccard(recs[2], near) > 0.85 and shingle_jaccard(recs[3], far) < 0.5
    texts = recs + [recs[5], near, far]
    mh = MinHasher(DedupConfig())
    content = np.array([hash(t) & ((1 << 63) - 1) for t in texts], dtype=np.uint64)
    dd = Deduplicator(DedupConfig(), expected_docs=len(texts))
    # two batches: duplicates are found within a batch and across batches
    r1 = dd.process(content[:7], mh.band_keys(texts[:7]))
    r2 = dd.process(content[7:], mh.band_keys(texts[7:]))
    reasons = np.concatenate([r1, r2]).tolist()
    assert reasons == [0] * 10 + [1, 2, 0]


def test_bloom_filter_has_no_false_negatives_and_few_false_positives():
    rng = np.random.default_rng(0)
    keys = rng.integers(0, 2**63, size=20_000, dtype=np.uint64)
    bf = BloomFilter(*bloom_params(20_000, 1e-3))
    bf.add(keys)
    assert bf.contains(keys).all()
    fresh = rng.integers(0, 2**63, size=200_000, dtype=np.uint64)
    assert bf.contains(fresh).mean() < 3e-3

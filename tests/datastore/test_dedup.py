import math
import re

import numpy as np
import pytest

from retromem.datastore.dedup import (
    MIDPOINT_TOLERANCE, BloomFilter, DedupConfig, Deduplicator, MinHasher, bloom_params, detection_midpoint,
    detection_probability, optimal_bands,
)
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
    # 9 x 13 (the unconstrained FP + FN minimum) puts the 50% point at 0.82; 10 x 12 puts it at 0.798
    assert optimal_bands(0.8, 128) == (10, 12)
    cfg = DedupConfig()
    assert (cfg.bands, cfg.rows) == (10, 12)
    assert abs(detection_midpoint(9, 13) - 0.819) < 1e-3
    assert detection_probability(0.8, 10, 12) == pytest.approx(0.509, abs=1e-3)


@pytest.mark.parametrize("threshold", [0.5, 0.6, 0.7, 0.8, 0.85, 0.9])
def test_detection_midpoint_sits_at_the_threshold(threshold):
    b, r = optimal_bands(threshold, 128)
    assert b * r <= 128
    assert abs(detection_midpoint(b, r) - threshold) <= MIDPOINT_TOLERANCE
    assert detection_probability(detection_midpoint(b, r), b, r) == pytest.approx(0.5)
    # no banding within the tolerance (2 permutations): the closest midpoint
    assert optimal_bands(0.95, 2) == (1, 2)


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9\x80-\U0010ffff]+", text.lower())  # the MinHasher's words


def _plant(words: list[str], target: float, rng: np.random.Generator, tag: str, n: int = 13) -> list[str]:
    """``words`` with words replaced by new ones until the 13-word shingle Jaccard is ``target``.

    Replacing word i changes the shingles starting at i-12..i; substitutions go at random
    places, then the last one where it changes exactly the shingles still needed."""
    n_sh = len(words) - n + 1
    common = round(2 * n_sh * target / (1 + target))  # J = c / (2N - c) for two sets of N shingles
    changed = np.zeros(n_sh, dtype=bool)
    out = list(words)
    k = 0
    while n_sh - changed.sum() > common:
        need = n_sh - common - int(changed.sum())
        if need >= n:
            pos = int(rng.integers(0, len(words)))
        else:  # a place whose window holds exactly `need` unchanged shingles
            fits = [p for p in range(len(words)) if (~changed[max(p - n + 1, 0) : p + 1]).sum() == need]
            pos = fits[int(rng.integers(0, len(fits)))] if fits else int(rng.integers(0, len(words)))
        changed[max(pos - n + 1, 0) : pos + 1] = True
        out[pos] = f"sub{tag}x{k}"
        k += 1
    return out


def test_planted_pairs_are_caught_as_the_detection_curve_predicts():
    """Real passages and copies with word substitutions at shingle Jaccard 0.7 / 0.8 / 0.9.

    240 pairs per level, fixed seeds. Each level's detection rate must lie within 4 binomial
    standard deviations of the mean curve prediction over its pairs' measured Jaccards (sd about
    0.03 at 0.8, where the curve is steepest; 4 sd makes a false alarm about 1 in 16,000 for a
    correct LSH). Measured: 0.12 / 0.53 / 0.96 against 0.13 / 0.51 / 0.96 predicted. At 0.8 the
    rate must be within 3 sd (0.1) of one half: the old 9 x 13 banding catches 0.40 here."""
    cfg = DedupConfig()
    words = [w for r in demo_records() for w in _words(r["text"])]
    passages = [words[i : i + 300] for i in range(0, len(words) - 300, 300)][:240]
    assert len(passages) == 240
    rng = np.random.default_rng(16)
    rates, predicted = {}, {}
    for target in (0.7, 0.8, 0.9):
        a_texts, b_texts, jac = [], [], []
        for i, p in enumerate(passages):
            b = _plant(p, target, rng, f"{i}t{int(target * 10)}")
            a_texts.append(" ".join(p))
            b_texts.append(" ".join(b))
            jac.append(shingle_jaccard(a_texts[-1], b_texts[-1]))
        # a passage that repeats a 13-word run has fewer distinct shingles than the count assumes: its
        # measured Jaccard is off by a little, and the prediction below uses the measured one
        assert abs(np.mean(jac) - target) < 0.005 and max(abs(j - target) for j in jac) < 0.04
        keys = MinHasher(cfg).band_keys(a_texts + b_texts)
        caught = (keys[: len(passages)] == keys[len(passages) :]).any(axis=1)
        p = np.array([detection_probability(j, cfg.bands, cfg.rows) for j in jac])
        sd = math.sqrt(float((p * (1 - p)).sum())) / len(p)
        rates[target], predicted[target] = float(caught.mean()), float(p.mean())
        assert abs(rates[target] - predicted[target]) <= 4 * sd, (target, rates[target], predicted[target], sd)
    assert rates[0.7] < rates[0.8] < rates[0.9]
    assert abs(rates[0.8] - 0.5) < 0.1 and rates[0.7] < 0.25 and rates[0.9] > 0.9


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


def test_band_keys_do_not_depend_on_batching_or_on_kept_powers():
    """The build hashes small batches with one MinHasher that keeps its rolling-hash powers between
    batches (and computes them afresh for a batch too long to keep): every document's keys equal
    those of a fresh MinHasher hashing it alone, so the dedup generation's bytes never depend on it."""
    import retromem.datastore.dedup as dedup

    texts = [r["text"] for r in demo_records()[:12]] + ["short", "ünïcödé text " * 50, "x"]
    shared = MinHasher(DedupConfig())
    batched = np.concatenate([shared.band_keys(texts[i : i + 3]) for i in range(0, len(texts), 3)]
                             + [shared.band_keys(texts)])
    alone = np.stack([MinHasher(DedupConfig()).band_keys([t])[0] for t in texts])
    np.testing.assert_array_equal(batched, np.concatenate([alone, alone]))
    kept = dedup._POWERS_KEPT
    try:
        dedup._POWERS_KEPT = 64  # every batch too long to keep
        np.testing.assert_array_equal(MinHasher(DedupConfig()).band_keys(texts), alone)
    finally:
        dedup._POWERS_KEPT = kept

"""Training a dense index at scale (issue 19): two-level k-means for many IVF lists, no polysemous
training of PQ codes, and the FLOP count `retromem plan` takes from them. Real FAISS throughout."""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from retromem.errors import ConfigError
from retromem.index.dense_build import _new_index
from retromem.index.dense_faiss import TWO_LEVEL_MIN_NLIST, kmeans_flops, train_ivf, two_level_centroids


def _blobs(n: int, d: int = 32, centers: int = 50, seed: int = 0) -> np.ndarray:
    """(n, d) unit vectors around ``centers`` random directions: data with cluster structure, as embeddings have."""
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((centers, d)).astype(np.float32)
    x = c[rng.integers(0, centers, n)] + 0.35 * rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _recall(index, xb: np.ndarray, q: np.ndarray, truth: np.ndarray, nprobe: int) -> float:
    faiss.extract_index_ivf(index).nprobe = nprobe
    _, found = index.search(q, 10)
    return float(np.mean([len(set(found[i]) & set(truth[i])) / 10 for i in range(len(q))]))


@pytest.fixture()
def one_thread():
    """FAISS at one thread for the test (reproducible k-means), the process's setting restored after."""
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before)


def test_two_level_recall_matches_flat_kmeans(one_thread):
    x = _blobs(6000)
    xb, q = x[:5800], x[5800:]
    truth = faiss.knn(q, xb, 10)[1]
    out = {}
    for two_level in (False, True):
        index = faiss.index_factory(32, "IVF64,Flat")
        train_ivf(index, xb, two_level=two_level)
        assert index.is_trained and faiss.extract_index_ivf(index).quantizer.ntotal == 64
        index.add(xb)
        out[two_level] = _recall(index, xb, q, truth, nprobe=4)
    assert out[False] > 0.6  # the data has structure for k-means to find
    assert out[True] >= out[False] - 0.05, out


def test_two_level_through_a_pretransform_and_inner_product(one_thread):
    x = _blobs(4000, seed=1)
    xb, q = x[:3900], x[3900:]
    truth = faiss.knn(q, xb, 10, metric=faiss.METRIC_INNER_PRODUCT)[1]
    out = {}
    for two_level in (False, True):
        index = faiss.index_factory(32, "PCA24,IVF64_HNSW32,Flat", faiss.METRIC_INNER_PRODUCT)
        train_ivf(index, xb, two_level=two_level)
        assert index.is_trained
        ivf = faiss.extract_index_ivf(index)
        if two_level:  # spherical k-means for an inner-product IVF, as FAISS's own training: unit-norm centroids
            cents = ivf.quantizer.reconstruct_n(0, ivf.nlist)
            np.testing.assert_allclose(np.linalg.norm(cents, axis=1), 1.0, atol=1e-4)
        index.add(xb)
        out[two_level] = _recall(index, xb, q, truth, nprobe=4)
    assert out[False] > 0.5
    assert out[True] >= out[False] - 0.05, out


def test_default_two_level_only_for_many_lists():
    assert kmeans_flops(1024, 39 * 1024, 384) == kmeans_flops(1024, 39 * 1024, 384, two_level=False)
    n = TWO_LEVEL_MIN_NLIST
    assert kmeans_flops(n, 39 * n, 384) == kmeans_flops(n, 39 * n, 384, two_level=True)
    # 10^7 vectors: nlist 32,768 on 39 points a list; two levels cost ~2 sqrt(nlist) per point and iteration
    # against nlist, less with level 1 on a sample: 131x fewer FLOPs
    ratio = kmeans_flops(32768, 39 * 32768, 384, two_level=False) / kmeans_flops(32768, 39 * 32768, 384)
    assert 90 < ratio < 181
    # PQ codebooks: 25 iterations over at most 256 x ksub points, whatever the sample
    pq = kmeans_flops(0, 10**6, 384, pq_m=32, pq_ksub=256)
    assert pq == pytest.approx(2 * 384 * 65536 * 256 * 25)


def test_two_level_needs_a_point_per_list():
    with pytest.raises(ConfigError, match=r"needs at least 64 training vectors, got 50 \(build-dense --train-size"):
        two_level_centroids(_blobs(50), 64)


def test_no_polysemous_training_same_results():
    """The build turns FAISS's polysemous training off: the codes' centroids are only relabelled by it,
    so an index trained with it answers the same."""
    x = _blobs(3000, seed=2)
    ours = _new_index("IVF16,PQ8x4", 32, "euclidean")
    assert faiss.downcast_index(faiss.extract_index_ivf(ours)).do_polysemous_training is False
    theirs = faiss.index_factory(32, "IVF16,PQ8x4")
    assert faiss.downcast_index(faiss.extract_index_ivf(theirs)).do_polysemous_training is True
    for index in (ours, theirs):
        index.train(x)
        index.add(x)
        faiss.extract_index_ivf(index).nprobe = 4
    d1, i1 = ours.search(x[:50], 10)
    d2, i2 = theirs.search(x[:50], 10)
    np.testing.assert_allclose(d1, d2, rtol=1e-4, atol=1e-5)
    assert (i1 == i2).mean() > 0.98  # ties between equal distances may order differently

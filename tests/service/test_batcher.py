"""The dense micro-batcher on a real FAISS index, driven by real threads: concurrent requests are
answered together in fewer FAISS calls with the same results as one search each; a lone request
searches at once; a request whose deadline passes while it queues is dropped unsearched; a bad
request in a batch fails alone."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from retromem.index.dense import DenseIndex
from retromem.service.batcher import DeadlinePassed, DenseBatcher, DenseItem


@pytest.fixture(scope="module")
def index(union) -> DenseIndex:
    return DenseIndex.open(union.dense)


@pytest.fixture(scope="module")
def vectors(index) -> np.ndarray:
    n = index.datastore.num_chunks
    texts = [t for t in index.datastore.chunk_texts(np.arange(n) % n) if t.strip()][:48]
    return index.embedder.encode(texts).astype(np.float32)


def item(vecs: np.ndarray, k: int = 5, deadline: float | None = None, texts: dict[int, str] | None = None) -> DenseItem:
    return DenseItem(np.array(vecs, dtype=np.float32, copy=True), texts or {}, k, None, None, None, (), deadline)


class SlowIndex:
    """The real index, with every search held for ``delay`` seconds, so that requests pile up behind
    the running batch as they do under load."""

    def __init__(self, index: DenseIndex, delay: float) -> None:
        self.index, self.delay, self.calls = index, delay, []

    def __getattr__(self, name):
        return getattr(self.index, name)

    def search(self, x, k, **kw):
        self.calls.append(len(x))
        time.sleep(self.delay)
        return self.index.search(x, k, **kw)


def run_concurrently(batcher: DenseBatcher, items: list[DenseItem], timeout: float | None = None) -> list:
    out: list = [None] * len(items)

    def one(i: int) -> None:
        batcher.arrive()
        try:
            out[i] = batcher.search(items[i], timeout=timeout)
        except Exception as exc:  # noqa: BLE001 - the test looks at it
            out[i] = exc

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(items))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return out


def test_concurrent_requests_share_faiss_calls_and_equal_single_searches(index, vectors):
    slow = SlowIndex(index, 0.05)
    batches: list[int] = []
    b = DenseBatcher(slow, max_batch=64, wait_s=0.002, on_batch=batches.append)
    items = [item(vectors[i:i + 2]) for i in range(0, 32, 2)]  # 16 requests of 2 queries
    got = run_concurrently(b, items)
    for i, res in enumerate(got):
        ref = index.search(vectors[2 * i:2 * i + 2], 5)
        np.testing.assert_array_equal(res.chunk_ids, ref.chunk_ids)
        np.testing.assert_allclose(res.scores, ref.scores, rtol=1e-5)
    assert sum(batches) == 32
    assert len(slow.calls) < 16, f"16 concurrent requests took {len(slow.calls)} FAISS calls: nothing was batched"
    assert max(slow.calls) <= 64
    assert b.depth == 0


def test_a_lone_request_searches_at_once_in_its_own_thread(index, vectors):
    seen: list[str] = []
    slow = SlowIndex(index, 0.0)
    orig = slow.search
    slow.search = lambda x, k, **kw: (seen.append(threading.current_thread().name), orig(x, k, **kw))[1]
    b = DenseBatcher(slow, wait_s=3600.0)  # a wait bound no test could sit out: a lone request must not pay it
    waits: list = []
    b._arrived.wait = lambda *a: waits.append(a)  # a leader waiting for company would call this
    b.arrive()
    res = b.search(item(vectors[:1]))
    assert waits == []  # it searched before (instead of) waiting for company
    assert seen == [threading.current_thread().name]
    np.testing.assert_array_equal(res.chunk_ids, index.search(vectors[:1], 5).chunk_ids)


def test_max_batch_caps_each_faiss_call(index, vectors):
    slow = SlowIndex(index, 0.05)
    b = DenseBatcher(slow, max_batch=8, wait_s=0.002)
    got = run_concurrently(b, [item(vectors[i:i + 4]) for i in range(0, 48, 4)])
    assert all(not isinstance(r, Exception) for r in got)
    assert max(slow.calls) <= 8 and sum(slow.calls) == 48


def test_deadline_passing_in_the_queue_drops_the_request(index, vectors):
    slow = SlowIndex(index, 0.3)
    b = DenseBatcher(slow, wait_s=0.0)
    first = item(vectors[:1])
    b.arrive()
    lead = threading.Thread(target=lambda: b.search(first))
    lead.start()
    while not slow.calls:  # the first request is being searched: the next ones queue
        time.sleep(0.005)
    late = run_concurrently(b, [item(vectors[1:2], deadline=time.monotonic() + 0.05)], timeout=0.05)
    lead.join(10)
    assert isinstance(late[0], DeadlinePassed)
    assert slow.calls == [1], "the expired request was searched anyway"
    assert b.depth == 0
    # and the batcher goes on serving
    b.arrive()
    assert b.search(item(vectors[2:3])).chunk_ids.shape == (1, 5)


def test_a_bad_request_fails_alone(index, vectors):
    slow = SlowIndex(index, 0.05)
    b = DenseBatcher(slow, wait_s=0.002)
    # a wrong width (the server checks it first; the batcher must not rely on that): the shared
    # call fails, the batch is re-run request by request, and only the bad request gets the error
    bad = item(np.ones((1, vectors.shape[1] + 1), dtype=np.float32))
    good = [item(vectors[i:i + 1]) for i in range(1, 7)]
    got = run_concurrently(b, [*good[:3], bad, *good[3:]])
    assert isinstance(got[3], Exception)
    for i, r in zip([1, 2, 3, 4, 5, 6], got[:3] + got[4:]):
        assert not isinstance(r, Exception), r
        np.testing.assert_array_equal(r.chunk_ids, index.search(vectors[i:i + 1], 5).chunk_ids)


def test_solo_runs_at_once_and_queued_requests_get_the_lead_after_it(index, vectors):
    batches: list[int] = []
    b = DenseBatcher(index, max_batch=64, wait_s=0.002, on_batch=batches.append)
    done, (D, I) = b.solo(lambda: index.knn(vectors[:1], 5))
    assert done and batches == [1]
    ref = index.search(vectors[:1], 5)
    np.testing.assert_array_equal(I, ref.chunk_ids)
    np.testing.assert_array_equal(D, ref.scores)
    # a solo search holds the lead: a second solo is refused, batched requests queue behind it
    gate, entered, held = threading.Event(), threading.Event(), []

    def hold():
        entered.set()
        assert gate.wait(10)
        return "held"

    lead = threading.Thread(target=lambda: held.append(b.solo(hold)))
    lead.start()
    assert entered.wait(10)
    assert b.solo(lambda: "second") == (False, None)
    items = [item(vectors[i:i + 1]) for i in range(1, 5)]
    out: list = []
    queued = threading.Thread(target=lambda: out.extend(run_concurrently(b, items)))
    queued.start()
    deadline = time.monotonic() + 10
    while b.depth < 4 and time.monotonic() < deadline:
        time.sleep(0.005)
    assert b.depth == 4 and not out  # nobody searched while the solo search runs
    gate.set()
    lead.join(10)
    queued.join(10)
    assert held == [(True, "held")]
    for i, r in zip(range(1, 5), out):
        np.testing.assert_array_equal(r.chunk_ids, index.search(vectors[i:i + 1], 5).chunk_ids)
    assert b.depth == 0 and batches == [1, 1, 4]  # two solo searches, then the queued four in one call
    assert b.solo(lambda: "idle again") == (True, "idle again")


def test_solo_yields_to_announced_requests_and_passes_the_lead_when_it_fails(index, vectors):
    b = DenseBatcher(index, wait_s=0.002)
    b.arrive()  # a request on its way: it may batch with others, so no solo search meanwhile
    assert b.solo(lambda: "x") == (False, None)
    b.abandon()

    def fail():
        raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        b.solo(fail)
    assert b.solo(lambda: "after") == (True, "after")  # the failure did not keep the lead
    b.arrive()
    assert b.search(item(vectors[:1])).chunk_ids.shape == (1, 5)

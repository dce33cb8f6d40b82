"""Micro-batching of concurrent dense queries: many small requests become one FAISS call.

FAISS (and the embedder) answer a batch of n queries much faster than n calls of one query. There
is no batching thread: the request threads take turns leading. A request that finds no batch
running leads at once and searches in its own thread (a lone request pays no thread hand-off and
never waits). Requests that come while a batch runs queue up; when the batch finishes, its leader
hands the lead to the oldest queued request, which searches everything queued by then (at most
``max_batch`` queries) in one call. Before searching, a leader waits for company while other
request threads are still parsing dense requests (at most ``wait_s``; woken, not polling). A batch
embeds every text in one encoder call and runs one search per group of requests that share ``k``,
``nprobe``, ``efSearch``, the fetch flags and the metadata filters. A request whose deadline passed while it waited is
dropped unsearched. A failing group is re-run request by request so that one bad request fails
alone.

:meth:`DenseBatcher.solo` is the lone request's short way: when no batch is running and nobody is
on the way, it runs the caller's search at once in the caller's thread, holding the lead meanwhile
(requests that come while it runs queue up and the oldest of them leads the next batch, as after
any batch), without a queue entry, a future or a wake-up event.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable, TypeVar

import numpy as np

from retromem.errors import DeadlinePassed
from retromem.index.dense import DenseIndex
from retromem.index.types import SearchResult

logger = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(eq=False)
class DenseItem:
    """One request's queries: row i is ``texts[i]`` if given there, else ``vectors[i]``."""

    vectors: np.ndarray  # (n, d) float32; rows of text queries are filled in by the batcher
    texts: dict[int, str]  # row -> query text to embed
    k: int
    nprobe: int | None
    ef_search: int | None
    exclude: list[np.ndarray | None] | None
    fetch: tuple[str, ...]
    deadline: float | None  # time.monotonic() after which nobody waits for the answer
    filters: tuple = ()  # ((field, (values...)), ...) sorted by field: metadata filters of every query
    future: Future = field(default_factory=Future)
    wake: threading.Event = field(default_factory=threading.Event)  # set: answered, or handed the lead
    lead: bool = False  # handed the lead by the last batch's leader

    @property
    def key(self) -> tuple:
        return (self.k, self.nprobe, self.ef_search, self.fetch, self.filters)

    def rows(self, lo: int, hi: int) -> "DenseItem":
        """Queries ``lo:hi`` as a request of their own (SearchStream searches a big request in slices)."""
        return DenseItem(self.vectors[lo:hi], {r - lo: t for r, t in self.texts.items() if lo <= r < hi}, self.k,
                         self.nprobe, self.ef_search, self.exclude[lo:hi] if self.exclude is not None else None,
                         self.fetch, self.deadline, self.filters)


class DenseBatcher:
    """Batches dense queries of concurrent request threads (see module docstring)."""

    def __init__(self, index: DenseIndex, *, max_batch: int = 256, wait_s: float = 0.002,
                 on_batch: Callable[[int], None] | None = None) -> None:
        self.index = index
        self.max_batch = max_batch
        self.wait_s = wait_s
        self.on_batch = on_batch  # metrics hook: queries per FAISS call
        self._lock = threading.Lock()
        self._arrived = threading.Condition(self._lock)  # notified when an announced request is queued or dropped
        self._pending: deque[DenseItem] = deque()
        self._leading = False  # a batch is being collected or searched; invariant: not leading -> nothing pending
        self._arriving = 0

    @property
    def depth(self) -> int:
        return len(self._pending)

    def arrive(self) -> None:
        """A request thread started parsing a dense request: a leader may wait for it."""
        with self._lock:
            self._arriving += 1

    def abandon(self) -> None:
        """The request announced by :meth:`arrive` will not be submitted (it was invalid)."""
        with self._lock:
            self._arriving -= 1
            self._arrived.notify_all()

    def search(self, item: DenseItem, timeout: float | None = None) -> SearchResult:
        """Answer ``item`` (announced by :meth:`arrive`): at once in this thread if no batch is
        running, else in a later batch. Raises DeadlinePassed when ``timeout`` seconds pass first."""
        with self._lock:
            self._arriving -= 1
            self._pending.append(item)
            self._arrived.notify_all()
            lead = not self._leading
            self._leading = True
        if not lead and not item.wake.wait(timeout):
            with self._lock:
                if not item.lead and not item.future.done():
                    if item in self._pending:  # not picked up yet: nobody will search it
                        self._pending.remove(item)
                    raise DeadlinePassed()
        if lead or (item.lead and not item.future.done()):
            self._lead()
        return item.future.result(timeout=0)

    def solo(self, search: Callable[[], T], queries: int = 1) -> tuple[bool, T | None]:
        """``(True, search())`` run at once in this thread when no batch is running, queued or on
        its way (nobody announced by :meth:`arrive`); else ``(False, None)`` without running it
        (the caller takes the batched path). Meanwhile this thread holds the lead: requests that
        come queue up and are handed the lead when ``search`` returns or raises."""
        with self._lock:
            if self._leading or self._arriving:
                return False, None
            self._leading = True
        try:
            if self.on_batch is not None:
                self.on_batch(queries)
            return True, search()
        finally:
            self._pass_lead()

    def close(self) -> None:
        """Nothing to stop: batches run in the request threads."""

    def _pass_lead(self) -> None:
        """The running batch is done: hand the lead to the oldest queued request, or drop it."""
        with self._lock:
            if self._pending:
                nxt = self._pending[0]
                nxt.lead = True
                nxt.wake.set()
            else:
                self._leading = False

    def _lead(self) -> None:
        """Collect one batch (the oldest pending request first), search it, hand the lead on."""
        batch: list[DenseItem] = []
        try:
            with self._lock:
                until = time.monotonic() + self.wait_s
                while self._arriving > 0:  # requests on their way: wait for them a little
                    left = until - time.monotonic()
                    if left <= 0 or len(self._pending) and sum(len(it.vectors) for it in self._pending) >= self.max_batch:
                        break
                    self._arrived.wait(left)
                n = 0
                while self._pending and (not batch or n + len(self._pending[0].vectors) <= self.max_batch):
                    it = self._pending.popleft()
                    batch.append(it)
                    n += len(it.vectors)
            try:
                self._run(batch)
            except Exception as exc:  # never leave a request without an answer
                logger.exception("dense batch failed")
                for it in batch:
                    if not it.future.done():
                        it.future.set_exception(exc)
        finally:
            self._pass_lead()
            for it in batch:
                it.wake.set()

    def _run(self, batch: list[DenseItem]) -> None:
        now = time.monotonic()
        live = []
        for it in batch:
            if it.deadline is not None and now >= it.deadline:
                it.future.set_exception(DeadlinePassed())
            elif it.future.set_running_or_notify_cancel():
                live.append(it)
        if not live:
            return
        self._embed(live)
        groups: dict[tuple, list[DenseItem]] = {}
        for it in live:
            groups.setdefault(it.key, []).append(it)
        for items in groups.values():
            self._search(items)

    def _embed(self, items: list[DenseItem]) -> None:
        texts = [(it, row, t) for it in items for row, t in it.texts.items()]
        if not texts:
            return
        try:
            vecs = self.index.embedder.encode([t for _, _, t in texts])
        except Exception:
            # one bad text must not fail the others: embed request by request
            for it in items:
                if it.texts:
                    try:
                        v = self.index.embedder.encode(list(it.texts.values()))
                        it.vectors[list(it.texts)] = v
                    except Exception as exc:
                        it.future.set_exception(exc)
            return
        for (it, row, _), v in zip(texts, vecs):
            it.vectors[row] = v

    def _search(self, items: list[DenseItem]) -> None:
        items = [it for it in items if not it.future.done()]
        if not items:
            return
        if self.on_batch is not None:
            self.on_batch(sum(len(it.vectors) for it in items))
        first = items[0]
        try:
            x = np.concatenate([it.vectors for it in items]) if len(items) > 1 else first.vectors
            excl = None
            if any(it.exclude is not None for it in items):
                excl = [e for it in items for e in (it.exclude if it.exclude is not None else [None] * len(it.vectors))]
            res = self.index.search(x, first.k, nprobe=first.nprobe, ef_search=first.ef_search,
                                    exclude_doc_ids=excl, filters={k: list(v) for k, v in first.filters} or None,
                                    fetch=first.fetch or False)
        except Exception as exc:
            if len(items) == 1:
                first.future.set_exception(exc)
                return
            for it in items:  # find the culprit: each request on its own
                self._search([it])
            return
        row = 0
        for it in items:
            n = len(it.vectors)
            it.future.set_result(SearchResult(res.chunk_ids[row:row + n], res.scores[row:row + n],
                                              res.payloads[row:row + n] if res.payloads is not None else None))
            row += n

"""Micro-batching of concurrent dense queries: many small requests become one FAISS call.

FAISS (and the embedder) answer a batch of n queries much faster than n calls of one query. Each
request thread submits its queries and waits; one batching thread takes the first waiting item,
keeps collecting while other request threads are parsing dense requests (at most ``wait_s``,
at most ``max_batch`` queries; a lone request never waits), embeds every
text of the batch in one encoder call, and runs one search per group of requests that share
``k``, ``nprobe``, ``efSearch`` and the fetch flags. A request whose deadline passed while it
waited is dropped unsearched. A failing group is re-run request by request so that one bad
request fails alone.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from index.dense import DenseIndex, SearchResult

logger = logging.getLogger(__name__)


class DeadlinePassed(Exception):
    """The request's deadline passed before its batch ran."""


@dataclass
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
    future: Future = field(default_factory=Future)

    @property
    def key(self) -> tuple:
        return (self.k, self.nprobe, self.ef_search, self.fetch)


class DenseBatcher:
    """Collects dense queries from request threads into batched searches (see module docstring)."""

    def __init__(self, index: DenseIndex, *, max_batch: int = 256, wait_s: float = 0.002,
                 on_batch: Callable[[int], None] | None = None) -> None:
        self.index = index
        self.max_batch = max_batch
        self.wait_s = wait_s
        self.on_batch = on_batch  # metrics hook: queries per FAISS call
        self._queue: queue.Queue[DenseItem | None] = queue.Queue()
        self._lock = threading.Lock()
        self._arriving = 0
        self._thread = threading.Thread(target=self._loop, name="dense-batcher", daemon=True)
        self._thread.start()

    @property
    def depth(self) -> int:
        return self._queue.qsize()

    def arrive(self) -> None:
        """A request thread started parsing a dense request: the batcher may wait for it."""
        with self._lock:
            self._arriving += 1

    def abandon(self) -> None:
        """The request announced by :meth:`arrive` will not be submitted (it was invalid)."""
        with self._lock:
            self._arriving -= 1

    def submit(self, item: DenseItem) -> Future:
        """Queue ``item`` (announced by :meth:`arrive`); its future gets a SearchResult."""
        self._queue.put(item)
        self.abandon()
        return item.future

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=5)

    def _loop(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch = [first]
            n = len(first.vectors)
            until = time.monotonic() + self.wait_s
            stop = False
            while n < self.max_batch:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    # wait only for requests already on their way (parsed by a request thread now),
                    # so a lone request never waits
                    left = until - time.monotonic()
                    if self._arriving <= 0 or left <= 0:
                        break
                    try:
                        item = self._queue.get(timeout=min(left, 0.0005))
                    except queue.Empty:
                        continue
                if item is None:
                    stop = True
                    break
                batch.append(item)
                n += len(item.vectors)
            try:
                self._run(batch)
            except Exception as exc:  # never let the batching thread die
                logger.exception("dense batch failed")
                for it in batch:
                    if not it.future.done():
                        it.future.set_exception(exc)
            if stop:
                return

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
        x = np.concatenate([it.vectors for it in items]) if len(items) > 1 else items[0].vectors
        excl = None
        if any(it.exclude is not None for it in items):
            excl = [e for it in items for e in (it.exclude if it.exclude is not None else [None] * len(it.vectors))]
        first = items[0]
        try:
            res = self.index.search(x, first.k, nprobe=first.nprobe, ef_search=first.ef_search,
                                    exclude_doc_ids=excl, fetch=first.fetch or False)
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

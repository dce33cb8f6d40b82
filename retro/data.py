"""RETRO training and evaluation data from a datastore: the tokenizer checks, and a dataset of
(input tokens, neighbour tokens) read from the token array with the neighbour table written by the
neighbours job (:class:`retromem.retro.neighbours.NeighbourTable`) over a document split
(:mod:`retromem.retro.splits`).

* A sequence is ``seq_chunks`` consecutive chunks of the split (chunk-aligned: RETRO chunk u is
  datastore chunk u), so its tokens come straight from ``Datastore.token_array`` and chunk u's
  neighbours are the neighbour table's row for that chunk. Padding at a document's short last
  chunk (the pad id) gets label -100. A sequence may run from one document of the split into the
  next; each chunk's neighbours still exclude that chunk's own document.
* Neighbour tokens are the retrieved chunk plus its continuation (``Datastore.neighbour_tokens``),
  ``(n_chunks, k, 2m)`` with a padding mask.
* The control without retrieval signal: :class:`RandomNeighbourTable` lends each chunk the retrieved
  neighbours of a random chunk of other documents; the dataset takes it in place of the table.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from retromem.config import positive_int
from retromem.errors import ConfigError
from retromem.retro.neighbours import NeighbourTable

def check_datastore_tokenizer(ds: Any, tokenizer: Any = None, vocab_size: int | None = None) -> None:
    """ConfigError unless the datastore's tokens were made by ``tokenizer`` (same vocabulary hash) and
    fit a model of ``vocab_size`` token ids. Neighbours tokenized by another tokenizer are not just
    worse, they are noise, so this is checked before any training or evaluation."""
    info = ds.manifest["tokenizer"]
    check_tokenizer_record(info["name"], info["vocab_hash"], int(info["vocab_size"]), f"the datastore {ds.path}",
                           tokenizer, vocab_size)


def check_tokenizer_record(name: str, vocab_sha256: str, ds_vocab_size: int, where: str, tokenizer: Any = None,
                           vocab_size: int | None = None) -> None:
    """:func:`check_datastore_tokenizer` on a datastore's recorded tokenizer (``where`` names it: a
    local datastore, or a retrieval server's, as its ``Info`` reports)."""
    if tokenizer is not None:
        from retromem.datastore.tokenizer import vocab_hash

        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is None:
            raise ConfigError(f"the model's tokenizer {type(tokenizer).__name__} is not a fast tokenizer; cannot compare "
                              f"it with the datastore's ({name})")
        got = vocab_hash(backend)
        if got != vocab_sha256:
            raise ConfigError(f"{where} was tokenized with {name!r} (vocab sha256 "
                              f"{vocab_sha256[:12]}) but the model's tokenizer differs (vocab sha256 {got[:12]}); "
                              f"rebuild the datastore with `retromem datastore build --tokenizer <the model's tokenizer>`")
    if vocab_size is not None and ds_vocab_size > vocab_size:
        raise ConfigError(f"{where} has token ids up to {ds_vocab_size - 1} ({name}) but the "
                          f"model's vocabulary has {vocab_size}: not the model's tokenizer")


def neighbour_arrays(ds: Any, neighbour_ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Tokens and mask of neighbours ``neighbour_ids`` (..., >=k): ((..., k, 2m) int64, (..., k, 2m) bool).

    A missing neighbour (-1, fewer eligible chunks than k) becomes one masked-in pad token, so that
    every neighbour has something to attend to; with a real index this does not happen."""
    ids = np.asarray(neighbour_ids, dtype=np.int64)[..., :k]
    lead = ids.shape
    flat = ids.reshape(-1)
    have = flat >= 0
    r = 2 * ds.chunk_length
    toks = np.full((len(flat), r), ds.pad_token_id, dtype=np.int64)
    lens = np.ones(len(flat), dtype=np.int64)
    if have.any():
        t, n = ds.neighbour_tokens(flat[have])
        toks[have] = t
        lens[have] = n
    mask = np.arange(r)[None, :] < lens[:, None]
    return toks.reshape(*lead, r), mask.reshape(*lead, r)


# -- the random-neighbour control -------------------------------------------------------------------


class RandomNeighbourTable:
    """A neighbour table that gives each chunk the retrieved neighbours of a random other chunk.

    The control for "any text in the neighbour slots": the neighbours are real retrieved neighbour
    sets (k chunks of the same length, similar to each other, as the model sees in training), only
    retrieved for another query. Each chunk of ``chunk_ids`` gets the row of a donor drawn (seeded)
    from ``table``'s chunks of the training split (all of the table's chunks if it holds none), such
    that neither the donor nor any of its neighbours is from the chunk's own document: no text of
    the evaluated document can leak in through the control. Same interface as
    :class:`~retromem.retro.neighbours.NeighbourTable` (``k``, ``split_spec``, ``lookup``), so
    :class:`RetroDataset` takes either.

    ``donors`` (n,) holds each chunk's donor chunk id, in ``chunk_ids`` order (ascending).
    """

    def __init__(self, table: NeighbourTable, ds: Any, chunk_ids: np.ndarray, *, seed: int = 0,
                 max_rounds: int = 200) -> None:
        self.k, self.split_spec = table.k, table.split_spec
        self.chunk_ids = np.unique(np.asarray(chunk_ids, dtype=np.int64))
        doc_of = np.asarray(ds.chunk_doc_array)
        pool = table.chunk_ids
        train_pool = pool[~self.split_spec.is_eval(doc_of[pool])] if len(pool) else pool
        self.donor_split = "train" if len(train_pool) else "all"
        pool = train_pool if len(train_pool) else pool
        rows = table.lookup(pool)  # (P, k)
        pool_docs = doc_of[pool]  # (P,)
        nb_docs = np.where(rows >= 0, doc_of[np.clip(rows, 0, None)], -1)  # (P, k)
        # a donor with no neighbour at all gives the model nothing to read: not a fair control
        usable = (rows >= 0).any(axis=1)
        pool, rows, pool_docs, nb_docs = pool[usable], rows[usable], pool_docs[usable], nb_docs[usable]
        if len(pool) == 0:
            raise ConfigError("the neighbour table holds no chunk with a neighbour to lend as a random neighbour")
        target_docs = doc_of[self.chunk_ids]  # (n,)
        rng = np.random.default_rng(seed)
        pick = np.full(len(self.chunk_ids), -1, dtype=np.int64)
        todo = np.arange(len(self.chunk_ids))
        for _ in range(max_rounds):  # rejection sampling: redraw only the chunks whose donor shares their document
            if len(todo) == 0:
                break
            cand = rng.integers(0, len(pool), size=len(todo))
            ok = (pool_docs[cand] != target_docs[todo]) & (nb_docs[cand] != target_docs[todo, None]).all(axis=1)
            pick[todo[ok]] = cand[ok]
            todo = todo[~ok]
        if len(todo):
            raise ConfigError(f"found no random donor chunk outside the document of chunk {int(self.chunk_ids[todo[0]])} "
                              f"after {max_rounds} draws: the neighbour table covers too few other documents")
        self.donors = pool[pick]  # (n,)
        self.neighbours = rows[pick]  # (n, k)

    def lookup(self, chunk_ids: np.ndarray) -> np.ndarray:
        """(n, k) neighbour ids lent to ``chunk_ids``; ConfigError for a chunk the table was not built for."""
        q = np.asarray(chunk_ids, dtype=np.int64)
        pos = np.minimum(np.searchsorted(self.chunk_ids, q), max(len(self.chunk_ids) - 1, 0))
        if len(q) and (len(self.chunk_ids) == 0 or not bool((self.chunk_ids[pos] == q).all())):
            raise ConfigError("RandomNeighbourTable.lookup: a chunk outside the chunks it was built for")
        return self.neighbours[pos]

    def donor_of(self, chunk_ids: np.ndarray) -> np.ndarray:
        """(n,) the donor chunk whose neighbours each of ``chunk_ids`` reads."""
        q = np.asarray(chunk_ids, dtype=np.int64)
        return self.donors[np.searchsorted(self.chunk_ids, q)]


# -- the dataset ---------------------------------------------------------------------------------------


class RetroDataset(torch.utils.data.Dataset):
    """Sequences of ``seq_chunks`` consecutive chunks of a split, with their neighbours.

    Item: ``input_ids`` (T,), ``labels`` (T,) (-100 on padding), ``neighbour_ids`` (C, k, r),
    ``neighbour_attention_mask`` (C, k, r), where T = C * m. ``with_neighbours=False`` leaves the
    neighbour fields out (the model without retrieval).
    """

    def __init__(self, ds: Any, chunk_ids: np.ndarray, seq_chunks: int,
                 table: NeighbourTable | RandomNeighbourTable | None = None,
                 k: int | None = None, max_sequences: int | None = None, with_neighbours: bool = True) -> None:
        positive_int(seq_chunks, "seq_chunks", flag="--seq-chunks")
        if with_neighbours and table is None:
            raise ConfigError("a dataset with neighbours needs a NeighbourTable")
        self.ds, self.seq_chunks, self.table = ds, seq_chunks, table
        self.with_neighbours = with_neighbours
        self.k = k if k is not None else (table.k if table is not None else 0)
        if table is not None and self.k > table.k:
            raise ConfigError(f"`num_neighbours` is {self.k} but the neighbours were retrieved with k={table.k}")
        chunk_ids = np.asarray(chunk_ids, dtype=np.int64)
        n = len(chunk_ids) // seq_chunks
        if n == 0:
            raise ConfigError(f"the split has {len(chunk_ids)} chunks, fewer than one sequence of {seq_chunks}")
        self.windows = chunk_ids[: n * seq_chunks].reshape(n, seq_chunks)  # (n_sequences, C)
        if max_sequences is not None and max_sequences < n:
            # evenly spread over the split rather than its first documents
            pick = np.linspace(0, n - 1, max_sequences).round().astype(np.int64)
            self.windows = self.windows[np.unique(pick)]
        if with_neighbours:
            self.neighbours = table.lookup(self.windows.reshape(-1)).reshape(len(self.windows), seq_chunks, -1)

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = self.windows[i]
        toks = np.asarray(self.ds.token_array[ids], dtype=np.int64)  # (C, m)
        ntok = np.asarray(self.ds.chunk_ntokens_array[ids])
        labels = np.where(np.arange(toks.shape[1])[None, :] < ntok[:, None], toks, -100)
        item = {"input_ids": torch.from_numpy(toks.reshape(-1)), "labels": torch.from_numpy(labels.reshape(-1))}
        if self.with_neighbours:
            nt, nm = neighbour_arrays(self.ds, self.neighbours[i], self.k)
            item["neighbour_ids"] = torch.from_numpy(nt)  # (C, k, r)
            item["neighbour_attention_mask"] = torch.from_numpy(nm)  # (C, k, r)
        return item

"""Document splits for RETRO: which documents are held out.

Splits are by document, deterministic: a document is held out when a hash of (``split_seed``,
``doc_id``) falls below ``eval_fraction``, so the same documents are held out by the neighbours
job, training and evaluation, whatever order they run in, and no held-out document is ever a
training sequence.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from retromem.config import integer, number, one_of

SPLITS = ("train", "eval", "all")


@dataclass(frozen=True)
class SplitSpec:
    """Held-out documents: those whose hash of (seed, doc_id) is below ``eval_fraction``."""

    eval_fraction: float = 0.05
    seed: int = 0

    def __post_init__(self) -> None:
        number(self.eval_fraction, "eval_fraction", ge=0, lt=1, flag="--eval-fraction")
        integer(self.seed, "split_seed", flag="--split-seed")

    def is_eval(self, doc_ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """(n,) bool: True for held-out documents."""
        out = np.empty(len(doc_ids), dtype=bool)
        for i, d in enumerate(np.asarray(doc_ids, dtype=np.int64).tolist()):
            h = hashlib.blake2b(f"{self.seed}:{d}".encode(), digest_size=8).digest()
            out[i] = int.from_bytes(h, "little") / 2**64 < self.eval_fraction
        return out

    def doc_ids(self, num_documents: int, split: str) -> np.ndarray:
        check_split(split)
        docs = np.arange(num_documents, dtype=np.int64)
        if split == "all":
            return docs
        held = self.is_eval(docs)
        return docs[held] if split == "eval" else docs[~held]

    def chunk_ids(self, ds: Any, split: str) -> np.ndarray:
        """Chunk ids (ascending) of the split's documents in datastore ``ds``."""
        first = np.asarray(ds.doc_first_chunk_array)
        docs = self.doc_ids(ds.num_documents, split)
        if len(docs) == 0:
            return np.zeros(0, np.int64)
        return np.concatenate([np.arange(first[d], first[d + 1], dtype=np.int64) for d in docs])

    def as_dict(self) -> dict[str, Any]:
        return {"eval_fraction": float(self.eval_fraction), "seed": int(self.seed)}


def check_split(split: str) -> None:
    one_of(split, "split", SPLITS, flag="--split")

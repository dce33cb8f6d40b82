"""The datastore: corpora normalized, deduplicated, tokenized and cut into fixed-length token
chunks, stored as Parquet shards with a manifest plus memory-mapped arrays for O(1) access.

>>> from datastore import Datastore
>>> ds = Datastore.open("retromem-demo/datastore")
>>> tokens, lengths = ds.neighbour_tokens([0, 1, 2])   # chunk + continuation, RETRO's unit
"""

from retromem.datastore.pipeline import AddResult, BuildConfig, BuildResult, add, build
from retromem.datastore.segments import SegmentInfo
from retromem.datastore.store import Chunk, Datastore, Document

__all__ = ["AddResult", "BuildConfig", "BuildResult", "Chunk", "Datastore", "Document", "SegmentInfo", "add", "build"]

"""A LlamaIndex retriever over retromem: :class:`RetromemRetriever` is a ``llama_index.core``
``BaseRetriever`` searching a dense index in this process (:meth:`RetromemRetriever.from_index`) or
a running retrieval service over gRPC (:meth:`RetromemRetriever.from_server`), usable on its own
(``retrieve`` / ``aretrieve``) or inside a query engine (``RetrieverQueryEngine.from_args``).

Each hit is a ``NodeWithScore``: a ``TextNode`` with the chunk's text, id ``chunk-<chunk_id>``,
metadata ``doc_id``, ``chunk_id``, ``source_id``, ``score``, ``continuation_id`` and the document's
own metadata under ``metadata`` (kept out of the text an LLM or an embedder sees), a SOURCE
relationship to its document and a NEXT one to its continuation; the score is the index's (higher
is better). The query string is embedded with the index's recorded query prompt, wherever the index
lives (a ``QueryBundle``'s own embedding is not used: it may come from another model). Needs the
``llamaindex`` extra (``pip install retromem[llamaindex]``).
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any, Sequence

from llama_index.core.retrievers import BaseRetriever
from llama_index.core.schema import NodeRelationship, NodeWithScore, QueryBundle, RelatedNodeInfo, TextNode

from retromem.service.retrievers import HIT_KEYS, RetrievedChunk, SearchOptions, open_client, open_index, options, search_one

__all__ = ["RetromemRetriever"]


class RetromemRetriever(BaseRetriever):
    """LlamaIndex retriever over a retromem dense index or retrieval service (see the module docstring).

    ``searcher``: a :class:`retromem.index.dense.DenseIndex` or a
    :class:`retromem.service.client.RetrievalClient` (or anything with their ``search`` verb).
    """

    def __init__(self, searcher: Any, options: SearchOptions | None = None, **kwargs: Any) -> None:
        """``kwargs``: callback_manager, verbose, as LlamaIndex's ``BaseRetriever`` takes."""
        if not callable(getattr(searcher, "search", None)):
            raise TypeError(f"the searcher must have DenseIndex's search(queries, k, ...) verb, got {type(searcher).__name__}")
        self.searcher = searcher
        self.options = options or SearchOptions()
        super().__init__(**kwargs)

    @classmethod
    def from_index(cls, path: str | Path, *, k: int = 4, exclude_doc_ids: Sequence[int] | None = None,
                   datastore: Any = None, **kwargs: Any) -> "RetromemRetriever":
        """Over the dense index at ``path``, in this process; ``kwargs``: nprobe, ef_search, filters,
        with_continuation."""
        return cls(open_index(path, datastore), options(k, exclude_doc_ids, **kwargs))

    @classmethod
    def from_server(cls, target: str, *, k: int = 4, exclude_doc_ids: Sequence[int] | None = None,
                    token: str | None = None, tls_ca: Any = None, timeout: float = 30.0,
                    **kwargs: Any) -> "RetromemRetriever":
        """Over the retrieval service at ``target`` (host:port), through the gRPC client."""
        return cls(open_client(target, token=token, tls_ca=tls_ca, timeout=timeout), options(k, exclude_doc_ids, **kwargs))

    def _nodes(self, query: str) -> list[NodeWithScore]:
        return [NodeWithScore(node=_node(h), score=h.score) for h in search_one(self.searcher, query, self.options)]

    def _retrieve(self, query_bundle: QueryBundle) -> list[NodeWithScore]:
        return self._nodes(query_bundle.query_str)

    async def _aretrieve(self, query_bundle: QueryBundle) -> list[NodeWithScore]:
        # FAISS, the embedder and the gRPC client all block: run them off the event loop
        return await asyncio.to_thread(self._nodes, query_bundle.query_str)


def _node(h: RetrievedChunk) -> TextNode:
    keys = [*HIT_KEYS, "metadata", "continuation"]
    rel = {NodeRelationship.SOURCE: RelatedNodeInfo(node_id=h.source_id or f"doc-{h.doc_id}",
                                                    metadata={"doc_id": h.doc_id})}
    if h.continuation_id is not None:
        rel[NodeRelationship.NEXT] = RelatedNodeInfo(node_id=f"chunk-{h.continuation_id}")
    return TextNode(id_=f"chunk-{h.chunk_id}", text=h.text, metadata=h.fields(), relationships=rel,
                    excluded_llm_metadata_keys=keys, excluded_embed_metadata_keys=keys)

"""A LangChain retriever over retromem: :class:`RetromemRetriever` is a ``langchain_core``
``BaseRetriever`` searching a dense index in this process (:meth:`RetromemRetriever.from_index`) or
a running retrieval service over gRPC (:meth:`RetromemRetriever.from_server`), so it drops into any
chain (``retriever.invoke(query)``, ``await retriever.ainvoke(query)``, ``retriever.batch([...])``).

Each hit is a ``Document`` whose ``page_content`` is the chunk's text and whose ``metadata`` holds
``doc_id``, ``chunk_id``, ``source_id`` (the document's id in the input), ``score`` (higher is
better, under the index's similarity), ``continuation_id`` and the document's own metadata under
``metadata`` (see :class:`retromem.service.retrievers.RetrievedChunk`). The query is embedded with
the index's recorded query prompt, wherever the index lives. Needs the ``langchain`` extra
(``pip install retromem[langchain]``).
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any, Sequence

from langchain_core.callbacks import AsyncCallbackManagerForRetrieverRun, CallbackManagerForRetrieverRun
from langchain_core.documents import Document
from langchain_core.retrievers import BaseRetriever
from pydantic import ConfigDict, Field

from retromem.service.retrievers import SearchOptions, open_client, open_index, options, search_one

__all__ = ["RetromemRetriever"]


class RetromemRetriever(BaseRetriever):
    """LangChain retriever over a retromem dense index or retrieval service (see the module docstring).

    ``searcher``: a :class:`retromem.index.dense.DenseIndex` or a
    :class:`retromem.service.client.RetrievalClient` (or anything with their ``search`` verb);
    ``options``: k, excluded documents, FAISS parameters, filters, continuation.
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    searcher: Any
    options: SearchOptions = Field(default_factory=SearchOptions)

    @classmethod
    def from_index(cls, path: str | Path, *, k: int = 4, exclude_doc_ids: Sequence[int] | None = None,
                   datastore: Any = None, **kwargs: Any) -> "RetromemRetriever":
        """Over the dense index at ``path``, in this process; ``kwargs``: nprobe, ef_search, filters,
        with_continuation."""
        return cls(searcher=open_index(path, datastore), options=options(k, exclude_doc_ids, **kwargs))

    @classmethod
    def from_server(cls, target: str, *, k: int = 4, exclude_doc_ids: Sequence[int] | None = None,
                    token: str | None = None, tls_ca: Any = None, timeout: float = 30.0,
                    **kwargs: Any) -> "RetromemRetriever":
        """Over the retrieval service at ``target`` (host:port), through the gRPC client."""
        client = open_client(target, token=token, tls_ca=tls_ca, timeout=timeout)
        return cls(searcher=client, options=options(k, exclude_doc_ids, **kwargs))

    def _documents(self, query: str) -> list[Document]:
        return [Document(page_content=h.text, metadata=h.fields(), id=f"chunk-{h.chunk_id}")
                for h in search_one(self.searcher, query, self.options)]

    def _get_relevant_documents(self, query: str, *, run_manager: CallbackManagerForRetrieverRun) -> list[Document]:
        return self._documents(query)

    async def _aget_relevant_documents(self, query: str, *,
                                       run_manager: AsyncCallbackManagerForRetrieverRun) -> list[Document]:
        # FAISS, the embedder and the gRPC client all block: run them off the event loop
        return await asyncio.to_thread(self._documents, query)

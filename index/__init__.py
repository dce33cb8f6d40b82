"""Indexes over the datastore, one job per module.

- dense retrieval (sentence-transformers + FAISS): :mod:`~retromem.index.embed` (chunk embeddings),
  :mod:`~retromem.index.factory` (factory strings, the choice from a memory budget),
  :mod:`~retromem.index.dense_build` (the resumable build), :mod:`~retromem.index.dense` (the
  searcher, :class:`DenseIndex`), :mod:`~retromem.index.dense_eval` (exact search, tuning,
  evaluation), :mod:`~retromem.index.dense_faiss` (FAISS files, GPU placement, search parameters);
- exact n-gram search: :mod:`~retromem.index.ngram_build` (infini-gram layout and indexer),
  :mod:`~retromem.index.ngram` (the query engine, :class:`NgramIndex`),
  :mod:`~retromem.index.ngram_lm` (the ∞-gram language model), :mod:`~retromem.index.fm_index`
  (the compressed FM-index);
- :mod:`~retromem.index.types`: every result type, shared by all of them;
  :mod:`~retromem.index.plan`: sizing for any corpus.
"""

"""Indexes over the datastore: dense (sentence-transformers + FAISS) and exact n-gram
(suffix array via infini-gram, FM-index). Result types shared by both live in :mod:`retromem.index.types`."""

"""Indexes over the datastore: dense (sentence-transformers + FAISS) and exact n-gram
(suffix array, FM-index). Not built yet: see the dense-retrieval and n-gram issues."""

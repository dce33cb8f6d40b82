"""The datastore's Parquet schemas: explicit constants, never inferred from data."""

from __future__ import annotations

import pyarrow as pa

FORMAT_VERSION = 1

# One row per kept document, in doc_id order. `text` is the normalized text that was tokenized.
DOCUMENTS_SCHEMA = pa.schema(
    [
        pa.field("doc_id", pa.int64(), nullable=False),
        pa.field("source", pa.string(), nullable=False),  # input file the document came from
        pa.field("source_id", pa.string(), nullable=False),  # its id there (or file:line)
        pa.field("text", pa.large_string(), nullable=False),
        pa.field("content_hash", pa.string(), nullable=False),  # blake2b-128 of text, hex
        pa.field("n_tokens", pa.int64(), nullable=False),
        pa.field("first_chunk_id", pa.int64(), nullable=False),
        pa.field("n_chunks", pa.int64(), nullable=False),
    ]
)

# One row per chunk, in chunk_id order. Chunk k of a document holds its tokens
# [k*L, (k+1)*L) and its characters [char_start, char_end); the spans tile the document.
CHUNKS_SCHEMA = pa.schema(
    [
        pa.field("chunk_id", pa.int64(), nullable=False),
        pa.field("doc_id", pa.int64(), nullable=False),
        pa.field("position", pa.int32(), nullable=False),  # chunk index within the document
        pa.field("char_start", pa.int64(), nullable=False),
        pa.field("char_end", pa.int64(), nullable=False),
        pa.field("tokens", pa.list_(pa.uint32()), nullable=False),
    ]
)

# One row per document that did not make it into the datastore, and why.
REMOVED_SCHEMA = pa.schema(
    [
        pa.field("source", pa.string(), nullable=False),
        pa.field("source_id", pa.string(), nullable=False),
        pa.field("reason", pa.string(), nullable=False),  # exact_duplicate | near_duplicate
        pa.field("content_hash", pa.string(), nullable=False),
    ]
)

# Internal: documents after ingest (normalized, hashed), before dedup.
STAGED_SCHEMA = pa.schema(
    [
        pa.field("source", pa.string(), nullable=False),
        pa.field("source_id", pa.string(), nullable=False),
        pa.field("text", pa.large_string(), nullable=False),
        pa.field("content_hash", pa.binary(16), nullable=False),
        pa.field("band_keys", pa.list_(pa.uint64()), nullable=False),
        pa.field("metadata", pa.large_string(), nullable=True),  # the record's extra fields as JSON, or null
    ]
)

# Metadata: every extra field of the inputs (url, lang, licence, ...) becomes a typed column of the
# documents Parquet named METADATA_PREFIX + field (so a field called "source" or "text" cannot
# collide with the columns above); the manifest declares field -> type name.
METADATA_PREFIX = "metadata."
METADATA_TYPES = {"string": pa.string(), "int64": pa.int64(), "double": pa.float64(), "bool": pa.bool_(),
                  "json": pa.string()}  # json: nested values (lists, objects) kept as JSON text


def metadata_arrow_type(name: str) -> pa.DataType:
    return METADATA_TYPES[name]

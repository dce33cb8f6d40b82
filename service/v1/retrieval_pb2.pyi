from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Fetch(_message.Message):
    __slots__ = ("text", "tokens", "continuation")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    CONTINUATION_FIELD_NUMBER: _ClassVar[int]
    text: bool
    tokens: bool
    continuation: bool
    def __init__(self, text: _Optional[bool] = ..., tokens: _Optional[bool] = ..., continuation: _Optional[bool] = ...) -> None: ...

class Chunk(_message.Message):
    __slots__ = ("chunk_id", "doc_id", "text", "tokens", "continuation_id", "continuation_text", "continuation_tokens", "source_id", "metadata")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: MetadataValue
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[MetadataValue, _Mapping]] = ...) -> None: ...
    CHUNK_ID_FIELD_NUMBER: _ClassVar[int]
    DOC_ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    CONTINUATION_ID_FIELD_NUMBER: _ClassVar[int]
    CONTINUATION_TEXT_FIELD_NUMBER: _ClassVar[int]
    CONTINUATION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SOURCE_ID_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    chunk_id: int
    doc_id: int
    text: str
    tokens: _containers.RepeatedScalarFieldContainer[int]
    continuation_id: int
    continuation_text: str
    continuation_tokens: _containers.RepeatedScalarFieldContainer[int]
    source_id: str
    metadata: _containers.MessageMap[str, MetadataValue]
    def __init__(self, chunk_id: _Optional[int] = ..., doc_id: _Optional[int] = ..., text: _Optional[str] = ..., tokens: _Optional[_Iterable[int]] = ..., continuation_id: _Optional[int] = ..., continuation_text: _Optional[str] = ..., continuation_tokens: _Optional[_Iterable[int]] = ..., source_id: _Optional[str] = ..., metadata: _Optional[_Mapping[str, MetadataValue]] = ...) -> None: ...

class MetadataValue(_message.Message):
    __slots__ = ("text", "int", "real", "flag")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    INT_FIELD_NUMBER: _ClassVar[int]
    REAL_FIELD_NUMBER: _ClassVar[int]
    FLAG_FIELD_NUMBER: _ClassVar[int]
    text: str
    int: int
    real: float
    flag: bool
    def __init__(self, text: _Optional[str] = ..., int: _Optional[int] = ..., real: _Optional[float] = ..., flag: _Optional[bool] = ...) -> None: ...

class MetadataFilter(_message.Message):
    __slots__ = ("field", "values")
    FIELD_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    field: str
    values: _containers.RepeatedCompositeFieldContainer[MetadataValue]
    def __init__(self, field: _Optional[str] = ..., values: _Optional[_Iterable[_Union[MetadataValue, _Mapping]]] = ...) -> None: ...

class Vector(_message.Message):
    __slots__ = ("values",)
    VALUES_FIELD_NUMBER: _ClassVar[int]
    values: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, values: _Optional[_Iterable[float]] = ...) -> None: ...

class Query(_message.Message):
    __slots__ = ("text", "vector", "exclude_doc_ids")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    VECTOR_FIELD_NUMBER: _ClassVar[int]
    EXCLUDE_DOC_IDS_FIELD_NUMBER: _ClassVar[int]
    text: bytes
    vector: Vector
    exclude_doc_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, text: _Optional[bytes] = ..., vector: _Optional[_Union[Vector, _Mapping]] = ..., exclude_doc_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class SearchRequest(_message.Message):
    __slots__ = ("queries", "k", "nprobe", "ef_search", "fetch", "filters")
    QUERIES_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    NPROBE_FIELD_NUMBER: _ClassVar[int]
    EF_SEARCH_FIELD_NUMBER: _ClassVar[int]
    FETCH_FIELD_NUMBER: _ClassVar[int]
    FILTERS_FIELD_NUMBER: _ClassVar[int]
    queries: _containers.RepeatedCompositeFieldContainer[Query]
    k: int
    nprobe: int
    ef_search: int
    fetch: Fetch
    filters: _containers.RepeatedCompositeFieldContainer[MetadataFilter]
    def __init__(self, queries: _Optional[_Iterable[_Union[Query, _Mapping]]] = ..., k: _Optional[int] = ..., nprobe: _Optional[int] = ..., ef_search: _Optional[int] = ..., fetch: _Optional[_Union[Fetch, _Mapping]] = ..., filters: _Optional[_Iterable[_Union[MetadataFilter, _Mapping]]] = ...) -> None: ...

class QueryResult(_message.Message):
    __slots__ = ("chunk_ids", "scores", "chunks")
    CHUNK_IDS_FIELD_NUMBER: _ClassVar[int]
    SCORES_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    chunk_ids: _containers.RepeatedScalarFieldContainer[int]
    scores: _containers.RepeatedScalarFieldContainer[float]
    chunks: _containers.RepeatedCompositeFieldContainer[Chunk]
    def __init__(self, chunk_ids: _Optional[_Iterable[int]] = ..., scores: _Optional[_Iterable[float]] = ..., chunks: _Optional[_Iterable[_Union[Chunk, _Mapping]]] = ...) -> None: ...

class SearchResponse(_message.Message):
    __slots__ = ("results", "request_index", "query_offset", "missing_shards")
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_INDEX_FIELD_NUMBER: _ClassVar[int]
    QUERY_OFFSET_FIELD_NUMBER: _ClassVar[int]
    MISSING_SHARDS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[QueryResult]
    request_index: int
    query_offset: int
    missing_shards: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, results: _Optional[_Iterable[_Union[QueryResult, _Mapping]]] = ..., request_index: _Optional[int] = ..., query_offset: _Optional[int] = ..., missing_shards: _Optional[_Iterable[str]] = ...) -> None: ...

class GetChunksRequest(_message.Message):
    __slots__ = ("chunk_ids", "fetch")
    CHUNK_IDS_FIELD_NUMBER: _ClassVar[int]
    FETCH_FIELD_NUMBER: _ClassVar[int]
    chunk_ids: _containers.RepeatedScalarFieldContainer[int]
    fetch: Fetch
    def __init__(self, chunk_ids: _Optional[_Iterable[int]] = ..., fetch: _Optional[_Union[Fetch, _Mapping]] = ...) -> None: ...

class GetChunksResponse(_message.Message):
    __slots__ = ("chunks",)
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    chunks: _containers.RepeatedCompositeFieldContainer[Chunk]
    def __init__(self, chunks: _Optional[_Iterable[_Union[Chunk, _Mapping]]] = ...) -> None: ...

class GetDocumentRequest(_message.Message):
    __slots__ = ("doc_id", "omit_text")
    DOC_ID_FIELD_NUMBER: _ClassVar[int]
    OMIT_TEXT_FIELD_NUMBER: _ClassVar[int]
    doc_id: int
    omit_text: bool
    def __init__(self, doc_id: _Optional[int] = ..., omit_text: _Optional[bool] = ...) -> None: ...

class Document(_message.Message):
    __slots__ = ("doc_id", "source_id", "source", "metadata", "text", "first_chunk_id", "num_chunks", "num_tokens")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: MetadataValue
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[MetadataValue, _Mapping]] = ...) -> None: ...
    DOC_ID_FIELD_NUMBER: _ClassVar[int]
    SOURCE_ID_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    FIRST_CHUNK_ID_FIELD_NUMBER: _ClassVar[int]
    NUM_CHUNKS_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    doc_id: int
    source_id: str
    source: str
    metadata: _containers.MessageMap[str, MetadataValue]
    text: str
    first_chunk_id: int
    num_chunks: int
    num_tokens: int
    def __init__(self, doc_id: _Optional[int] = ..., source_id: _Optional[str] = ..., source: _Optional[str] = ..., metadata: _Optional[_Mapping[str, MetadataValue]] = ..., text: _Optional[str] = ..., first_chunk_id: _Optional[int] = ..., num_chunks: _Optional[int] = ..., num_tokens: _Optional[int] = ...) -> None: ...

class GetDocumentResponse(_message.Message):
    __slots__ = ("document",)
    DOCUMENT_FIELD_NUMBER: _ClassVar[int]
    document: Document
    def __init__(self, document: _Optional[_Union[Document, _Mapping]] = ...) -> None: ...

class ReloadRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ReloadResponse(_message.Message):
    __slots__ = ("version", "version_id", "num_documents", "num_chunks", "deleted_documents", "dense_ntotal", "seconds")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    VERSION_ID_FIELD_NUMBER: _ClassVar[int]
    NUM_DOCUMENTS_FIELD_NUMBER: _ClassVar[int]
    NUM_CHUNKS_FIELD_NUMBER: _ClassVar[int]
    DELETED_DOCUMENTS_FIELD_NUMBER: _ClassVar[int]
    DENSE_NTOTAL_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    version: int
    version_id: str
    num_documents: int
    num_chunks: int
    deleted_documents: int
    dense_ntotal: int
    seconds: float
    def __init__(self, version: _Optional[int] = ..., version_id: _Optional[str] = ..., num_documents: _Optional[int] = ..., num_chunks: _Optional[int] = ..., deleted_documents: _Optional[int] = ..., dense_ntotal: _Optional[int] = ..., seconds: _Optional[float] = ...) -> None: ...

class TokenIds(_message.Message):
    __slots__ = ("ids",)
    IDS_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, ids: _Optional[_Iterable[int]] = ...) -> None: ...

class NgramQuery(_message.Message):
    __slots__ = ("text", "ids")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    IDS_FIELD_NUMBER: _ClassVar[int]
    text: bytes
    ids: TokenIds
    def __init__(self, text: _Optional[bytes] = ..., ids: _Optional[_Union[TokenIds, _Mapping]] = ...) -> None: ...

class Token(_message.Message):
    __slots__ = ("text", "id")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    text: bytes
    id: int
    def __init__(self, text: _Optional[bytes] = ..., id: _Optional[int] = ...) -> None: ...

class NgramRequest(_message.Message):
    __slots__ = ("query", "top_k")
    QUERY_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    query: NgramQuery
    top_k: int
    def __init__(self, query: _Optional[_Union[NgramQuery, _Mapping]] = ..., top_k: _Optional[int] = ...) -> None: ...

class CountBatchRequest(_message.Message):
    __slots__ = ("queries",)
    QUERIES_FIELD_NUMBER: _ClassVar[int]
    queries: _containers.RepeatedCompositeFieldContainer[NgramQuery]
    def __init__(self, queries: _Optional[_Iterable[_Union[NgramQuery, _Mapping]]] = ...) -> None: ...

class CountBatchResponse(_message.Message):
    __slots__ = ("counts", "approx", "missing_shards")
    COUNTS_FIELD_NUMBER: _ClassVar[int]
    APPROX_FIELD_NUMBER: _ClassVar[int]
    MISSING_SHARDS_FIELD_NUMBER: _ClassVar[int]
    counts: _containers.RepeatedScalarFieldContainer[int]
    approx: _containers.RepeatedScalarFieldContainer[bool]
    missing_shards: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, counts: _Optional[_Iterable[int]] = ..., approx: _Optional[_Iterable[bool]] = ..., missing_shards: _Optional[_Iterable[str]] = ...) -> None: ...

class CountResponse(_message.Message):
    __slots__ = ("count", "approx", "token_ids", "missing_shards")
    COUNT_FIELD_NUMBER: _ClassVar[int]
    APPROX_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    MISSING_SHARDS_FIELD_NUMBER: _ClassVar[int]
    count: int
    approx: bool
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    missing_shards: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, count: _Optional[int] = ..., approx: _Optional[bool] = ..., token_ids: _Optional[_Iterable[int]] = ..., missing_shards: _Optional[_Iterable[str]] = ...) -> None: ...

class ProbRequest(_message.Message):
    __slots__ = ("prompt", "next_token")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    NEXT_TOKEN_FIELD_NUMBER: _ClassVar[int]
    prompt: NgramQuery
    next_token: Token
    def __init__(self, prompt: _Optional[_Union[NgramQuery, _Mapping]] = ..., next_token: _Optional[_Union[Token, _Mapping]] = ...) -> None: ...

class ProbResponse(_message.Message):
    __slots__ = ("prompt_count", "cont_count", "prob", "suffix_len", "missing_shards")
    PROMPT_COUNT_FIELD_NUMBER: _ClassVar[int]
    CONT_COUNT_FIELD_NUMBER: _ClassVar[int]
    PROB_FIELD_NUMBER: _ClassVar[int]
    SUFFIX_LEN_FIELD_NUMBER: _ClassVar[int]
    MISSING_SHARDS_FIELD_NUMBER: _ClassVar[int]
    prompt_count: int
    cont_count: int
    prob: float
    suffix_len: int
    missing_shards: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, prompt_count: _Optional[int] = ..., cont_count: _Optional[int] = ..., prob: _Optional[float] = ..., suffix_len: _Optional[int] = ..., missing_shards: _Optional[_Iterable[str]] = ...) -> None: ...

class TokenCount(_message.Message):
    __slots__ = ("token_id", "count", "prob", "text")
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    PROB_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    token_id: int
    count: int
    prob: float
    text: str
    def __init__(self, token_id: _Optional[int] = ..., count: _Optional[int] = ..., prob: _Optional[float] = ..., text: _Optional[str] = ...) -> None: ...

class DistributionResponse(_message.Message):
    __slots__ = ("prompt_count", "tokens", "approx", "suffix_len", "missing_shards")
    PROMPT_COUNT_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    APPROX_FIELD_NUMBER: _ClassVar[int]
    SUFFIX_LEN_FIELD_NUMBER: _ClassVar[int]
    MISSING_SHARDS_FIELD_NUMBER: _ClassVar[int]
    prompt_count: int
    tokens: _containers.RepeatedCompositeFieldContainer[TokenCount]
    approx: bool
    suffix_len: int
    missing_shards: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, prompt_count: _Optional[int] = ..., tokens: _Optional[_Iterable[_Union[TokenCount, _Mapping]]] = ..., approx: _Optional[bool] = ..., suffix_len: _Optional[int] = ..., missing_shards: _Optional[_Iterable[str]] = ...) -> None: ...

class NextTokensRequest(_message.Message):
    __slots__ = ("contexts", "depth", "max_occurrences", "min_suffix", "max_suffix")
    CONTEXTS_FIELD_NUMBER: _ClassVar[int]
    DEPTH_FIELD_NUMBER: _ClassVar[int]
    MAX_OCCURRENCES_FIELD_NUMBER: _ClassVar[int]
    MIN_SUFFIX_FIELD_NUMBER: _ClassVar[int]
    MAX_SUFFIX_FIELD_NUMBER: _ClassVar[int]
    contexts: _containers.RepeatedCompositeFieldContainer[TokenIds]
    depth: int
    max_occurrences: int
    min_suffix: int
    max_suffix: int
    def __init__(self, contexts: _Optional[_Iterable[_Union[TokenIds, _Mapping]]] = ..., depth: _Optional[int] = ..., max_occurrences: _Optional[int] = ..., min_suffix: _Optional[int] = ..., max_suffix: _Optional[int] = ...) -> None: ...

class Continuation(_message.Message):
    __slots__ = ("ids", "count")
    IDS_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[int]
    count: int
    def __init__(self, ids: _Optional[_Iterable[int]] = ..., count: _Optional[int] = ...) -> None: ...

class ContextContinuations(_message.Message):
    __slots__ = ("suffix_len", "count", "read", "approx", "continuations")
    SUFFIX_LEN_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    READ_FIELD_NUMBER: _ClassVar[int]
    APPROX_FIELD_NUMBER: _ClassVar[int]
    CONTINUATIONS_FIELD_NUMBER: _ClassVar[int]
    suffix_len: int
    count: int
    read: int
    approx: bool
    continuations: _containers.RepeatedCompositeFieldContainer[Continuation]
    def __init__(self, suffix_len: _Optional[int] = ..., count: _Optional[int] = ..., read: _Optional[int] = ..., approx: _Optional[bool] = ..., continuations: _Optional[_Iterable[_Union[Continuation, _Mapping]]] = ...) -> None: ...

class NextTokensResponse(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[ContextContinuations]
    def __init__(self, results: _Optional[_Iterable[_Union[ContextContinuations, _Mapping]]] = ...) -> None: ...

class Occurrence(_message.Message):
    __slots__ = ("doc_id", "chunk_id", "offset", "chunk_offset")
    DOC_ID_FIELD_NUMBER: _ClassVar[int]
    CHUNK_ID_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    CHUNK_OFFSET_FIELD_NUMBER: _ClassVar[int]
    doc_id: int
    chunk_id: int
    offset: int
    chunk_offset: int
    def __init__(self, doc_id: _Optional[int] = ..., chunk_id: _Optional[int] = ..., offset: _Optional[int] = ..., chunk_offset: _Optional[int] = ...) -> None: ...

class FindRequest(_message.Message):
    __slots__ = ("query", "limit", "fetch")
    QUERY_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    FETCH_FIELD_NUMBER: _ClassVar[int]
    query: NgramQuery
    limit: int
    fetch: Fetch
    def __init__(self, query: _Optional[_Union[NgramQuery, _Mapping]] = ..., limit: _Optional[int] = ..., fetch: _Optional[_Union[Fetch, _Mapping]] = ...) -> None: ...

class FindResponse(_message.Message):
    __slots__ = ("count", "occurrences", "chunks", "missing_shards")
    COUNT_FIELD_NUMBER: _ClassVar[int]
    OCCURRENCES_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    MISSING_SHARDS_FIELD_NUMBER: _ClassVar[int]
    count: int
    occurrences: _containers.RepeatedCompositeFieldContainer[Occurrence]
    chunks: _containers.RepeatedCompositeFieldContainer[Chunk]
    missing_shards: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, count: _Optional[int] = ..., occurrences: _Optional[_Iterable[_Union[Occurrence, _Mapping]]] = ..., chunks: _Optional[_Iterable[_Union[Chunk, _Mapping]]] = ..., missing_shards: _Optional[_Iterable[str]] = ...) -> None: ...

class Clause(_message.Message):
    __slots__ = ("terms",)
    TERMS_FIELD_NUMBER: _ClassVar[int]
    terms: _containers.RepeatedCompositeFieldContainer[NgramQuery]
    def __init__(self, terms: _Optional[_Iterable[_Union[NgramQuery, _Mapping]]] = ...) -> None: ...

class SearchDocumentsRequest(_message.Message):
    __slots__ = ("clauses", "max_hits", "max_diff_tokens", "fetch")
    CLAUSES_FIELD_NUMBER: _ClassVar[int]
    MAX_HITS_FIELD_NUMBER: _ClassVar[int]
    MAX_DIFF_TOKENS_FIELD_NUMBER: _ClassVar[int]
    FETCH_FIELD_NUMBER: _ClassVar[int]
    clauses: _containers.RepeatedCompositeFieldContainer[Clause]
    max_hits: int
    max_diff_tokens: int
    fetch: Fetch
    def __init__(self, clauses: _Optional[_Iterable[_Union[Clause, _Mapping]]] = ..., max_hits: _Optional[int] = ..., max_diff_tokens: _Optional[int] = ..., fetch: _Optional[_Union[Fetch, _Mapping]] = ...) -> None: ...

class SearchDocumentsResponse(_message.Message):
    __slots__ = ("count", "approx", "hits", "doc_ids", "chunks", "missing_shards")
    COUNT_FIELD_NUMBER: _ClassVar[int]
    APPROX_FIELD_NUMBER: _ClassVar[int]
    HITS_FIELD_NUMBER: _ClassVar[int]
    DOC_IDS_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    MISSING_SHARDS_FIELD_NUMBER: _ClassVar[int]
    count: int
    approx: bool
    hits: _containers.RepeatedCompositeFieldContainer[Occurrence]
    doc_ids: _containers.RepeatedScalarFieldContainer[int]
    chunks: _containers.RepeatedCompositeFieldContainer[Chunk]
    missing_shards: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, count: _Optional[int] = ..., approx: _Optional[bool] = ..., hits: _Optional[_Iterable[_Union[Occurrence, _Mapping]]] = ..., doc_ids: _Optional[_Iterable[int]] = ..., chunks: _Optional[_Iterable[_Union[Chunk, _Mapping]]] = ..., missing_shards: _Optional[_Iterable[str]] = ...) -> None: ...

class InfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class DatastoreInfo(_message.Message):
    __slots__ = ("datastore_id", "num_documents", "num_chunks", "chunk_length", "num_tokens", "tokenizer", "vocab_size", "vocab_sha256", "text_bytes", "version", "version_id", "deleted_documents", "metadata_fields")
    class MetadataFieldsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    DATASTORE_ID_FIELD_NUMBER: _ClassVar[int]
    NUM_DOCUMENTS_FIELD_NUMBER: _ClassVar[int]
    NUM_CHUNKS_FIELD_NUMBER: _ClassVar[int]
    CHUNK_LENGTH_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TOKENIZER_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SHA256_FIELD_NUMBER: _ClassVar[int]
    TEXT_BYTES_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    VERSION_ID_FIELD_NUMBER: _ClassVar[int]
    DELETED_DOCUMENTS_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELDS_FIELD_NUMBER: _ClassVar[int]
    datastore_id: str
    num_documents: int
    num_chunks: int
    chunk_length: int
    num_tokens: int
    tokenizer: str
    vocab_size: int
    vocab_sha256: str
    text_bytes: int
    version: int
    version_id: str
    deleted_documents: int
    metadata_fields: _containers.ScalarMap[str, str]
    def __init__(self, datastore_id: _Optional[str] = ..., num_documents: _Optional[int] = ..., num_chunks: _Optional[int] = ..., chunk_length: _Optional[int] = ..., num_tokens: _Optional[int] = ..., tokenizer: _Optional[str] = ..., vocab_size: _Optional[int] = ..., vocab_sha256: _Optional[str] = ..., text_bytes: _Optional[int] = ..., version: _Optional[int] = ..., version_id: _Optional[str] = ..., deleted_documents: _Optional[int] = ..., metadata_fields: _Optional[_Mapping[str, str]] = ...) -> None: ...

class DenseInfo(_message.Message):
    __slots__ = ("factory", "dim", "ntotal", "embedder", "embedder_sha256", "search_defaults")
    class SearchDefaultsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    FACTORY_FIELD_NUMBER: _ClassVar[int]
    DIM_FIELD_NUMBER: _ClassVar[int]
    NTOTAL_FIELD_NUMBER: _ClassVar[int]
    EMBEDDER_FIELD_NUMBER: _ClassVar[int]
    EMBEDDER_SHA256_FIELD_NUMBER: _ClassVar[int]
    SEARCH_DEFAULTS_FIELD_NUMBER: _ClassVar[int]
    factory: str
    dim: int
    ntotal: int
    embedder: str
    embedder_sha256: str
    search_defaults: _containers.ScalarMap[str, int]
    def __init__(self, factory: _Optional[str] = ..., dim: _Optional[int] = ..., ntotal: _Optional[int] = ..., embedder: _Optional[str] = ..., embedder_sha256: _Optional[str] = ..., search_defaults: _Optional[_Mapping[str, int]] = ...) -> None: ...

class NgramInfo(_message.Message):
    __slots__ = ("num_tokens", "shards", "engine")
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SHARDS_FIELD_NUMBER: _ClassVar[int]
    ENGINE_FIELD_NUMBER: _ClassVar[int]
    num_tokens: int
    shards: int
    engine: str
    def __init__(self, num_tokens: _Optional[int] = ..., shards: _Optional[int] = ..., engine: _Optional[str] = ...) -> None: ...

class Limits(_message.Message):
    __slots__ = ("max_batch", "max_k", "max_query_bytes", "max_query_tokens", "max_chunks", "max_find_limit", "max_clauses", "max_terms_per_clause", "max_message_bytes", "workers", "max_queue", "batch_wait_ms", "max_dense_batch", "max_nprobe", "max_ef_search", "max_exclude_doc_ids", "max_diff_tokens", "max_streams", "stream_idle_s", "stream_max_s")
    MAX_BATCH_FIELD_NUMBER: _ClassVar[int]
    MAX_K_FIELD_NUMBER: _ClassVar[int]
    MAX_QUERY_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_QUERY_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_CHUNKS_FIELD_NUMBER: _ClassVar[int]
    MAX_FIND_LIMIT_FIELD_NUMBER: _ClassVar[int]
    MAX_CLAUSES_FIELD_NUMBER: _ClassVar[int]
    MAX_TERMS_PER_CLAUSE_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    MAX_QUEUE_FIELD_NUMBER: _ClassVar[int]
    BATCH_WAIT_MS_FIELD_NUMBER: _ClassVar[int]
    MAX_DENSE_BATCH_FIELD_NUMBER: _ClassVar[int]
    MAX_NPROBE_FIELD_NUMBER: _ClassVar[int]
    MAX_EF_SEARCH_FIELD_NUMBER: _ClassVar[int]
    MAX_EXCLUDE_DOC_IDS_FIELD_NUMBER: _ClassVar[int]
    MAX_DIFF_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_STREAMS_FIELD_NUMBER: _ClassVar[int]
    STREAM_IDLE_S_FIELD_NUMBER: _ClassVar[int]
    STREAM_MAX_S_FIELD_NUMBER: _ClassVar[int]
    max_batch: int
    max_k: int
    max_query_bytes: int
    max_query_tokens: int
    max_chunks: int
    max_find_limit: int
    max_clauses: int
    max_terms_per_clause: int
    max_message_bytes: int
    workers: int
    max_queue: int
    batch_wait_ms: float
    max_dense_batch: int
    max_nprobe: int
    max_ef_search: int
    max_exclude_doc_ids: int
    max_diff_tokens: int
    max_streams: int
    stream_idle_s: float
    stream_max_s: float
    def __init__(self, max_batch: _Optional[int] = ..., max_k: _Optional[int] = ..., max_query_bytes: _Optional[int] = ..., max_query_tokens: _Optional[int] = ..., max_chunks: _Optional[int] = ..., max_find_limit: _Optional[int] = ..., max_clauses: _Optional[int] = ..., max_terms_per_clause: _Optional[int] = ..., max_message_bytes: _Optional[int] = ..., workers: _Optional[int] = ..., max_queue: _Optional[int] = ..., batch_wait_ms: _Optional[float] = ..., max_dense_batch: _Optional[int] = ..., max_nprobe: _Optional[int] = ..., max_ef_search: _Optional[int] = ..., max_exclude_doc_ids: _Optional[int] = ..., max_diff_tokens: _Optional[int] = ..., max_streams: _Optional[int] = ..., stream_idle_s: _Optional[float] = ..., stream_max_s: _Optional[float] = ...) -> None: ...

class ShardInfo(_message.Message):
    __slots__ = ("target", "first_doc_id", "num_documents", "first_chunk_id", "num_chunks")
    TARGET_FIELD_NUMBER: _ClassVar[int]
    FIRST_DOC_ID_FIELD_NUMBER: _ClassVar[int]
    NUM_DOCUMENTS_FIELD_NUMBER: _ClassVar[int]
    FIRST_CHUNK_ID_FIELD_NUMBER: _ClassVar[int]
    NUM_CHUNKS_FIELD_NUMBER: _ClassVar[int]
    target: str
    first_doc_id: int
    num_documents: int
    first_chunk_id: int
    num_chunks: int
    def __init__(self, target: _Optional[str] = ..., first_doc_id: _Optional[int] = ..., num_documents: _Optional[int] = ..., first_chunk_id: _Optional[int] = ..., num_chunks: _Optional[int] = ...) -> None: ...

class InfoResponse(_message.Message):
    __slots__ = ("version", "role", "datastore", "dense", "ngram", "limits", "shards", "auth_required")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    DATASTORE_FIELD_NUMBER: _ClassVar[int]
    DENSE_FIELD_NUMBER: _ClassVar[int]
    NGRAM_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    SHARDS_FIELD_NUMBER: _ClassVar[int]
    AUTH_REQUIRED_FIELD_NUMBER: _ClassVar[int]
    version: str
    role: str
    datastore: DatastoreInfo
    dense: DenseInfo
    ngram: NgramInfo
    limits: Limits
    shards: _containers.RepeatedCompositeFieldContainer[ShardInfo]
    auth_required: bool
    def __init__(self, version: _Optional[str] = ..., role: _Optional[str] = ..., datastore: _Optional[_Union[DatastoreInfo, _Mapping]] = ..., dense: _Optional[_Union[DenseInfo, _Mapping]] = ..., ngram: _Optional[_Union[NgramInfo, _Mapping]] = ..., limits: _Optional[_Union[Limits, _Mapping]] = ..., shards: _Optional[_Iterable[_Union[ShardInfo, _Mapping]]] = ..., auth_required: _Optional[bool] = ...) -> None: ...

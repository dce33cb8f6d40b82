"""The error hierarchy shared by every retromem package.

A caller's mistake raises a subclass of :class:`RetromemError` whose message names what was
wrong (the file and line, the field, the bad value) and how to fix it. The command line turns
these into a one-line message and exit status 2 instead of a traceback.

Every error class of the library is defined here, so that the floors above import them from one
place; the modules that raise them also re-export them under their old import paths.
"""

from __future__ import annotations

from typing import Any


class RetromemError(Exception):
    """Base class of every error retromem raises on purpose."""


class ConfigError(RetromemError, ValueError):
    """A configuration field or command-line option has a bad value."""


class InputError(RetromemError):
    """A record of an input file cannot be used (bad JSON, bad UTF-8, missing field, ...).

    ``path`` and ``line`` (1-based; for Parquet, the 1-based row) locate the record; ``kind``
    is a short machine-readable reason, used as the counter name under the skip policy.
    """

    def __init__(self, path: str, line: int | None, kind: str, detail: str) -> None:
        self.path = path
        self.line = line
        self.kind = kind
        self.detail = detail
        where = f"{path}:{line}" if line is not None else path
        super().__init__(f"{where}: {kind}: {detail}")

    def __reduce__(self):  # picklable across worker processes
        return (type(self), (self.path, self.line, self.kind, self.detail))


class DatastoreError(RetromemError):
    """A datastore directory is missing, incomplete, corrupt, or not the one expected."""


class DocumentDeletedError(DatastoreError):
    """A read named a document (or a chunk of one) that a takedown deleted; ``doc_ids`` lists them.
    Reads pass ``include_deleted=True`` to get them anyway (index jobs purging them, compaction)."""

    def __init__(self, doc_ids: Any, message: str) -> None:
        self.doc_ids = list(doc_ids)
        super().__init__(message)

    def __reduce__(self):
        return (type(self), (self.doc_ids, self.args[0]))


class AssetError(RetromemError):
    """An offline model or tokenizer asset cannot be found or fetched."""


class QueryError(RetromemError, ValueError):
    """A query has a bad value: empty, too long, wrong dimension, NaN, k out of range, ..."""


class IndexFormatError(RetromemError):
    """An index directory is missing, truncated or corrupt, or was built from another datastore
    or embedder than the one it is asked to serve."""


class ArtifactCorruptError(DatastoreError, IndexFormatError):
    """A file of a finished artifact (datastore, embeddings, index, neighbour table) is damaged:
    missing, truncated, extended, with a header that does not parse, offsets out of order or out of
    range, or a checksum that differs from the one recorded when it was written.

    ``path`` names the damaged file, ``what`` says what is wrong with it; the message is
    ``path: what``. A subclass of both :class:`DatastoreError` and :class:`IndexFormatError`, so
    callers catching either keep working.
    """

    def __init__(self, path: Any, what: str) -> None:
        self.path = str(path)
        self.what = what
        super().__init__(f"{self.path}: {what}")

    def __reduce__(self):
        return (type(self), (self.path, self.what))


class DiskFullError(RetromemError):
    """A batch job would not fit, or did not fit, on the disk holding its output (retromem.diskspace)."""


class JobLockedError(RetromemError):
    """Another job holds the lock of the output directory this job would write."""


class FMQueryError(QueryError):
    """An FM-index query is empty, too long or not text."""


class FMIndexError(IndexFormatError):
    """An FM-index directory is missing, truncated, or built from another datastore."""


class NgramQueryError(QueryError):
    """A query is empty, too long, has token ids outside the vocabulary, or a CNF is too large."""


class NgramIndexError(IndexFormatError):
    """An n-gram index directory is missing, truncated, unfinished, or built from another datastore."""


class NgramIndexCorruptError(ArtifactCorruptError, NgramIndexError):
    """A file of an n-gram index is damaged (see :class:`ArtifactCorruptError`)."""


class FMIndexCorruptError(ArtifactCorruptError, FMIndexError):
    """A file of an FM-index is damaged (see :class:`ArtifactCorruptError`)."""


class UnsupportedModelError(RetromemError, TypeError):
    """The Hugging Face model's architecture is not one a memory wrapper supports."""


# --- the retrieval service -------------------------------------------------------------------
# ``code`` is a ``grpc.StatusCode``; it is not imported here so that the ground floor needs no grpc.


class ServiceCallError(RetromemError):
    """A call the service refused or could not answer (raised by the client)."""

    def __init__(self, code: Any, details: str, method: str = "") -> None:
        self.code = code
        self.details = details
        self.method = method
        super().__init__(f"{method + ': ' if method else ''}{code.name}: {details}")

    def __reduce__(self):
        return (type(self), (self.code, self.details, self.method))


class RemoteQueryError(ServiceCallError, QueryError):
    """The service refused the query itself (INVALID_ARGUMENT, OUT_OF_RANGE, NOT_FOUND)."""


class ServiceError(Exception):
    """A request the server refuses: a gRPC status code and a message naming the field.

    Raised inside the server and turned into the call's status there; never seen by a caller,
    so not a :class:`RetromemError`.
    """

    def __init__(self, code: Any, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class DeadlinePassed(Exception):
    """The request's deadline passed before its dense batch ran (inside the server)."""

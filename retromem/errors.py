"""The error hierarchy shared by every retromem package.

A caller's mistake raises a subclass of :class:`RetromemError` whose message names what was
wrong (the file and line, the field, the bad value) and how to fix it. The command line turns
these into a one-line message and exit status 2 instead of a traceback.
"""

from __future__ import annotations


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


class AssetError(RetromemError):
    """An offline model or tokenizer asset cannot be found or fetched."""


class QueryError(RetromemError, ValueError):
    """A query has a bad value: empty, too long, wrong dimension, NaN, k out of range, ..."""


class IndexFormatError(RetromemError):
    """An index directory is missing, truncated or corrupt, or was built from another datastore
    or embedder than the one it is asked to serve."""


class JobLockedError(RetromemError):
    """Another job holds the lock of the output directory this job would write."""

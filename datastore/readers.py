"""Input discovery and record reading: JSONL, Parquet and plain text, plain or .gz / .zst, from local
paths or URLs of any fsspec filesystem (:mod:`retromem.storage`: ``s3://bucket/prefix/``, a glob
such as ``gs://b/c4/*.json.gz``, ``file://``, ``memory://``); compression comes from the name.

Readers never raise on a bad record: they yield an :class:`~retromem.errors.InputError` in its
place (naming the file and line), so the ingest step can apply the error policy (stop, or
count and report the skip). A file that cannot be read at all (corrupt compression, broken
Parquet) yields one ``corrupt_file`` error and stops.
"""

from __future__ import annotations

import glob
import gzip
import io
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Literal

import orjson

from retromem import storage
from retromem.errors import ConfigError, InputError

InputFormat = Literal["auto", "jsonl", "parquet", "text"]
FORMATS = ("auto", "jsonl", "parquet", "text")
_JSONL_EXT = (".jsonl", ".json", ".ndjson")
_COMPRESSION_EXT = (".gz", ".zst")


@dataclass(frozen=True)
class InputFile:
    path: str  # as it will be recorded in the datastore (the path or URL given, or below a given dir / prefix)
    format: str  # jsonl | parquet | text
    size: int  # bytes on disk
    mtime_ns: int  # 0 where a filesystem gives no time


@dataclass(frozen=True)
class Record:
    line: int  # 1-based line (JSONL) or row (Parquet); 1 for a text file
    source_id: str
    text: str
    metadata: dict | None = None  # the record's other fields (JSON values), kept as typed metadata


def detect_format(path: str) -> str:
    name = path.lower()
    for ext in _COMPRESSION_EXT:
        if name.endswith(ext):
            name = name[: -len(ext)]
    if name.endswith(_JSONL_EXT):
        return "jsonl"
    if name.endswith(".parquet"):
        return "parquet"
    return "text"


def expand_inputs(specs: list[str], fmt: str = "auto") -> list[InputFile]:
    """Files named by paths or URLs, directories / prefixes (recursive, sorted) and globs, in the order given."""
    if fmt not in FORMATS:
        raise ConfigError(f"`--format` must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if not specs:
        raise ConfigError("no input given: name at least one file, directory or glob")
    files: list[str] = []
    remote: dict[str, tuple[int, int]] = {}  # url -> (size, mtime_ns), from the listing
    for spec in specs:
        if storage.is_url(spec):
            for url, size, mtime in storage.list_inputs(spec, "input"):
                remote[url] = (size, mtime)
                files.append(url)
        elif any(ch in spec for ch in "*?["):
            matched = sorted(p for p in glob.glob(spec, recursive=True) if os.path.isfile(p))
            if not matched:
                raise ConfigError(f"input glob {spec!r} matches no file")
            files.extend(matched)
        elif os.path.isdir(spec):
            found = sorted(
                str(p) for p in Path(spec).rglob("*")
                if p.is_file() and not any(part.startswith(".") for part in p.relative_to(spec).parts)
            )
            if not found:
                raise ConfigError(f"input directory {spec!r} holds no file")
            files.extend(found)
        elif os.path.isfile(spec):
            files.append(spec)
        else:
            raise ConfigError(f"input not found: {spec!r} is neither a file, a directory nor a glob")
    seen: set[str] = set()
    out = []
    for f in files:
        key = f if f in remote else os.path.realpath(f)
        if key in seen:
            continue
        seen.add(key)
        size, mtime = remote[f] if f in remote else (os.stat(f).st_size, os.stat(f).st_mtime_ns)
        out.append(InputFile(f, detect_format(f) if fmt == "auto" else fmt, size, mtime))
    return out


def open_binary(path: str) -> io.BufferedIOBase:
    """The decompressed bytes of a local file or a URL (.gz / .zst by name)."""
    url = storage.is_url(path)
    if path.endswith(".gz"):
        return _GzipOwning(storage.open_input(path)) if url else gzip.open(path, "rb")
    raw = storage.open_input(path) if url else open(path, "rb")
    if path.endswith(".zst"):
        import zstandard

        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw))  # closes raw with itself
    return raw


class _GzipOwning(gzip.GzipFile):
    """A gzip stream over a remote file object that it closes with itself (GzipFile leaves a given
    file object open)."""

    def __init__(self, raw: io.IOBase) -> None:
        self._raw = raw
        super().__init__(fileobj=raw, mode="rb")

    def close(self) -> None:
        try:
            super().close()
        finally:
            self._raw.close()


# Errors a damaged compressed stream raises while being read.
_CORRUPT = (gzip.BadGzipFile, EOFError, zlib.error, OSError)


def iter_records(
    f: InputFile, text_field: str = "text", id_field: str | None = "id"
) -> Iterator[Record | InputError]:
    if f.format == "jsonl":
        yield from _iter_jsonl(f.path, text_field, id_field)
    elif f.format == "parquet":
        yield from _iter_parquet(f.path, text_field, id_field)
    else:
        yield from _iter_text(f.path)


def _iter_jsonl(path: str, text_field: str, id_field: str | None) -> Iterator[Record | InputError]:
    line_no = 0
    try:
        with open_binary(path) as fh:
            for line_no, raw in enumerate(fh, start=1):
                if not raw.strip():
                    continue  # blank lines separate nothing in JSONL
                try:
                    obj = orjson.loads(raw)  # validates UTF-8 itself: no separate decode of every line
                except orjson.JSONDecodeError:
                    # name the fault as before: a byte that is not UTF-8, else the JSON error of the text
                    try:
                        line = raw.decode("utf-8")
                    except UnicodeDecodeError as exc:
                        yield InputError(path, line_no, "invalid_utf8",
                                         f"byte {raw[exc.start]:#04x} at column {exc.start + 1} is not UTF-8")
                        continue
                    try:
                        obj = orjson.loads(line)
                    except orjson.JSONDecodeError as exc:
                        yield InputError(path, line_no, "invalid_json", str(exc))
                        continue
                if not isinstance(obj, dict):
                    yield InputError(path, line_no, "invalid_json",
                                     f"expected a JSON object, got {type(obj).__name__}")
                    continue
                text = obj.get(text_field)
                if text is None:
                    yield InputError(path, line_no, "missing_field",
                                     f"no {text_field!r} field (set it with --text-field); "
                                     f"fields present: {', '.join(sorted(obj)[:10])}")
                    continue
                if not isinstance(text, str):
                    yield InputError(path, line_no, "missing_field",
                                     f"field {text_field!r} is a {type(text).__name__}, not a string")
                    continue
                sid = obj.get(id_field) if id_field else None
                meta = {k: v for k, v in obj.items() if k != text_field and k != id_field} or None
                yield Record(line_no, f"{path}:{line_no}" if sid is None else str(sid), text, meta)
    except _CORRUPT as exc:
        yield InputError(path, line_no + 1, "corrupt_file", f"cannot read past this point: {exc}")


def _iter_text(path: str) -> Iterator[Record | InputError]:
    try:
        with open_binary(path) as fh:
            raw = fh.read()
    except _CORRUPT as exc:
        yield InputError(path, None, "corrupt_file", f"cannot read: {exc}")
        return
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        yield InputError(path, line, "invalid_utf8", f"byte {raw[exc.start]:#04x} is not UTF-8")
        return
    yield Record(1, path, text)


def _iter_parquet(path: str, text_field: str, id_field: str | None) -> Iterator[Record | InputError]:
    import pyarrow.parquet as pq

    raw = None  # a URL's file object: pyarrow leaves a given file open, so it is closed here
    try:
        raw = storage.open_input(path) if storage.is_url(path) else None
        pf = pq.ParquetFile(raw if raw is not None else path)
    except Exception as exc:  # pyarrow raises ArrowInvalid / OSError for broken files
        if raw is not None:
            raw.close()
        yield InputError(path, None, "corrupt_file", f"not a readable Parquet file: {exc}")
        return
    try:
        yield from _parquet_records(pf, path, text_field, id_field)
    finally:  # also when the reader is abandoned (the error policy stopped the ingest)
        if raw is not None:
            raw.close()


def _parquet_records(pf, path: str, text_field: str, id_field: str | None) -> Iterator[Record | InputError]:
    names = pf.schema_arrow.names
    if text_field not in names:
        yield InputError(path, None, "missing_field",
                         f"no column {text_field!r} (set it with --text-field); columns: {', '.join(names)}")
        return
    has_id = bool(id_field) and id_field in names
    extra = [n for n in names if n != text_field and n != id_field]  # kept as metadata
    row = 0
    try:
        for batch in pf.iter_batches(batch_size=4096):
            texts = batch.column(text_field).to_pylist()
            ids = batch.column(id_field).to_pylist() if has_id else [None] * len(texts)
            metas = [batch.column(n).to_pylist() for n in extra]
            for i, (text, sid) in enumerate(zip(texts, ids)):
                row += 1
                if not isinstance(text, str):
                    yield InputError(path, row, "missing_field",
                                     f"column {text_field!r} is {'null' if text is None else type(text).__name__}")
                    continue
                meta = {n: _plain(m[i]) for n, m in zip(extra, metas)} or None
                yield Record(row, f"{path}:{row}" if sid is None else str(sid), text, meta)
    except Exception as exc:
        yield InputError(path, row + 1, "corrupt_file", f"cannot read past this row: {exc}")


def _plain(value: object) -> object:
    """A Parquet cell as a JSON value: dates, times, decimals and bytes become strings."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, bytes):
        return value.hex()
    return str(value)

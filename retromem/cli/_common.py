"""What every command module shares: the error boundary, size and secret parsing, output formatting."""

from __future__ import annotations

import contextlib
import functools
import os
import re
import sys
from pathlib import Path
from typing import NoReturn

import click

from retromem.diskspace import disk_full_message, fmt_bytes, forget, is_disk_full
from retromem.errors import ConfigError, RetromemError
from retromem.storage import node_path  # noqa: F401  (the group modules import it from here)

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)?\s*$", re.I)
_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "kib": 2**10, "m": 10**6, "mb": 10**6, "mib": 2**20,
          "g": 10**9, "gb": 10**9, "gib": 2**30, "t": 10**12, "tb": 10**12, "tib": 2**40}


def parse_size(value: str | int, flag: str) -> int:
    if isinstance(value, int):
        return value
    m = _SIZE.match(value)
    if not m or m.group(2).lower() not in _UNITS:
        raise ConfigError(f"`{flag}` must be a size such as 32MiB, 512MB or 1000000, got {value!r}")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def handle_errors(fn):
    """Every user error as one ``error: ...`` line on stderr and exit status 2, never a traceback.

    User errors are what retromem raises on purpose (:class:`RetromemError`: a bad config or
    option, a missing or corrupt datastore or index, a refused query) and what the operating
    system says about the paths a user gave (no such file, permission denied, disk full).
    Anything else is a bug, and keeps its traceback.
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        forget()  # disk estimates of an earlier command in this process do not apply
        try:
            return fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001  (sorted below: user errors end the command, bugs re-raise)
            if is_disk_full(exc):  # ENOSPC / EFBIG in any shape, native libraries' and subprocesses' included
                fail(disk_full_message(exc))
            if isinstance(exc, RetromemError):
                fail(str(exc))
            if isinstance(exc, OSError):
                fail(os_error_message(exc))
            raise

    return wrapper


def fail(message: str) -> NoReturn:
    """End the command: ``error: message`` on stderr, exit status 2 (click's own for usage errors)."""
    one_line = " ".join(line.strip() for line in message.splitlines() if line.strip())
    click.echo(f"error: {one_line}", err=True)
    sys.exit(2)


def os_error_message(exc: OSError) -> str:
    """``path: what went wrong`` for an error the operating system raised about a path."""
    what = exc.strerror or str(exc)
    if exc.filename is None:
        return what
    paths = f"{exc.filename} -> {exc.filename2}" if exc.filename2 is not None else str(exc.filename)
    return f"{paths}: {what}"


def parse_list(value: str, flag: str, kind: type = int) -> tuple:
    """``"1,2 3"`` as a tuple of ``kind`` (int or float); a ConfigError naming ``flag`` otherwise."""
    try:
        return tuple(kind(x) for x in value.replace(",", " ").split())
    except ValueError:
        noun = "integers" if kind is int else "numbers"
        raise ConfigError(f"`{flag}` must be {noun} separated by commas or spaces, got {value!r}") from None


def parse_number(value: str, flag: str, kind: type = int, example: str = "") -> int | float:
    """One number given as text (``1e12`` is an int here when ``kind`` is int)."""
    try:
        if kind is not int:
            return kind(value)
        try:
            return int(value)
        except ValueError:
            number = float(value)  # 1e12
            if not number.is_integer():
                raise
            return int(number)
    except (ValueError, OverflowError):
        raise ConfigError(f"`{flag}` must be a number{' such as ' + example if example else ''}, got {value!r}") from None


def secret(path: str | None, env: str) -> str | None:
    """A bearer token from a file, else from the environment variable ``env``; None when neither is set."""
    if path:
        try:
            return Path(path).read_text().strip()
        except OSError as exc:
            raise ConfigError(f"cannot read the token file {path}: {exc}") from exc
    return os.environ.get(env) or None


def snippet(text: str | None, n: int = 100, quote: bool = False) -> str:
    """``text`` on one line, cut to ``n`` characters (quoted as a Python literal with ``quote``)."""
    t = " ".join((text or "").split())
    if quote:
        return repr(t[:n] + ("..." if len(t) > n else ""))
    return t if len(t) <= n else t[: n - 1] + "…"


def train_options(example: str):
    """The options every `train` command shares (the training harness's): --config (a file or a
    packaged name such as ``example``), --output-dir, --max-steps and --resume."""

    def add(fn):
        for option in reversed((
            click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False),
                         help=f"YAML file, or a config packaged with retromem ({example})."),
            click.option("--output-dir", default=None, help="Override `output_dir` of the config."),
            click.option("--max-steps", type=int, default=None, help="Override `train.max_steps`."),
            click.option("--resume", is_flag=True, help="Continue from the newest checkpoint in the output directory."),
        )):
            fn = option(fn)
        return fn

    return add


def shard_executor_options(fn):
    """--executor/--workers/--ray-address of a build made of one task per shard."""
    for option in reversed((
        click.option("--executor", type=click.Choice(["local", "ray"]), default="local", show_default=True,
                     help="Where shards are built: local processes, or one Ray task per shard (the datastore and "
                          "--out on storage every node sees)."),
        click.option("--workers", type=int, default=1, show_default=True,
                     help="local: shards built at once (0: one per core); ray: CPUs of a local Ray (0: all)."),
        click.option("--ray-address", default=None, help="ray: the cluster to join (default: start a local Ray)."),
    )):
        fn = option(fn)
    return fn


class PathOrURL(click.ParamType):
    """An existing local directory (checked as ``click.Path(exists=True, file_okay=False)``), or a URL
    of any fsspec filesystem (``s3://bucket/datastore``, ``file://``, ``memory://``), read through
    :mod:`retromem.storage` (URLs are checked when opened)."""

    name = "path"

    def convert(self, value, param, ctx):
        if "://" in str(value):
            return str(value)
        return click.Path(exists=True, file_okay=False).convert(value, param, ctx)


PATH_OR_URL = PathOrURL()


@contextlib.contextmanager
def local_out(out: str, overwrite: bool = False):
    """The local directory a job writes for ``--out``: ``out`` itself, or for a URL its staging
    directory, put to the URL (manifest last) when the block ends without an error, then deleted
    (:func:`retromem.storage.output_dir`; ``overwrite``: the job's --overwrite, which downloads
    nothing of the old artifact but its top-level JSON)."""
    from retromem import storage

    with storage.output_dir(out, "--out", overwrite=overwrite) as local:
        yield str(local)


def retriever_options(index_help: str):
    """The options of a command that retrieves from a dense index in process (--index) or through a
    retrieval server (--server, with --token-file and --tls-ca); see :func:`open_retriever`."""

    def add(fn):
        for option in reversed((
            click.option("--index", "index_dir", default=None, type=PATH_OR_URL, help=index_help),
            click.option("--server", default=None, metavar="HOST:PORT",
                         help="Retrieve through a `retromem serve` server (or router) instead of --index."),
            click.option("--token-file", default=None, type=click.Path(exists=True, dir_okay=False),
                         help="With --server: bearer token file (default: $RETROMEM_TOKEN)."),
            click.option("--tls-ca", default=None, type=click.Path(exists=True, dir_okay=False),
                         help="With --server: CA certificate of a TLS server."),
        )):
            fn = option(fn)
        return fn

    return add


def open_retriever(index_dir: str | None, server: str | None, token_file: str | None, tls_ca: str | None,
                   datastore=None):
    """The retriever that :func:`retriever_options` named: a DenseIndex (over ``datastore`` when given)
    or a RetrievalClient; both answer ``search(queries, k, exclude_doc_ids=..., fetch=...)``."""
    if (index_dir is None) == (server is None):
        raise click.UsageError("give exactly one of --index (in-process) and --server (gRPC)")
    if server is not None:
        from retromem.service.client import RetrievalClient

        return RetrievalClient(server, token=secret(token_file, "RETROMEM_TOKEN"), tls_ca=tls_ca, retries=2)
    from retromem.index.dense import DenseIndex

    return DenseIndex.open(index_dir, datastore=datastore) if datastore is not None else DenseIndex.open(index_dir)

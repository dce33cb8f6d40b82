"""What every command module shares: the error boundary, size and secret parsing, output formatting."""

from __future__ import annotations

import functools
import os
import re
import sys
from pathlib import Path

import click

from retromem.errors import ConfigError, RetromemError

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
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except RetromemError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(2)

    return wrapper


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


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

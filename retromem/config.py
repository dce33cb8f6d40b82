"""Config dataclasses: building them from YAML or mappings, and checking their fields.

Every component has one frozen dataclass config validated in ``__post_init__``. This module is
the one helper they share:

* :func:`from_dict` builds a config from a mapping (a parsed YAML file, a ``--config`` section),
  recursively for fields whose type is another config dataclass (or ``X | None``), turning lists
  into tuples for tuple fields and refusing unknown keys at every level by their dotted name;
* :func:`load_yaml` reads a YAML file (:func:`read_yaml` alone gives its mapping), lets
  command-line options that are not None win over it, and calls :func:`from_dict`;
* the checks (:func:`boolean`, :func:`positive_int`, :func:`non_negative_int`, :func:`integer`,
  :func:`number`, :func:`one_of`, their ``optional_`` forms, and :func:`fail` for any other rule)
  raise :class:`~retromem.errors.ConfigError` in one style, naming the key and, when there is
  one, its command-line flag: `` `dedup.threshold` (--dedup-threshold) must be in (0, 1), got 1.5 ``.

Usage::

    @dataclass(frozen=True)
    class DedupConfig:
        ngram: int = 13
        threshold: float = 0.8

        def __post_init__(self) -> None:
            positive_int(self.ngram, "dedup.ngram")
            number(self.threshold, "dedup.threshold", gt=0, lt=1, flag="--dedup-threshold")

    @dataclass(frozen=True)
    class BuildConfig:
        out: str
        dedup: DedupConfig = field(default_factory=DedupConfig)

    cfg = from_dict(BuildConfig, {"out": "ds", "dedup": {"threshold": 0.9}})
    cfg = load_yaml("build.yaml", BuildConfig, required=("out",), out=cli_out)  # out=None: the file's

Each check returns the value it checked, so a normalising ``__post_init__`` may write
``object.__setattr__(self, "shards", tuple(self.shards))``; derived values are properties, never
written back.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import types
import typing
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any, NoReturn, TypeVar

from retromem.errors import ConfigError

T = TypeVar("T")

__all__ = [
    "ConfigError", "from_dict", "load_yaml", "read_yaml", "fail", "key_name", "boolean", "positive_int",
    "non_negative_int", "optional_positive_int", "optional_non_negative_int", "integer", "number",
    "optional_number", "one_of", "is_int", "is_number",
]


# --- building configs -------------------------------------------------------------------------


def _located(where: str, msg: str) -> str:
    return f"{where}: {msg}" if where else msg


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _convert(tp: Any, value: Any, where: str, key: str) -> Any:
    """``value`` made to fit the field type ``tp``: mappings into nested dataclasses, lists into tuples."""
    origin = typing.get_origin(tp)
    if origin is typing.Union or origin is types.UnionType:  # X | None: the first member that takes it
        if value is None:
            return None
        members = [a for a in typing.get_args(tp) if a is not type(None)]
        for member in members:
            if _is_dataclass_type(member) and not isinstance(value, member) and (
                    isinstance(value, Mapping) or len(members) == 1):  # `dedup: 3` is refused by from_dict
                return from_dict(member, value, where=where, prefix=key + ".")
        for member in members:
            if typing.get_origin(member) is tuple and isinstance(value, list):
                return _convert(member, value, where, key)
        return value
    if _is_dataclass_type(tp) and not isinstance(value, tp):
        return from_dict(tp, value, where=where, prefix=key + ".")
    if origin is tuple and isinstance(value, (list, tuple)):
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            item_types = [args[0]] * len(value)
        elif args and len(args) == len(value):
            item_types = list(args)
        else:  # a fixed-length tuple of the wrong length: __post_init__ names the problem
            return tuple(value)
        return tuple(_convert(t, v, where, f"{key}[{i}]") for i, (t, v) in enumerate(zip(item_types, value)))
    return value


def from_dict(cls: type[T], data: Mapping[str, Any], *, where: str = "", prefix: str = "") -> T:
    """An instance of the dataclass ``cls`` built from ``data``.

    ``where`` locates the data in messages (a file path); ``prefix`` is the dotted key of
    ``data`` inside a larger config (``"dedup."``), so that an unknown key is named in full.
    A field whose type is a dataclass (or ``X | None``) is built from a nested mapping the same
    way; a list given for a tuple field becomes a tuple; values are otherwise passed as they are
    and checked by ``cls.__post_init__``.
    """
    section = prefix.rstrip(".")
    if not isinstance(data, Mapping):
        what = f"`{section}`" if section else "a config"
        raise ConfigError(_located(where, f"{what} must be a mapping of settings, got {type(data).__name__}"))
    init_fields = [f for f in dataclasses.fields(cls) if f.init]
    allowed = sorted(f.name for f in init_fields)
    unknown = sorted(str(k) for k in data if k not in allowed)
    if unknown:
        under = f" under `{section}`" if section else ""
        raise ConfigError(_located(where, f"unknown keys {[prefix + k for k in unknown]}; allowed{under}: {allowed}"))
    hints = typing.get_type_hints(cls)
    kwargs = {name: _convert(hints.get(name, Any), value, where, prefix + name) for name, value in data.items()}
    missing = sorted(f.name for f in init_fields if f.name not in kwargs
                     and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING)
    if missing:
        raise ConfigError(_located(where, f"missing keys {[prefix + k for k in missing]}"))
    try:
        return cls(**kwargs)
    except ConfigError as exc:
        if where and not str(exc).startswith(where):
            raise ConfigError(_located(where, str(exc))) from exc
        raise
    except TypeError as exc:  # a value of a type __post_init__ cannot even compare
        raise ConfigError(_located(where, f"{section or cls.__name__}: {exc}")) from exc


def read_yaml(path: str | Path) -> dict[str, Any]:
    """The mapping held by the YAML file ``path`` (a ``--config``); ConfigError if it cannot be one."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"`--config` {path} does not exist")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:  # its own message spans lines and quotes the text: keep one line
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        problem = getattr(exc, "problem", None) or " ".join(str(exc).split())
        raise ConfigError(f"`--config` {path} is not valid YAML: {where}{problem}") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read `--config` {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config is a YAML mapping, got {type(data).__name__}")
    return data


def load_yaml(path: str | Path, cls: type[T], *, required: Collection[str] = (), **overrides: Any) -> T:
    """The dataclass ``cls`` built from the YAML file ``path`` (the ``--config`` of a command).

    ``overrides`` (command-line options) replace the file's top-level keys when they are not
    None; each name in ``required`` must then have a value, from the file or an override.
    """
    data = read_yaml(path)
    data.update({k: v for k, v in overrides.items() if v is not None})
    for name in required:
        if data.get(name) in (None, "", []):
            raise ConfigError(f"{path}: `{name}` is required (in the file or as a command-line option)")
    return from_dict(cls, data, where=str(path))


# --- checks for __post_init__ -----------------------------------------------------------------


def key_name(key: str, flag: str | None = None) -> str:
    """How messages name a setting: `` `dedup.threshold` (--dedup-threshold) ``."""
    return f"`{key}` ({flag})" if flag else f"`{key}`"


def fail(key: str, must: str, value: Any = ..., *, flag: str | None = None) -> NoReturn:
    """Raise ``ConfigError("`key` (--flag) must <must>, got <value>")``; no ``got`` without a value."""
    got = "" if value is ... else f", got {value!r}"
    raise ConfigError(f"{key_name(key, flag)} must {must}{got}")


def boolean(value: Any, key: str, *, flag: str | None = None) -> bool:
    if not isinstance(value, bool):
        fail(key, "be true or false", value, flag=flag)
    return value


def is_int(value: Any) -> bool:
    """An integer (numpy's too), not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """A finite real number (numpy's too), not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def integer(value: Any, key: str, *, ge: int | None = None, le: int | None = None,
            flag: str | None = None) -> int:
    """``value`` if it is an int (not a bool) in [ge, le]; either bound may be left open."""
    if not is_int(value) or (ge is not None and value < ge) or (le is not None and value > le):
        if ge is not None and le is not None:
            must = f"be an integer in {ge}..{le}"
        elif ge is not None:
            must = f"be an integer >= {ge}"
        elif le is not None:
            must = f"be an integer <= {le}"
        else:
            must = "be an integer"
        fail(key, must, value, flag=flag)
    return value


def positive_int(value: Any, key: str, *, flag: str | None = None) -> int:
    if not is_int(value) or value < 1:
        fail(key, "be a positive integer", value, flag=flag)
    return value


def non_negative_int(value: Any, key: str, *, flag: str | None = None) -> int:
    if not is_int(value) or value < 0:
        fail(key, "be a non-negative integer", value, flag=flag)
    return value


def optional_positive_int(value: Any, key: str, *, flag: str | None = None) -> int | None:
    if value is not None and (not is_int(value) or value < 1):
        fail(key, "be a positive integer or null", value, flag=flag)
    return value


def optional_non_negative_int(value: Any, key: str, *, flag: str | None = None) -> int | None:
    if value is not None and (not is_int(value) or value < 0):
        fail(key, "be a non-negative integer or null", value, flag=flag)
    return value


def _bounds(gt: float | None, ge: float | None, lt: float | None, le: float | None) -> str:
    lo = f"({gt}" if gt is not None else f"[{ge}" if ge is not None else None
    hi = f"{lt})" if lt is not None else f"{le}]" if le is not None else None
    if lo and hi:
        return f"be in {lo}, {hi}"
    if lo:
        return f"be > {gt}" if gt is not None else f"be >= {ge}"
    if hi:
        return f"be < {lt}" if lt is not None else f"be <= {le}"
    return "be a finite number"


def _in_bounds(value: Any, gt: float | None, ge: float | None, lt: float | None, le: float | None) -> bool:
    return (is_number(value)
            and (gt is None or value > gt) and (ge is None or value >= ge)
            and (lt is None or value < lt) and (le is None or value <= le))


def number(value: Any, key: str, *, gt: float | None = None, ge: float | None = None,
           lt: float | None = None, le: float | None = None, flag: str | None = None) -> float:
    """``value`` if it is a finite real number (not a bool) within the bounds given.

    ``gt``/``lt`` are open ends, ``ge``/``le`` closed ones: ``number(x, "dedup.threshold",
    gt=0, lt=1)`` fails with "`dedup.threshold` must be in (0, 1), got 1.5".
    """
    if not _in_bounds(value, gt, ge, lt, le):
        fail(key, _bounds(gt, ge, lt, le), value, flag=flag)
    return value


def optional_number(value: Any, key: str, *, gt: float | None = None, ge: float | None = None,
                    lt: float | None = None, le: float | None = None, flag: str | None = None) -> float | None:
    """:func:`number`, or None."""
    if value is not None and not _in_bounds(value, gt, ge, lt, le):
        fail(key, _bounds(gt, ge, lt, le) + " or null", value, flag=flag)
    return value


def one_of(value: Any, key: str, choices: Collection[Any], *, flag: str | None = None) -> Any:
    """``value`` if it is one of ``choices``: "`update` must be one of 'linear', 'delta', got 'x'"."""
    try:
        ok = value in choices and not (isinstance(value, bool) and not any(c is value for c in choices))
    except TypeError:  # an unhashable value looked up in a set
        ok = False
    if not ok:
        fail(key, "be one of " + ", ".join(repr(c) for c in choices), value, flag=flag)
    return value

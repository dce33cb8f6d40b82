"""Reading a run's settings from YAML into a config dataclass (``--config`` of the training commands).

Unknown keys are an error naming the allowed ones; command-line overrides that are not None win
over the file; the dataclass's own ``__post_init__`` validates the values.
"""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path
from typing import Any, TypeVar

from retromem.errors import ConfigError

T = TypeVar("T")


def load_yaml_dataclass(path: str | Path, cls: type[T], required: tuple[str, ...] = (), **overrides: Any) -> T:
    import yaml

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"`--config` {path} does not exist")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"`--config` {path} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config is a YAML mapping, got {type(data).__name__}")
    data.update({k: v for k, v in overrides.items() if v is not None})
    allowed = {f.name for f in fields(cls)}
    unknown = set(data) - allowed
    if unknown:
        raise ConfigError(f"{path}: unknown keys {sorted(unknown)}; allowed: {sorted(allowed)}")
    for name in required:
        if data.get(name) in (None, "", []):
            raise ConfigError(f"{path}: `{name}` is required (in the file or as a command-line option)")
    try:
        return cls(**data)
    except TypeError as exc:
        raise ConfigError(f"{path}: {exc}") from exc

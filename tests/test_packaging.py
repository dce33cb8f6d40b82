"""The installed package as a user meets it: a wheel built from this checkout, installed into a fresh
virtual environment, imported from a folder that holds the user's own `datastore.py`, `index.py`,
`memory.py`, `retro.py` and `service.py`. Every retromem package must come from the wheel, under
the `retromem` namespace, and none of the user's modules may be touched."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("datastore", "index", "memory", "retro", "service")

CHECK = """
import importlib, pathlib, sys
import retromem
from retromem.service.client import RetrievalClient  # the import that failed beside a user's service.py
site = pathlib.Path(retromem.__file__).resolve().parents[1]
for name in ("datastore", "index", "memory", "retro", "service", "service.v1.retrieval_pb2_grpc", "cli",
             "datastore.store", "index.dense", "retro.modeling_retro", "memory.infini_attention"):
    mod = importlib.import_module("retromem." + name)
    assert pathlib.Path(mod.__file__).resolve().is_relative_to(site), (name, mod.__file__)
import datastore, memory  # the user's own modules, still theirs
assert datastore.MINE and memory.MINE
import retromem.configs, importlib.resources as r
assert (r.files("retromem.configs") / "retro" / "tiny-scratch.yaml").is_file()
assert (r.files("retromem") / "data" / "python-docs-tutorial-howto.jsonl.gz").is_file()
print("ok", site)
"""


@pytest.mark.slow
def test_wheel_in_a_fresh_venv_beside_colliding_user_modules(tmp_path):
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(wheels),
                    str(REPO)], check=True, cwd=tmp_path)
    (wheel,) = wheels.glob("retromem-*.whl")
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    py = env_dir / "bin" / "python"
    subprocess.run([py, "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)], check=True)
    # the dependencies (numpy, torch, ...) come from this environment's site-packages, added as a plain
    # path entry: its .pth files (this checkout's editable install among them) are not processed
    new_site = Path(subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                   check=True, capture_output=True, text=True).stdout.strip())
    (new_site / "zz_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    user = tmp_path / "user-project"
    user.mkdir()
    for name in PACKAGES:
        (user / f"{name}.py").write_text("MINE = True\n")
    out = subprocess.run([py, "-c", CHECK], cwd=user, capture_output=True, text=True,
                         env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("ok") and str(env_dir) in out.stdout
    cli = subprocess.run([env_dir / "bin" / "retromem", "index", "--help"], cwd=user, capture_output=True, text=True)
    assert cli.returncode == 0 and "dense" in cli.stdout and "ngram" in cli.stdout, cli.stderr


def test_source_checkout_imports_the_namespace_not_the_folders():
    """`python -m pytest` from the repository root: the folders are reached as retromem.<package>."""
    import retromem.datastore
    import retromem.service

    assert Path(retromem.datastore.__file__).resolve().parent == REPO / "datastore"
    assert retromem.service.__name__ == "retromem.service"
    assert "datastore" not in sys.modules or sys.modules["datastore"].__file__ != retromem.datastore.__file__

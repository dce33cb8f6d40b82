"""Batch jobs on a full disk (issue 15): refused up front when the estimate does not fit, and one
`error:` line naming the output directory (exit 2) when the disk fills anyway; the re-run resumes.

A full disk is simulated with a file size limit (RLIMIT_FSIZE, SIGXFSZ ignored, as `ulimit -f`
does): writes past it fail with EFBIG, and a native subprocess that does not ignore the signal is
killed by SIGXFSZ, which covers the shapes a real ENOSPC takes without needing a small filesystem."""

from __future__ import annotations

import errno
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from retromem.diskspace import disk_full_message, free_bytes, is_disk_full, preflight
from retromem.errors import DiskFullError


def _limited(limit: int):
    def pre() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return pre


def _cli(args: list[str], limit: int | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "retromem.cli", *args], capture_output=True, text=True, timeout=600,
                          preexec_fn=_limited(limit) if limit else None)


def _error_line(stderr: str) -> str:
    lines = [part for line in stderr.splitlines() for part in line.split("\r") if "error:" in part]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr[-3000:]
    return lines[0][lines[0].index("error:"):]


def test_preflight_refuses_what_does_not_fit_and_counts_what_a_resumed_job_wrote(tmp_path):
    out = tmp_path / "job"
    with pytest.raises(DiskFullError, match=rf"{out}: the test job needs about .* more, and the filesystem"):
        preflight(out, free_bytes(tmp_path) + 2**40, "the test job")
    out.mkdir()
    (out / "part").write_bytes(b"x" * 4096)
    preflight(out, 4096, "the test job")  # already written: nothing more needed


def test_every_shape_of_a_full_disk_is_recognised():
    assert is_disk_full(OSError(errno.ENOSPC, "No space left on device", "/x/y"))
    assert is_disk_full(OSError(errno.EFBIG, "File too large"))
    assert is_disk_full(Exception("No space left on device (os error 28)"))  # tokenizers (Rust)
    assert is_disk_full(RuntimeError('Error: Os { code: 28, kind: StorageFull, message: "No space left on device" }'))
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as inner:
            raise ValueError("writing the shard failed") from inner
    except ValueError as outer:
        assert is_disk_full(outer)
    assert not is_disk_full(OSError(errno.ENOENT, "No such file or directory"))
    assert not is_disk_full(DiskFullError("already clear"))
    assert "no space left on device" in disk_full_message(OSError(errno.ENOSPC, "No space left on device"))


@pytest.mark.slow
def test_datastore_build_on_a_full_disk_fails_clearly_and_resumes(tmp_path, corpus_dir):
    out = tmp_path / "ds"
    args = ["datastore", "build", str(corpus_dir), "-o", str(out), "--tokenizer", "gpt2", "--shard-size", "100KB"]
    r = _cli(args, limit=120_000)
    assert r.returncode == 2
    line = _error_line(r.stderr)
    assert str(out) in line and "file size limit" in line and "datastore build" in line and "re-run" in line
    assert not (out / "manifest.json").exists()  # nothing half-written looks finished
    r = _cli(args)
    assert r.returncode == 0, r.stderr[-2000:]
    from retromem.datastore import Datastore

    Datastore.open(out).verify_reads()


def test_ngram_build_on_a_full_disk_fails_clearly_and_resumes(tmp_path, built):
    src = built[1].out
    out = tmp_path / "ng"
    # enough for the token stream, not for the suffix array: the Rust indexer is the one that fails
    tokens = (Path(src) / "arrays" / "tokens.npy").stat().st_size
    assert tokens > 100_000
    r = _cli(["index", "ngram", "build", src, "-o", str(out)], limit=int(tokens * 1.2))
    assert r.returncode == 2
    line = _error_line(r.stderr)
    assert str(out) in line and "n-gram index build" in line and "needs about" in line
    assert not (out / "ngram_index.json").exists()
    r = _cli(["index", "ngram", "build", src, "-o", str(out)])
    assert r.returncode == 0, r.stderr[-2000:]
    from retromem.index.ngram import NgramIndex

    assert NgramIndex(out).count(" the").count > 0


def test_the_embedding_job_checks_its_space_first(tmp_path, built, monkeypatch):
    """The embedding job refuses at once, naming its output, when the filesystem (here: its free
    space as measured, set small) cannot hold the vectors it will write (the dense build does the
    same with its planned index size)."""
    import retromem.diskspace as diskspace
    from retromem.index.embed import EmbedConfig, embed_datastore

    monkeypatch.setattr(diskspace, "free_bytes", lambda path: 4096)
    out = tmp_path / "emb"
    with pytest.raises(DiskFullError, match=rf"{out}: the embedding job needs about .* 4\.0 KiB free"):
        embed_datastore(EmbedConfig(datastore=built[1].out, out=str(out), batch_size=64), progress=False)
    assert not (out / "embeddings.json").exists()

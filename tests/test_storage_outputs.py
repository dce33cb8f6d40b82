"""Outputs at URLs (retromem.storage.output_dir) on real fsspec memory filesystems: the local staging
copy is deleted once its put succeeded and kept after a failed put (the job resumes from it); an
overwrite downloads only the old artifact's top-level JSON (enough for the job to check it replaces
its own kind), never the artifact, and leaves the URL holding exactly the new tree, manifest last;
a tree without a kind marker is pulled whole so that the job refuses it as it would locally."""

from __future__ import annotations

import json
import uuid

import fsspec
import pytest
from fsspec.implementations.memory import MemoryFileSystem

from retromem import storage
from retromem.datastore.job import open_job
from retromem.errors import ConfigError


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RETROMEM_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


class LoggingMemoryFS(MemoryFileSystem):
    """The memory filesystem with a store of its own, logging gets, puts and deletes in order; a put
    of a file named in ``fail_puts`` raises OSError (a store that refuses the upload)."""

    protocol = "logmem"
    store: dict = {}
    pseudo_dirs = [""]
    log: list = []
    fail_puts: set = set()

    @classmethod
    def _strip_protocol(cls, path):
        return super()._strip_protocol(path[len("logmem://"):] if path.startswith("logmem://") else path)

    def get_file(self, rpath, lpath, *args, **kwargs):
        type(self).log.append(("get", rpath.split("/", 2)[-1]))
        return super().get_file(rpath, lpath, *args, **kwargs)

    def put_file(self, lpath, rpath, *args, **kwargs):
        name = rpath.rsplit("/", 1)[-1]
        if name in type(self).fail_puts:
            raise OSError(f"upload of {name} refused")
        type(self).log.append(("put", rpath.split("/", 2)[-1]))
        return super().put_file(lpath, rpath, *args, **kwargs)

    def rm_file(self, path):
        type(self).log.append(("rm", path.split("/", 2)[-1]))
        return super().rm_file(path)


fsspec.register_implementation("logmem", LoggingMemoryFS, clobber=True)


@pytest.fixture
def url():
    """A fresh prefix of the logging memory filesystem; its log cleared."""
    root = f"o{uuid.uuid4().hex[:10]}"
    LoggingMemoryFS.log.clear()
    LoggingMemoryFS.fail_puts.clear()
    yield f"logmem://{root}/out"
    fs = fsspec.filesystem("logmem")
    if fs.exists(f"/{root}"):
        fs.rm(f"/{root}", recursive=True)


def _remote(url: str) -> dict[str, bytes]:
    fs, path = storage.url_fs(url)
    return {p[len(path) + 1:]: fs.cat_file(p) for p in fs.find(path)}


def _write_fm(job_dir, files: dict[str, bytes]) -> None:
    """An "fm-index" job: open_job (kind marker, lock), its files, the manifest last."""
    with open_job(job_dir, "fm-index") as job:
        for rel, data in files.items():
            (job.path / rel).parent.mkdir(parents=True, exist_ok=True)
            (job.path / rel).write_bytes(data)
        job.seal("fm_index.json", {"ok": True})


def test_staging_is_deleted_after_a_put_and_kept_when_the_put_fails(url):
    with storage.output_dir(url) as staging:
        _write_fm(staging, {"shard-0.bin": b"a" * 100})
    assert not staging.exists()  # the artifact is at the URL: no second copy on local disk
    assert set(_remote(url)) == {".retromem-artifact.json", "shard-0.bin", "fm_index.json"}

    LoggingMemoryFS.fail_puts.add("fm_index.json")  # the manifest's upload fails (after the data went up)
    with pytest.raises(OSError, match="upload of fm_index.json refused"):
        with storage.output_dir(url) as staging:
            assert (staging / "shard-0.bin").read_bytes() == b"a" * 100  # pulled: another machine resumes
            _write_fm(staging, {"shard-1.bin": b"b" * 50})
    assert (staging / "shard-1.bin").is_file() and (staging / "fm_index.json").is_file()  # kept to resume
    assert "fm_index.json" not in _remote(url)  # removed before the tree changed: never a half tree with a manifest
    LoggingMemoryFS.fail_puts.clear()
    LoggingMemoryFS.log.clear()
    with storage.output_dir(url) as again:  # the same command again: resumes from the staging copy
        assert again == staging and (again / "shard-1.bin").read_bytes() == b"b" * 50
    assert not any(op == "get" for op, _ in LoggingMemoryFS.log)  # nothing downloaded: the copy was here
    assert not staging.exists()
    assert _remote(url)["shard-1.bin"] == b"b" * 50 and "fm_index.json" in _remote(url)


def test_overwrite_downloads_only_the_top_level_json_and_replaces_the_tree(url):
    with storage.output_dir(url) as staging:
        _write_fm(staging, {"shard-0.bin": b"old" * 1000, "parts/p-0.bin": b"old part"})
    LoggingMemoryFS.log.clear()
    with storage.output_dir(url, overwrite=True) as staging:
        pulled = sorted(p.relative_to(staging).as_posix() for p in staging.rglob("*") if p.is_file())
        assert pulled == [".retromem-artifact.json", "fm_index.json"]  # the kind marker and manifest only
        with open_job(staging, "fm-index", overwrite=True) as job:  # the job's own check: its kind, so it may
            (job.path / "shard-0.bin").write_bytes(b"new")
            job.seal("fm_index.json", {"ok": "new"})
    gets = [name for op, name in LoggingMemoryFS.log if op == "get"]
    assert sorted(gets) == ["out/.retromem-artifact.json", "out/fm_index.json"]  # never the old artifact
    assert _remote(url)["shard-0.bin"] == b"new" and "parts/p-0.bin" not in _remote(url)  # old files gone
    ops = [(op, name) for op, name in LoggingMemoryFS.log if op != "get"]
    assert ops[-1] == ("put", "out/fm_index.json") and ("rm", "out/parts/p-0.bin") in ops
    assert ops.index(("rm", "out/fm_index.json")) < ops.index(("put", "out/shard-0.bin"))  # unfinished while it changes
    assert not staging.exists()

    # another kind of artifact at the URL: the job refuses to overwrite it, and the URL is untouched
    before = _remote(url)
    with pytest.raises(ConfigError, match="holds a retromem fm-index"):
        with storage.output_dir(url, overwrite=True) as staging:
            open_job(staging, "ngram-index", overwrite=True)
    assert _remote(url) == before
    storage.clear_staging(url)  # starting again from the URL: no overwrite left pending either
    assert not staging.exists() and not staging.with_name(staging.name + storage.PRUNE_SUFFIX).exists()


def test_overwrite_of_a_tree_without_a_marker_pulls_it_so_the_job_refuses(url):
    fs, path = storage.url_fs(url)
    fs.pipe(f"{path}/notes.txt", b"somebody's data")
    fs.pipe(f"{path}/config.json", b"{}")
    with pytest.raises(ConfigError, match="holds no retromem fm-index"):
        with storage.output_dir(url, overwrite=True) as staging:
            assert (staging / "notes.txt").is_file()  # pulled whole: the job sees what it would delete
            open_job(staging, "fm-index", overwrite=True)
    assert _remote(url) == {"notes.txt": b"somebody's data", "config.json": b"{}"}


def test_a_failed_overwrite_resumed_without_the_flag_still_replaces_the_tree(url):
    with storage.output_dir(url) as staging:
        _write_fm(staging, {"old.bin": b"old"})
    with pytest.raises(RuntimeError):
        with storage.output_dir(url, overwrite=True) as staging:
            with open_job(staging, "fm-index", overwrite=True) as job:
                (job.path / "new.bin").write_bytes(b"new")
            raise RuntimeError("killed")
    assert "old.bin" in _remote(url) and "new.bin" not in _remote(url)  # nothing put by the failed run
    with storage.output_dir(url) as staging:  # resumed without --overwrite
        _write_fm(staging, {})
    assert set(_remote(url)) == {".retromem-artifact.json", "new.bin", "fm_index.json"}
    assert json.loads(_remote(url)["fm_index.json"])["ok"] is True

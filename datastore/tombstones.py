"""Takedowns: ``retromem datastore delete`` marks documents deleted in a new version, with an audit entry.

A delete writes no document bytes and rewrites nothing: it adds three small files and a version.

- ``tombstones/vNNNNN.npy``: every doc id deleted as of version N (sorted int64, cumulative), what
  :class:`~retromem.datastore.store.Datastore` reads to refuse them (DocumentDeletedError) and to
  answer ``deleted_doc_ids`` / ``live_chunks``;
- ``audit/vNNNNN.json``: who, when (UTC), why, which doc ids and source ids;
- ``takedown/vNNNNN.npz``: the *probes* of the deleted documents (hashes of 32-byte windows of
  their text and token streams, :mod:`retromem.datastore.takedown`), so that after compaction has
  removed their bytes, ``retromem datastore check-takedown`` can still prove that none remain
  anywhere, without keeping the text it must not keep.

Readers of older versions keep seeing those versions (their tombstone file is another one).
"""

from __future__ import annotations

import getpass
import logging
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from retromem.datastore.atomic import atomic_path, sha256_file, write_json
from retromem.datastore.integrity import SECTION
from retromem.datastore.job import open_job
from retromem.datastore.segments import ensure_version_file, next_integrity, publish_version
from retromem.datastore.store import Datastore
from retromem.datastore.takedown import doc_probes
from retromem.errors import ConfigError

logger = logging.getLogger(__name__)


def _now() -> str:
    import datetime

    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def default_who() -> str:
    try:
        return os.environ.get("USER") or getpass.getuser()
    except Exception:  # no user name in a bare container
        return "unknown"


def read_ids_file(path: str | Path) -> tuple[list[int], list[str]]:
    """(doc ids, source ids) listed in ``path``, one a line: an integer is a doc id, a line
    ``source:ID`` names a source id; blank lines and ``#`` comments are skipped."""
    docs, sources = [], []
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("source:"):
            sources.append(line[len("source:"):])
        else:
            try:
                docs.append(int(line))
            except ValueError:
                raise ConfigError(f"`--ids-file` {path}:{n}: {line!r} is neither a doc id (an integer) nor "
                                  "`source:ID`") from None
    return docs, sources


def resolve(ds: Datastore, doc_ids: Sequence[int], source_ids: Sequence[str]) -> np.ndarray:
    """Sorted unique doc ids named by ``doc_ids`` and ``source_ids`` (every document with that
    source id); ConfigError naming every unknown one."""
    ids = np.asarray(list(doc_ids), dtype=np.int64)
    bad = ids[(ids < 0) | (ids >= ds.num_documents)]
    if len(bad):
        shown = ", ".join(map(str, sorted(set(bad.tolist()))[:20]))
        raise ConfigError(f"`--doc-id`: unknown doc id(s) {shown}: {ds.path} has doc ids 0..{ds.num_documents - 1}")
    found = [ids]
    if source_ids:
        want = pa.array(sorted(set(source_ids)), pa.string())
        seen = set()
        for s, seg in enumerate(ds.segments):
            col = ds._doc_column(s, "source_id")
            hit = np.flatnonzero(np.asarray(pc.is_in(col, value_set=want).to_numpy(zero_copy_only=False), dtype=bool))
            if len(hit):
                found.append(hit + seg.first_doc_id)
                seen.update(pc.take(col, pa.array(hit)).to_pylist())
        missing = sorted(set(source_ids) - seen)
        if missing:
            shown = ", ".join(repr(x) for x in missing[:20]) + (f" and {len(missing) - 20} more" if len(missing) > 20 else "")
            raise ConfigError(f"`--source-id`: no document of {ds.path} has source id {shown}")
    return np.unique(np.concatenate(found))


def delete(path: str | Path, *, doc_ids: Sequence[int] = (), source_ids: Sequence[str] = (), reason: str,
           who: str | None = None) -> dict[str, Any]:
    """Delete documents (by doc id and/or source id) in a new version; returns its audit entry.

    ConfigError for an empty reason, unknown ids (all named), or nothing left to delete."""
    if not str(reason or "").strip():
        raise ConfigError("`--reason` must say why the documents are taken down (it goes into the audit log)")
    if not len(doc_ids) and not len(source_ids):
        raise ConfigError("name the documents to delete: `--doc-id`, `--source-id` or `--ids-file`")
    path = Path(path)
    with open_job(path, "datastore", legacy=("manifest.json",)):
        ensure_version_file(path)
        ds = Datastore.open(path)
        ids = resolve(ds, doc_ids, source_ids)
        already = ids[~ds.is_live_doc(ids)]
        new = ids[ds.is_live_doc(ids)]
        if not len(new):
            raise ConfigError(f"nothing to delete: doc id(s) {', '.join(map(str, already[:20].tolist()))} "
                              f"are already deleted (version {ds.version})")
        v = ds.version + 1
        tomb = np.union1d(ds.deleted_doc_ids, new).astype(np.int64)
        rels = {"tombstones": f"tombstones/v{v:05d}.npy", "audit": f"audit/v{v:05d}.json",
                "probes": f"takedown/v{v:05d}.npz"}
        with atomic_path(path / rels["tombstones"]) as tmp:
            with open(tmp, "wb") as fh:
                np.save(fh, tomb)
        probes = doc_probes(ds, new)
        with atomic_path(path / rels["probes"]) as tmp:
            with open(tmp, "wb") as fh:
                np.savez(fh, **probes)
        entry = {"version": v, "time": _now(), "who": who or default_who(), "why": reason.strip(),
                 "doc_ids": new.tolist(), "source_ids": ds.source_ids(new),
                 "requested": {"doc_ids": len(doc_ids), "source_ids": sorted(set(source_ids))},
                 "already_deleted": already.tolist()}
        write_json(path / rels["audit"], entry)

        bm = ds.manifest
        m = {k: val for k, val in bm.items() if k != SECTION}
        m.update({"version": v, "parent_version": ds.version, "operation": "delete", "created": entry["time"],
                  "tombstones": {"file": rels["tombstones"], "count": int(len(tomb))},
                  "audit": list(bm.get("audit", [])) + [rels["audit"]],
                  "takedown_probes": list(bm.get("takedown_probes", [])) + [rels["probes"]],
                  "counts": {**bm["counts"], "deleted_documents": int(len(tomb))}})
        new_files = {r: {"bytes": (path / r).stat().st_size, "sha256": sha256_file(path / r)} for r in rels.values()}
        old_tomb = {bm["tombstones"]["file"]} if bm.get("tombstones") else set()
        m[SECTION] = next_integrity(bm, new_files, remove=old_tomb)
        publish_version(path, m)
        logger.info("deleted %d documents of %s in version %d", len(new), path, v)
        return entry

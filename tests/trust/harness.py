"""Corrupting every file of every artifact kind, and judging what the library does with it (issue 15).

:func:`build_artifacts` builds small real artifacts (datastore, embeddings, dense index, n-gram
index, FM-index, neighbour table) from a few documents. :func:`cases` lists, for every file of
them, three damages: ``flip`` (64 bytes XOR 0xFF in the middle of the file's payload, same size),
``truncate`` (to half its size) and ``extend`` (64 bytes appended). :func:`run_cases` applies each
to a fresh copy, opens the artifact with its ordinary opener and asks it the questions of
:func:`probe` in a worker process (a segfault there is recorded as a crash, and the worker
restarted), then runs :func:`retromem.datastore.integrity.verify_artifact` on the copy. Each case
ends as one of

- ``error``: a :class:`~retromem.errors.RetromemError` whose message names the damaged file;
- ``correct``: the same answers as the undamaged artifact (the file is not read by these
  questions; verify must still name it);
- ``vague``: a RetromemError that does not name the file; ``traceback``: any other exception;
- ``crash``: the worker died; ``wrong``: different answers and no error (a silent wrong answer).

Used by ``tests/trust/test_corruption.py`` and ``benchmarks/trust_corruption.py``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[2]
DAMAGES = ("flip", "truncate", "extend")
KINDS = ("datastore", "embeddings", "dense-index", "ngram-index", "fm-index", "neighbours")
DIRS = {"datastore": "ds", "embeddings": "emb", "dense-index": "dense", "ngram-index": "ngram", "fm-index": "fm",
        "neighbours": "nbrs"}
NEEDS_MODEL = ("embeddings", "dense-index", "neighbours")  # built from embeddings (the MiniLM model)


def build_artifacts(root: Path, kinds: tuple[str, ...] = KINDS) -> dict[str, Path]:
    """Small real artifacts under ``root`` (about 100 chunks from three demo documents, GPT-2
    tokens, two datastore shards, two n-gram shards); only ``kinds`` (the datastore always)."""
    from retromem.datastore import BuildConfig, build
    from tests.conftest import demo_records, write_jsonl

    root.mkdir(parents=True, exist_ok=True)
    recs = demo_records()
    docs = [{"id": r["id"], "text": r["text"][:6000]} for r in (recs[3], recs[8], recs[9])]
    write_jsonl(root / "docs.jsonl", docs)
    out = {k: root / DIRS[k] for k in KINDS}
    build(BuildConfig(inputs=(str(root / "docs.jsonl"),), out=str(out["datastore"]), tokenizer="gpt2",
                      shard_bytes=4_000, workers=1))
    if "ngram-index" in kinds:
        from retromem.index.ngram_build import NgramBuildConfig, build_ngram_index

        build_ngram_index(out["datastore"], out["ngram-index"], NgramBuildConfig(shard_tokens=1_000, cpus=1), progress=False)
    if "fm-index" in kinds:
        from retromem.index.fm_index import build_fm_index

        build_fm_index(out["datastore"], out["fm-index"], sample_rate=8, block_size=1024, progress=False)
    if any(k in kinds for k in NEEDS_MODEL):
        from retromem.index.dense_build import DenseBuildConfig, build_dense
        from retromem.index.embed import EmbedConfig, embed_datastore
        from retromem.retro.neighbours import NeighboursConfig, compute_neighbours

        embed_datastore(EmbedConfig(datastore=str(out["datastore"]), out=str(out["embeddings"]), batch_size=64, device="cpu"),
                        progress=False)
        build_dense(DenseBuildConfig(embeddings=str(out["embeddings"]), out=str(out["dense-index"]), factory="Flat", tune=False),
                    progress=False)
        compute_neighbours(NeighboursConfig(datastore=str(out["datastore"]), out=str(out["neighbours"]),
                                            index=str(out["dense-index"]), k=2, eval_fraction=0.34, shard_chunks=40),
                           progress=False)
    return {k: v for k, v in out.items() if k in kinds or k == "datastore"}


def artifact_files(path: Path) -> list[str]:
    """The files of an artifact a damage can hit: every recorded file and the manifest."""
    from retromem.datastore.integrity import MANIFESTS, artifact_kind, artifact_files as files

    manifest = MANIFESTS[artifact_kind(path)]
    return files(path, exclude=(manifest,)) + [manifest]


# -- damage ---------------------------------------------------------------------------------------


def damage(path: Path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "flip":
        start = 0
        if path.suffix == ".npy":  # the payload, not the header (a damaged header is easy to see)
            from retromem.datastore.integrity import npy_header

            start = npy_header(path)[2]
        n = min(64, max(1, (len(data) - start) // 4))
        at = start + (len(data) - start - n) // 2
        for i in range(at, at + n):
            data[i] ^= 0xFF
    elif how == "flip-head":  # the first bytes: headers, magic numbers, the JSON's first brace
        for i in range(min(16, len(data))):
            data[i] ^= 0xFF
    elif how == "truncate":
        del data[len(data) // 2:]
    elif how == "extend":
        data += bytes(range(1, 65))
    else:
        raise ValueError(how)
    path.write_bytes(bytes(data))


# -- questions --------------------------------------------------------------------------------------


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def probe(kind: str, path: str, datastore: str, tokenizer: bool = False, verify: bool = True) -> Any:
    """Open the artifact with its ordinary opener and answer questions that read every part of it;
    the answers (JSON) are compared with the undamaged artifact's. ``tokenizer``: also load the
    datastore's tokenizer and encode a text (about a second; asked when the damage can reach it).
    ``verify=False`` opens the indexes without their checksum check (to measure what it prevents)."""
    from retromem.datastore import Datastore

    if kind == "datastore":
        ds = Datastore.open(path)
        ids = np.arange(ds.num_chunks)
        toks, lens = ds.tokens(ids)
        return {"texts": _digest(ds.chunk_texts(ids)), "tokens": _digest(toks.tolist()), "lens": lens.tolist(),
                "docs": ds.doc_ids(ids).tolist(), "next": ds.continuation_ids(ids).tolist(),
                "nbr": _digest(ds.neighbour_tokens(ids)[0].tolist()),
                "documents": [[d.source_id, d.n_tokens, d.first_chunk_id, _digest(d.text)]
                              for d in (ds.document(i) for i in range(ds.num_documents))],
                "encode": ds.tokenizer.encode("The Python tutorial explains sorting.") if tokenizer else None}
    ds = Datastore.open(datastore)
    if kind == "embeddings":
        from retromem.index.embed import Embeddings

        return _digest(Embeddings(path).get(np.arange(ds.num_chunks)).round(3).tolist())
    if kind == "dense-index":
        from retromem.index.dense import DenseIndex

        idx = DenseIndex.open(path, datastore=ds, verify=verify)
        rng = np.random.default_rng(0)
        q = rng.standard_normal((8, idx.dim)).astype(np.float32)
        q /= np.linalg.norm(q, axis=1, keepdims=True)
        r = idx.search(q, 5)
        r2 = idx.search(q, 5, exclude_doc_ids=[[0]] * 8)
        return {"ids": r.chunk_ids.tolist(), "ex": r2.chunk_ids.tolist(), "s": np.round(r.scores, 3).tolist()}
    if kind == "ngram-index":
        from retromem.index.ngram import NgramIndex

        idx = NgramIndex(path, ds, verify=verify)
        out = {}
        # GPT-2 ids (" the", " of", " the", " to", " Python", " a", "."): no tokenizer load per case
        for q in ([262], [286, 262], [284], [11361], [257], [13]):
            f = idx.find(q, limit=50)
            out[str(q)] = [f.count, [(o.doc_id, o.chunk_id, o.offset) for o in f.occurrences],
                           idx.prob(q, 262).cont_count, idx.infgram_prob(q, 318).prompt_count,
                           sorted((t, c.count) for t, c in idx.next_token_distribution(q).tokens.items()),
                           idx.search_documents([[q], [[290]]]).count]
        out["score"] = [round(s.prob, 6) for s in idx.score([464, 11361, 318, 257, 3303, 286, 262, 13])]
        return out
    if kind == "fm-index":
        from retromem.index.fm_index import FMIndex

        fm = FMIndex(path, ds, verify=verify)
        return {p: [fm.count(p), [(h.doc_id, h.offset, h.chunk_id) for h in fm.find(p, limit=50).hits]]
                for p in ("the", "Python", "e", "tion", " of ")}
    if kind == "neighbours":
        from retromem.retro.neighbours import NeighbourTable

        t = NeighbourTable(path, ds)
        return {"ids": t.chunk_ids.tolist(), "nbrs": t.neighbours.tolist()}
    raise ValueError(kind)


def worker() -> None:
    """Read one case per line on stdin, answer one JSON line on stdout (``python -m tests.trust.harness``)."""
    from retromem.errors import RetromemError

    for line in sys.stdin:
        case = json.loads(line)
        try:
            reply = {"answer": _digest(probe(case["kind"], case["path"], case["datastore"], case.get("tokenizer", False),
                                             case.get("verify", True)))}
        except RetromemError as exc:
            reply = {"error": type(exc).__name__, "message": str(exc)}
        except Exception as exc:  # noqa: BLE001  what the harness is looking for
            reply = {"traceback": type(exc).__name__, "message": str(exc)[:300]}
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()


class Worker:
    """A worker process answering probes; restarted after a crash."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen | None = None

    def ask(self, case: dict) -> dict:
        if self.proc is None or self.proc.poll() is not None:
            env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
            self.proc = subprocess.Popen([sys.executable, "-m", "tests.trust.harness"], cwd=REPO, env=env, text=True,
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        self.proc.stdin.write(json.dumps(case) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            rc = self.proc.wait()
            self.proc = None
            return {"crash": rc}
        return json.loads(line)

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(timeout=30)
        self.proc = None


# -- cases ------------------------------------------------------------------------------------------


@dataclass
class Outcome:
    kind: str
    file: str
    damage: str
    result: str  # error | correct | vague | traceback | crash | wrong
    verify: str  # named | missed | unrecorded
    message: str = ""


def cases(artifacts: dict[str, Path]) -> list[tuple[str, str, str]]:
    """(kind, relative file, damage) for every file of every artifact and every damage."""
    out = []
    for kind, path in artifacts.items():
        for rel in artifact_files(path):
            for how in DAMAGES:
                out.append((kind, rel, how))
    return out


def _tokenizer(kind: str, rel: str) -> bool:
    """Whether the damage can reach the datastore's tokenizer (then the probe loads it)."""
    return kind == "datastore" and (rel.startswith("tokenizer/") or rel == "manifest.json")


def references(artifacts: dict[str, Path], worker: Worker, selected: list[tuple[str, str, str]]) -> dict:
    ds = str(artifacts["datastore"])
    refs = {}
    for key in sorted({(kind, _tokenizer(kind, rel)) for kind, rel, _ in selected}):
        reply = worker.ask({"kind": key[0], "path": str(artifacts[key[0]]), "datastore": ds, "tokenizer": key[1]})
        assert "answer" in reply, f"the undamaged {key[0]} does not answer: {reply}"
        refs[key] = reply["answer"]
    return refs


def run_case(artifacts: dict[str, Path], refs: dict, worker: Worker, scratch: Path,
             kind: str, rel: str, how: str) -> Outcome:
    """Damage a copy of the artifact (the datastore too when it is the one damaged), probe, verify."""
    from retromem.datastore.integrity import verify_artifact

    where = scratch / f"{DIRS[kind]}-{rel.replace('/', '_')}-{how}"
    if where.exists():
        shutil.rmtree(where)
    copy = where / DIRS[kind]
    shutil.copytree(artifacts[kind], copy)
    ds = copy if kind == "datastore" else artifacts["datastore"]
    damage(copy / rel, how)
    reply = worker.ask({"kind": kind, "path": str(copy), "datastore": str(ds), "tokenizer": _tokenizer(kind, rel)})
    name = Path(rel).name
    if "crash" in reply:
        result, msg = "crash", f"exit {reply['crash']}"
    elif "traceback" in reply:
        result, msg = "traceback", f"{reply['traceback']}: {reply['message']}"
    elif "error" in reply:
        msg = reply["message"]
        # a shard's array checksum names the array directory and every array it covers
        result = "error" if name in msg or (rel.startswith("arrays/") and "arrays" in msg and name.split(".")[0] in msg) else "vague"
    else:
        result, msg = ("correct" if reply["answer"] == refs[(kind, _tokenizer(kind, rel))] else "wrong"), ""
    report = verify_artifact(copy)
    if not report.recorded and not report.problems:
        verify = "unrecorded"
    else:
        verify = "named" if any(p[0] == rel for p in report.problems) else "missed"
    shutil.rmtree(where, ignore_errors=True)
    return Outcome(kind, rel, how, result, verify, msg[:300])


def run_cases(artifacts: dict[str, Path], scratch: Path, selected: list[tuple[str, str, str]] | None = None) -> list[Outcome]:
    selected = selected or cases(artifacts)
    worker = Worker()
    try:
        refs = references(artifacts, worker, selected)
        return [run_case(artifacts, refs, worker, scratch, *c) for c in selected]
    finally:
        worker.close()


def table(outcomes: list[Outcome]) -> dict[str, dict[str, int]]:
    """Counts per artifact kind: results and verify outcomes."""
    out: dict[str, dict[str, int]] = {}
    for o in outcomes:
        row = out.setdefault(o.kind, {})
        row["cases"] = row.get("cases", 0) + 1
        row[o.result] = row.get(o.result, 0) + 1
        row["verify_" + o.verify] = row.get("verify_" + o.verify, 0) + 1
    return out


def as_dicts(outcomes: list[Outcome]) -> list[dict]:
    return [asdict(o) for o in outcomes]


if __name__ == "__main__":
    worker()

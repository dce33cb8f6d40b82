"""The FM-index over a real (small) datastore: counts and hits against brute-force scans of the
document text, document boundaries, agreement with the suffix array, and bad input."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

from retromem.errors import ConfigError
from retromem.index.fm_index import FMIndex, FMIndexError, FMQueryError, build_fm_index
from retromem.index.ngram import NgramIndex
from retromem.index.ngram_build import NgramBuildConfig, build_ngram_index


@pytest.fixture(scope="module")
def ds(built):
    from retromem.datastore import Datastore

    return Datastore.open(built[1].out)


@pytest.fixture(scope="module")
def texts(ds) -> list[str]:
    return [ds.document_text(d) for d in range(ds.num_documents)]


@pytest.fixture(scope="module", params=["compact", "compact-sharded", "fm-index"])
def fm_dir(built, tmp_path_factory, request):
    """Both backends: our compact FM-index (small blocks and samples, to exercise block edges and LF
    walks; and in shards of ~20 kB of text, built by two worker processes) and the fm-index package's."""
    out = tmp_path_factory.mktemp("fm") / request.param
    backend = request.param.split("-sharded")[0]
    kw = {"shard_bytes": 20_000, "workers": 2} if request.param.endswith("sharded") else {}
    build_fm_index(built[1].out, out, backend=backend, sample_rate=8, block_size=1024, progress=False, **kw)
    return out


@pytest.fixture(scope="module")
def fm(fm_dir, ds) -> FMIndex:
    return FMIndex(fm_dir, ds)


def brute(texts, pattern) -> set[tuple[int, int]]:
    out = set()
    for d, t in enumerate(texts):
        i = t.find(pattern)
        while i >= 0:
            out.add((d, i))
            i = t.find(pattern, i + 1)  # overlapping occurrences count too
    return out


def test_count_and_find_match_brute_force(fm, texts):
    rng = np.random.default_rng(0)
    for _ in range(40):
        t = texts[int(rng.integers(len(texts)))]
        n = int(rng.integers(1, 40))
        s = int(rng.integers(0, len(t) - n))
        p = t[s : s + n]
        truth = brute(texts, p)
        assert fm.count(p) == len(truth), p
        f = fm.find(p, limit=len(truth))
        assert f.count == len(truth) and {(h.doc_id, h.offset) for h in f.hits} == truth
    assert fm.count("zqxjv unseen string zqxjv") == 0


def test_rank_equals_a_count_over_the_whole_bwt(fm):
    """rank(c, i) through block checkpoints and in-block count tables equals a plain count over the
    decompressed Burrows-Wheeler transform, at block and table-step edges and in between."""
    if fm.backend != "compact":
        pytest.skip("the fm-index package has its own rank")
    e = fm._shards[-1][2]
    bwt = np.frombuffer(b"".join(e._block(b) for b in range(len(e.offsets) - 1)), dtype=np.uint8)
    assert len(bwt) == e.rows
    rng = np.random.default_rng(1)
    edges = [i + d for i in range(0, e.rows, 512) for d in (-1, 0, 1)]
    positions = [i for i in edges + rng.integers(0, e.rows + 1, 300).tolist() if 0 <= i <= e.rows]
    for c in np.unique(bwt)[:12].tolist() + [0]:
        for i in positions:
            want = int(np.count_nonzero(bwt[:i] == c)) - (c == 0 and i > e.dollar_row)
            assert e.rank(c, i) == want, (c, i)


def test_shards_hold_whole_documents_and_resume(built, ds, tmp_path):
    """Shards cut at document boundaries with at most shard_bytes of text (a longer document alone);
    a build killed after some shards keeps them and finishes the rest; the result equals one piece's."""
    from retromem.index.fm_index import _shard_ranges

    offs = np.asarray(ds.doc_byte_offsets_array, dtype=np.int64)
    ranges = _shard_ranges(offs, 20_000)
    assert ranges[0][0] == 0 and ranges[-1][1] == ds.num_documents
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    assert all(offs[d1] - offs[d0] <= 20_000 or d1 == d0 + 1 for d0, d1 in ranges)
    out = tmp_path / "fm"
    full = build_fm_index(built[1].out, out, shard_bytes=20_000, progress=False)
    n = len(full.manifest["shards"])
    assert n == len(ranges) > 2
    # simulate a kill after the first shard: no manifest, the first shard's done-marker kept
    marker = out / "_work" / "shard-00000.json"
    marker.parent.mkdir(exist_ok=True)
    marker.write_text(json.dumps({"dir": "shard-00000", **full.manifest["shards"][0],
                                  "files": [f for f in full.manifest["file_bytes"] if f.startswith("shard-00000/")]}))
    before = (out / "shard-00000" / "bwt.zst").stat().st_mtime_ns
    (out / "fm_index.json").unlink()
    again = build_fm_index(built[1].out, out, shard_bytes=20_000, progress=False)
    assert (out / "shard-00000" / "bwt.zst").stat().st_mtime_ns == before  # kept, not rebuilt
    assert again.manifest["shards"] == full.manifest["shards"]
    one = FMIndex(build_fm_index(built[1].out, tmp_path / "one", progress=False).path, ds)
    sharded = FMIndex(out, ds)
    for p in ("the", "Python", "interpreter", "zqxjv"):
        assert sharded.count(p) == one.count(p)
        every = {(h.doc_id, h.offset) for h in one.find(p, limit=100_000).hits}
        assert {(h.doc_id, h.offset) for h in sharded.find(p, limit=100_000).hits} == every
        assert {(h.doc_id, h.offset) for h in sharded.find(p, limit=5).hits} <= every  # which 5: suffix-array order
    with pytest.raises(ConfigError, match="shard_bytes"):
        build_fm_index(built[1].out, tmp_path / "bad", shard_bytes=0, progress=False)


def test_hits_map_to_their_chunk_and_context(fm, ds, texts):
    p = texts[4][5000:5030]
    for h in fm.find(p, limit=5).hits:
        (chunk,) = ds.chunks([h.chunk_id])
        assert chunk.doc_id == h.doc_id and chunk.char_start <= h.offset < chunk.char_end
        c = fm.context(h, len(p), window=50)
        assert c.text[c.match_start : c.match_end] == p and len(c.text) <= len(p) + 100


def test_nothing_matches_across_documents(fm, texts):
    for d in range(len(texts) - 1):
        p = texts[d][-8:] + texts[d + 1][:8]
        assert fm.count(p) == len(brute(texts, p))
        assert len(brute(texts[d : d + 1], p)) == 0 < len(brute([texts[d] + texts[d + 1]], p))


def test_suffix_array_and_fm_index_agree(fm, ds, texts, built, tmp_path):
    """Every token n-gram occurrence the suffix array finds is a text occurrence the FM-index finds,
    at the same document and character offset."""
    sa = NgramIndex(build_ngram_index(built[1].out, tmp_path / "sa", NgramBuildConfig(cpus=1), progress=False).path, ds)
    tok = ds.tokenizer
    rng = np.random.default_rng(3)
    checked = 0
    for _ in range(30):
        d = int(rng.integers(ds.num_documents))
        toks, lens = ds.tokens(ds.document_chunk_ids(d))
        stream = np.concatenate([t[:n] for t, n in zip(toks, lens)]).tolist()
        n = int(rng.integers(2, 12))
        s = int(rng.integers(0, len(stream) - n))
        ng = stream[s : s + n]
        text = tok.decode(ng)
        if "\ufffd" in text:
            continue  # the n-gram cuts a multi-byte character: no text to compare
        sa_f = sa.find(ng, limit=3)
        fm_hits = {(h.doc_id, h.offset) for h in fm.find(text, limit=100_000).hits}
        assert fm.count(text) >= sa_f.count >= 1
        for o in sa_f.occurrences:
            otoks, olens = ds.tokens(ds.document_chunk_ids(o.doc_id))
            prefix = tok.decode(np.concatenate([t[:k] for t, k in zip(otoks, olens)])[: o.offset].tolist())
            assert texts[o.doc_id].startswith(prefix)
            assert (o.doc_id, len(prefix)) in fm_hits
            checked += 1
    assert checked >= 20


def test_bad_input(fm, fm_dir, ds, tmp_path, corpus_dir):
    with pytest.raises(FMQueryError, match="empty"):
        fm.count("")
    with pytest.raises(FMQueryError, match="max_query_chars=10"):
        FMIndex(fm_dir, ds, max_query_chars=10).count("x" * 11)
    with pytest.raises(FMQueryError, match="NUL"):
        fm.count("a\x00b")
    with pytest.raises(TypeError, match="must be text"):
        fm.count([1, 2])
    with pytest.raises(FMIndexError, match="not an FM-index"):
        FMIndex(tmp_path, ds)
    copy = tmp_path / "copy"
    shutil.copytree(fm_dir, copy)
    name = max(fm.manifest["file_bytes"], key=fm.manifest["file_bytes"].get)  # the index proper
    data = copy / name
    data.write_bytes(data.read_bytes()[:-100])
    with pytest.raises(FMIndexError, match="truncated"):
        FMIndex(copy, ds)
    data.unlink()
    with pytest.raises(FMIndexError, match="missing"):
        FMIndex(copy, ds)
    from retromem.datastore import BuildConfig, build

    other = tmp_path / "other"
    build(BuildConfig(inputs=(str(corpus_dir / "b.jsonl"),), out=str(other), tokenizer="gpt2", workers=1))
    with pytest.raises(FMIndexError, match="was built from datastore"):
        FMIndex(fm_dir, other)


def test_cli_build_fm_and_query(built, tmp_path):
    from retromem.cli import main

    out = tmp_path / "fm"
    r = CliRunner().invoke(main, ["index", "build-fm", built[1].out, "--out", str(out)])
    assert r.exit_code == 0 and "of the corpus bytes" in r.output, r.output
    assert json.loads((out / "fm_index.json").read_text())["size_ratio"] <= 0.5  # compact backend, the default
    r = CliRunner().invoke(main, ["index", "fm-query", str(out), "interpreter", "--limit", "1"])
    assert r.exit_code == 0 and "occurrences" in r.output and "-> chunk" in r.output
    r = CliRunner().invoke(main, ["index", "fm-query", str(out), ""])
    assert r.exit_code == 2 and "empty" in r.output


@pytest.mark.slow
def test_ray_builds_the_same_shards(built, tmp_path):
    """One Ray task per shard on a local Ray: every file byte-identical to the local build's."""
    pytest.importorskip("ray")
    import ray

    local = build_fm_index(built[1].out, tmp_path / "local", shard_bytes=20_000, progress=False)
    try:
        via_ray = build_fm_index(built[1].out, tmp_path / "ray", shard_bytes=20_000, executor="ray", workers=2, progress=False)
    finally:
        ray.shutdown()
    assert len(local.manifest["shards"]) > 2
    assert via_ray.manifest["integrity"] == local.manifest["integrity"] and via_ray.manifest["shards"] == local.manifest["shards"]

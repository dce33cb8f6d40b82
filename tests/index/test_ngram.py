"""The infini-gram suffix-array index over a real (small) datastore, checked against brute-force
scans of the datastore's own token streams."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

from retromem.index.ngram import NgramIndex, NgramQueryError, QueryLimits
from retromem.index.ngram_build import NgramBuildConfig, NgramIndexError, build_ngram_index
from retromem.errors import RetromemError


@pytest.fixture(scope="module")
def ds(built):
    from retromem.datastore import Datastore

    return Datastore.open(built[1].out)


@pytest.fixture(scope="module")
def streams(ds) -> list[np.ndarray]:
    """Each document's tokens in reading order, from the datastore's chunks."""
    out = []
    for d in range(ds.num_documents):
        toks, lens = ds.tokens(ds.document_chunk_ids(d))
        out.append(np.concatenate([t[:n] for t, n in zip(toks, lens)]).astype(np.int64))
    return out


@pytest.fixture(scope="module")
def ngram_dir(built, tmp_path_factory):
    """Index with small shards, so that queries really span several shards."""
    out = tmp_path_factory.mktemp("ngram") / "idx"
    build_ngram_index(built[1].out, out, NgramBuildConfig(shard_tokens=60_000, cpus=2), progress=False)
    return out


@pytest.fixture(scope="module")
def idx(ngram_dir, ds) -> NgramIndex:
    return NgramIndex(ngram_dir, ds)


def brute_positions(streams, ngram) -> set[tuple[int, int]]:
    ngram = np.asarray(ngram, dtype=np.int64)
    n = len(ngram)
    hits = set()
    for d, s in enumerate(streams):
        if len(s) < n:
            continue
        win = np.lib.stride_tricks.sliding_window_view(s, n)
        for o in np.flatnonzero((win == ngram).all(axis=1)):
            hits.add((d, int(o)))
    return hits


def sample_ngrams(streams, L, rng, k=60):
    """Random n-grams (lengths 1..20) from the corpus; half of them cross a chunk boundary."""
    out = []
    docs = [d for d, s in enumerate(streams) if len(s) > 2 * L]
    for i in range(k):
        s = streams[docs[rng.integers(len(docs))]]
        n = int(rng.integers(1, 21))
        if i % 2 and n > 1:
            b = L * int(rng.integers(1, len(s) // L))  # a chunk boundary inside the document
            start = b - int(rng.integers(1, n))
        else:
            start = int(rng.integers(0, len(s) - n))
        out.append(s[start : start + n].tolist())
    return out


def test_index_layout_and_manifest(idx, ds, ngram_dir):
    m = idx.manifest
    assert m["datastore_id"] == ds.datastore_id
    assert m["counts"]["shards"] >= 2 and len(list(ngram_dir.glob("shard-*/table.0"))) == m["counts"]["shards"]
    assert m["counts"]["tokens"] == int(ds.manifest["counts"]["tokens"])
    assert m["token_dtype"] == "u16" and m["engine"]["package"] == "infini-gram"
    assert not (ngram_dir / "_work").exists()
    # each shard's suffix array is a permutation of its token positions, in sorted order
    for s, sh in enumerate(m["shards"]):
        raw = (ngram_dir / sh["dir"] / "tokenized.0").read_bytes()
        ptrs = idx._ranks_to_ptrs(s, np.arange(sh["tokens"]))
        assert np.array_equal(np.sort(ptrs), np.arange(0, len(raw), 2))
        assert all(raw[a : a + 64] <= raw[b : b + 64] for a, b in zip(ptrs[:-1:37], ptrs[1::37]))


def test_count_and_find_match_brute_force(idx, streams, ds):
    rng = np.random.default_rng(0)
    L = ds.chunk_length
    first = [int(ds.document_chunk_ids(d)[0]) for d in range(ds.num_documents)]
    crossing = 0
    for ng in sample_ngrams(streams, L, rng):
        truth = brute_positions(streams, ng)
        assert idx.count(ng).count == len(truth), ng
        f = idx.find(ng, limit=len(truth) + 1)
        assert f.count == len(truth)
        assert {(o.doc_id, o.offset) for o in f.occurrences} == truth
        for o in f.occurrences[:3]:
            assert o.chunk_id == first[o.doc_id] + o.offset // L and o.chunk_offset == o.offset % L
            crossing += o.chunk_offset + len(ng) > L
    assert crossing > 5  # the sample really exercised n-grams spanning chunk boundaries


def test_suffix_array_search_equals_the_engines_find(idx, streams, ds):
    """count/find search the suffix array themselves (no thread per shard per query): the rank
    ranges must be the engine's own, shard by shard, for n-grams that occur and ones that do not."""
    rng = np.random.default_rng(7)
    grams = sample_ngrams(streams, ds.chunk_length, rng, k=150)
    grams += [rng.integers(0, idx.vocab_size, size=int(rng.integers(1, 4))).tolist() for _ in range(100)]
    grams += [[int(t)] for t in rng.choice(streams[0], 20)]
    for g in grams:
        ours = idx._segments(g)
        r = idx.engine.find(input_ids=g)
        assert sum(hi - lo for lo, hi in ours) == r["cnt"], g
        for (lo, hi), (elo, ehi) in zip(ours, r["segment_by_shard"]):
            assert hi - lo == ehi - elo and (hi == lo or (lo, hi) == (elo, ehi)), g


def test_unseen_ngrams_count_zero(idx, streams):
    rng = np.random.default_rng(1)
    for _ in range(20):
        ng = rng.integers(0, 50_000, size=int(rng.integers(2, 8))).tolist()
        assert idx.count(ng).count == len(brute_positions(streams, ng)) == 0


def test_nothing_matches_across_documents(idx, streams):
    checked = 0
    for d in range(len(streams) - 1):
        a, b = streams[d], streams[d + 1]
        ng = np.concatenate([a[-3:], b[:3]])
        glued = brute_positions([np.concatenate([a, b])], ng)
        assert glued  # it does occur in the two documents glued together ...
        assert idx.count(ng.tolist()).count == len(brute_positions(streams, ng))  # ... never in the index
        checked += 1
    assert checked >= 5


def test_find_hit_fetches_chunk_and_continuation(idx, streams):
    ng = streams[3][100:106].tolist()
    f = idx.find(ng, limit=3)
    (p,) = idx.fetch(f.occurrences[:1])
    o = f.occurrences[0]
    assert p.chunk_id == o.chunk_id and p.doc_id == o.doc_id
    both = np.concatenate([p.tokens, p.continuation_tokens if p.continuation_tokens is not None else []])
    assert both[o.chunk_offset : o.chunk_offset + len(ng)].tolist() == ng
    assert p.continuation_id == o.chunk_id + 1


def test_prob_and_next_token_distribution(idx, streams):
    rng = np.random.default_rng(2)
    for ng in sample_ngrams(streams, 64, rng, k=15):
        if len(ng) < 2:
            continue
        prompt, nxt = ng[:-1], ng[-1]
        pc = len(brute_positions(streams, prompt))
        cc = len(brute_positions(streams, ng))
        p = idx.prob(prompt, nxt)
        assert (p.prompt_count, p.cont_count) == (pc, cc)
        assert p.prob == pytest.approx(cc / pc)
        d = idx.next_token_distribution(prompt)
        if not d.approx:
            assert d.tokens[nxt].count == cc
            followers = {}
            for doc, o in brute_positions(streams, prompt):
                if o + len(prompt) < len(streams[doc]):
                    t = int(streams[doc][o + len(prompt)])
                    followers[t] = followers.get(t, 0) + 1
            assert {t: c.count for t, c in d.tokens.items()} == followers
    assert idx.prob([50_000, 50_001], 5).prob is None  # an unseen prompt has no distribution


def test_infgram_backs_off_to_longest_occurring_suffix(idx, streams):
    seen = streams[5][200:210].tolist()
    prompt = [50_100, 50_200] + seen[:-1]  # an unseen start, then a real 9-token context
    r = idx.infgram_prob(prompt, seen[-1])
    # longest suffix of the prompt that occurs in the corpus, by brute force
    k = max(k for k in range(0, len(prompt) + 1) if k == 0 or brute_positions(streams, prompt[-k:]))
    assert r.suffix_len == k >= 9
    assert r.prompt_count == len(brute_positions(streams, prompt[-k:]))
    assert r.prob == pytest.approx(len(brute_positions(streams, prompt[-k:] + [seen[-1]])) / r.prompt_count)
    d = idx.infgram_next_token_distribution(prompt)
    assert d.suffix_len == k and d.tokens[seen[-1]].prob == pytest.approx(r.prob)
    scores = idx.score(seen)
    assert len(scores) == len(seen) and scores[0].suffix_len == 0 and all(s.prob > 0 for s in scores)


def test_search_documents_cnf(idx, streams):
    a, b = streams[2][50:53].tolist(), streams[2][60:62].tolist()
    r = idx.search_documents([[a], [b]], max_hits=50)
    assert r.count >= 1 and 2 in r.doc_ids
    for h in r.hits:  # every hit is a place where both clauses occur close together in one document
        s = streams[h.doc_id]
        assert s[h.offset : h.offset + len(a)].tolist() == a or s[h.offset : h.offset + len(b)].tolist() == b
        near = s[max(0, h.offset - 120) : h.offset + 120]
        assert brute_positions([near], a) and brute_positions([near], b)
    # a single OR clause counts the union of its n-grams' occurrences
    x, y = streams[4][10:12].tolist(), streams[6][30:33].tolist()
    assume = x[0] != y[0]
    r2 = idx.search_documents([[x, y]])
    if assume:
        assert r2.count == len(brute_positions(streams, x)) + len(brute_positions(streams, y))


def test_text_queries_use_the_datastore_tokenizer(idx, ds):
    text = " the interpreter"
    ids = ds.tokenizer.encode(text, add_special_tokens=False)
    assert idx.count(text) == idx.count(ids) and idx.count(text).count > 0


@pytest.mark.parametrize("bad, exc, msg", [
    ("", NgramQueryError, "empty"),
    ([], NgramQueryError, "empty"),
    ([1, 2, 70_000], NgramQueryError, "outside the vocabulary"),
    ([-1], NgramQueryError, "outside the vocabulary"),
    (list(range(1, 40)), NgramQueryError, "max_query_tokens=32"),
    ([1.5, 2.0], TypeError, "integer token ids"),
    (42, TypeError, "text or a sequence"),
])
def test_bad_queries_raise(ngram_dir, ds, bad, exc, msg):
    idx = NgramIndex(ngram_dir, ds, QueryLimits(max_query_tokens=32))
    with pytest.raises(exc, match=msg):
        idx.count(bad)


def test_bad_cnf_and_next_token(ngram_dir, ds):
    idx = NgramIndex(ngram_dir, ds, QueryLimits(max_clauses=2, max_terms_per_clause=2))
    with pytest.raises(NgramQueryError, match="3 clauses, more than max_clauses=2"):
        idx.search_documents([["a"], ["b"], ["c"]])
    with pytest.raises(NgramQueryError, match=r"cnf\[0\]` has 3 terms"):
        idx.search_documents([[" a", " b", " c"]])
    with pytest.raises(NgramQueryError, match="non-empty"):
        idx.search_documents([])
    with pytest.raises(NgramQueryError, match=r"cnf\[1\]"):
        idx.search_documents([[" a"], []])
    with pytest.raises(NgramQueryError, match="single token"):
        idx.prob(" the", " two tokens")
    with pytest.raises(NgramQueryError, match="outside the vocabulary"):
        idx.infgram_prob([1, 2], 99_999)


def test_index_of_another_datastore_is_refused(tmp_path, corpus_dir, ngram_dir, ds):
    from retromem.datastore import BuildConfig, build

    other = tmp_path / "other"
    build(BuildConfig(inputs=(str(corpus_dir / "a.jsonl.gz"),), out=str(other), tokenizer="gpt2", workers=1))
    with pytest.raises(NgramIndexError, match="was built from datastore"):
        NgramIndex(ngram_dir, other)
    with pytest.raises(NgramIndexError, match="holds an n-gram index of datastore"):
        build_ngram_index(other, ngram_dir, progress=False)


def test_missing_and_truncated_files(tmp_path, ngram_dir, ds):
    with pytest.raises(NgramIndexError, match="not an n-gram index"):
        NgramIndex(tmp_path, ds)
    copy = tmp_path / "copy"
    shutil.copytree(ngram_dir, copy)
    table = copy / "shard-00001" / "table.0"
    table.write_bytes(table.read_bytes()[:-7])
    with pytest.raises(NgramIndexError, match="truncated"):
        NgramIndex(copy, ds)
    table.unlink()
    with pytest.raises(NgramIndexError, match="missing"):
        NgramIndex(copy, ds)


def test_killed_build_resumes(tmp_path, built, monkeypatch, ngram_dir, ds):
    import retromem.index.ngram_build as ng

    out = tmp_path / "resume"
    real = ng._build_suffix_array
    calls = []

    def dies_on_second_shard(shard, *a, **kw):
        calls.append(shard.name)
        if shard.name == "shard-00001":
            raise KeyboardInterrupt("killed")
        return real(shard, *a, **kw)

    monkeypatch.setattr(ng, "_build_suffix_array", dies_on_second_shard)
    with pytest.raises(KeyboardInterrupt):
        build_ngram_index(built[1].out, out, NgramBuildConfig(shard_tokens=60_000, cpus=2), progress=False)
    assert not (out / "ngram_index.json").exists() and (out / "_work" / "shard-00000.table.done.json").exists()
    with pytest.raises(NgramIndexError, match="unfinished build"):
        NgramIndex(out, ds)
    done_table = (out / "shard-00000" / "table.0").stat().st_mtime_ns
    monkeypatch.setattr(ng, "_build_suffix_array", real)
    r = build_ngram_index(built[1].out, out, NgramBuildConfig(shard_tokens=60_000, cpus=2), progress=False)
    assert not r.already_complete
    assert (out / "shard-00000" / "table.0").stat().st_mtime_ns == done_table  # shard 0 was not redone
    for sh in r.manifest["shards"]:  # and the result is the same index as an uninterrupted build
        for f in ("tokenized.0", "table.0", "offset.0"):
            assert (out / sh["dir"] / f).read_bytes() == (ngram_dir / sh["dir"] / f).read_bytes()
    assert build_ngram_index(built[1].out, out, progress=False).already_complete


def test_build_settings_and_foreign_out_refused(tmp_path, built):
    """Settings are checked naming key and flag; --overwrite never deletes a directory that is not
    an n-gram index (a mistyped --out), nor writes into one."""
    from retromem.errors import ConfigError

    with pytest.raises(ConfigError, match=r"`shard_tokens` \(--shard-tokens\) must be a positive integer, got 0"):
        NgramBuildConfig(shard_tokens=0)
    with pytest.raises(ConfigError, match=r"`cpus` \(--cpus\) must be a non-negative integer, got -1"):
        NgramBuildConfig(cpus=-1)
    with pytest.raises(ConfigError, match=r"`mem_bytes` \(--mem\) must be at least 16 MiB"):
        NgramBuildConfig(mem_bytes=1 << 20)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    for overwrite in (False, True):
        with pytest.raises(ConfigError, match="holds no retromem ngram-index"):
            build_ngram_index(built[1].out, mine, NgramBuildConfig(cpus=1), overwrite=overwrite, progress=False)
    assert (mine / "notes.txt").read_text() == "keep me" and sorted(p.name for p in mine.iterdir()) == ["notes.txt"]


def test_cli_build_query_score(tmp_path, built, streams):
    from retromem.cli import main

    run = lambda *a: CliRunner().invoke(main, list(a), catch_exceptions=False)  # noqa: E731
    out = tmp_path / "cli-idx"
    r = run("index", "build-ngram", built[1].out, "--out", str(out), "--shard-tokens", "100000", "--cpus", "1")
    assert r.exit_code == 0, r.output
    assert "bytes per token" in r.output
    ng = streams[1][10:14].tolist()
    r = run("index", "ngram-query", str(out), ",".join(map(str, ng)), "--ids", "--json")
    assert json.loads(r.output)["count"] == len(brute_positions(streams, ng))
    r = run("index", "ngram-query", str(out), " the", "--verb", "find", "--limit", "2")
    assert r.exit_code == 0 and "-> chunk" in r.output
    r = run("index", "ngram-query", str(out), " the", "--verb", "infgram-prob", "--next", " same")
    assert r.exit_code == 0 and "suffix_len=1" in r.output
    r = run("ngram", "score", str(out), "The interpreter reads a line", "--json")
    assert len(json.loads(r.output)) >= 4
    r = CliRunner().invoke(main, ["index", "ngram-query", str(out), "1,2,99999999", "--ids"])
    assert r.exit_code == 2 and "outside the vocabulary" in r.output
    r = CliRunner().invoke(main, ["index", "ngram-query", str(tmp_path), "x"])
    assert r.exit_code == 2 and "not an n-gram index" in r.output
    assert issubclass(NgramQueryError, RetromemError)


def test_score_equals_engine_on_whole_prefixes(idx, streams):
    """score() gives the engine only the tokens the longest suffix can use; same answers as whole prefixes."""
    text = streams[7][:150].tolist() + [50_000] + streams[2][300:400].tolist()
    scores = idx.score(text)
    for i, s in enumerate(scores):
        r = idx.engine.infgram_prob(prompt_ids=text[:i], cont_id=text[i])
        assert (s.prob, s.suffix_len, s.prompt_count, s.cont_count) == (r["prob"], r["suffix_len"], r["prompt_cnt"], r["cont_cnt"])
    assert max(s.suffix_len for s in scores) > 50  # long contexts really were used


def _followers(streams, prompt) -> dict[int, int]:
    out: dict[int, int] = {}
    for doc, o in brute_positions(streams, prompt):
        if o + len(prompt) < len(streams[doc]):
            t = int(streams[doc][o + len(prompt)])
            out[t] = out.get(t, 0) + 1
    return out


def test_next_token_distribution_above_max_support_lists_real_followers_with_exact_counts(ngram_dir, ds, streams):
    """Above ``max_support`` occurrences only a sample is read, but every token listed is a real
    follower with its exact count, and every follower more frequent than count / max_support is
    listed (the engine's sampled answer reported one wrong token with the whole count)."""
    small = NgramIndex(ngram_dir, ds, QueryLimits(max_support=20))
    full = NgramIndex(ngram_dir, ds, QueryLimits(max_support=10**9))
    common = small.encode(" the")
    for prompt in (common, small.encode(" of the")):
        truth = _followers(streams, prompt)
        for idx_, exact in ((small, False), (full, True)):
            d = idx_.next_token_distribution(prompt)
            assert d.prompt_count == len(brute_positions(streams, prompt)) > 20
            assert d.approx == (not exact)
            assert all(truth.get(t) == c.count for t, c in d.tokens.items()), "a listed count is not the true count"
            assert all(c.prob == pytest.approx(c.count / d.prompt_count) for c in d.tokens.values())
            must = {t for t, c in truth.items() if c > d.prompt_count / 20} if d.approx else set(truth)
            assert must and must <= set(d.tokens)
    unigram = small.next_token_distribution([])  # every position: sampled, counts exact
    assert unigram.approx and len(unigram.tokens) > 5
    assert all(small.count([t]).count == c.count for t, c in unigram.tokens.items())
    d = small.infgram_next_token_distribution([50_100] + common)
    assert d.suffix_len == len(common) and d.approx
    assert all(_followers(streams, common).get(t) == c.count for t, c in d.tokens.items())


def test_prob_and_infgram_answer_as_the_engine_without_it(idx, streams):
    """prob and ∞-gram probability come from this process's suffix-array search (no engine thread per
    query): the same counts and probabilities as the engine's, for seen, unseen and empty prompts."""
    rng = np.random.default_rng(11)
    cases = []
    for _ in range(60):
        doc = streams[int(rng.integers(len(streams)))]
        i = int(rng.integers(1, len(doc) - 1))
        n = int(rng.integers(0, min(i, 12) + 1))
        cases.append((doc[i - n : i].tolist(), int(doc[i])))
    cases += [([int(t) for t in rng.integers(0, idx.vocab_size, 3)], int(rng.integers(idx.vocab_size))) for _ in range(20)]
    cases += [([], int(streams[0][0])), (streams[1][:5].tolist(), 49_999)]
    for prompt, t in cases:
        r = idx.engine.prob(prompt_ids=prompt, cont_id=t)
        p = idx.prob(prompt, t)
        assert (p.prompt_count, p.cont_count) == (r["prompt_cnt"], r["cont_cnt"]), prompt
        assert p.prob == (r["prob"] if r["prompt_cnt"] > 0 else None)
        r = idx.engine.infgram_prob(prompt_ids=prompt, cont_id=t)
        g = idx.infgram_prob(prompt, t)
        assert (g.prompt_count, g.cont_count, g.prob, g.suffix_len) == (r["prompt_cnt"], r["cont_cnt"], r["prob"], r["suffix_len"]), prompt


def test_document_search_answers_as_the_engine_without_it(idx, streams):
    """Document search (CNF: AND of ORs of n-grams, near each other in one document) is answered by
    this process's suffix-array search: the same match count and the same match pointers, shard by
    shard, as the engine's find_cnf, over clauses of common and rare n-grams, 1-3 clauses, 1-2 terms
    each, several distances (shards: several, so matches span them)."""
    rng = np.random.default_rng(5)

    def gram(common: bool) -> list[int]:
        doc = streams[int(rng.integers(len(streams)))]
        n = 1 if common else int(rng.integers(2, 4))
        i = int(rng.integers(0, len(doc) - n))
        return doc[i : i + n].tolist()

    checked = matched = 0
    for _ in range(80):
        cnf = [[gram(bool(rng.integers(2))) for _ in range(int(rng.integers(1, 3)))] for _ in range(int(rng.integers(1, 4)))]
        diff = int(rng.choice([1, 5, 20, 100]))
        r = idx.engine.find_cnf(cnf=cnf, max_clause_freq=idx.limits.max_clause_freq, max_diff_tokens=diff)
        mine = idx._find_cnf(cnf, diff)
        if r["approx"]:
            assert mine is None  # a sampled clause is left to the engine's sampling
            continue
        assert mine["cnt"] == r["cnt"], cnf
        engine_ptrs = [sorted(p) for p in r["ptrs_by_shard"]] if r["ptrs_by_shard"] else []
        assert [sorted(p.tolist()) for p in mine["ptrs_by_shard"]] == engine_ptrs or (r["cnt"] == 0 and mine["cnt"] == 0), cnf
        checked += 1
        matched += r["cnt"] > 0
    assert checked >= 60 and matched >= 20  # the comparison saw many real matches, not only empty answers
    # and through the public call: hits located as before
    a, b = streams[2][50:53].tolist(), streams[2][60:62].tolist()
    r = idx.search_documents([[a], [b]], max_hits=50)
    assert r.count >= 1 and 2 in r.doc_ids


def test_document_search_near_max_clause_freq_answers_as_the_engine_and_flags_its_samples(ngram_dir, ds, streams):
    """With a small ``max_clause_freq`` (40: 20 per shard) clauses fall on both sides of a shard's
    share of it. Where this process answers, its matches are the engine's (the engine samples a
    clause above the share, so answering one of those here would differ: tested); where it leaves
    the query to the engine, the public call says approx, which the engine's own flag does not
    always say for a sampled clause."""
    from retromem.index.ngram import QueryLimits

    small = NgramIndex(ngram_dir, ds, limits=QueryLimits(max_clause_freq=40))
    assert len(small._shards) >= 2  # a shard's share of 40 (ceil(40 / shards)) is below 40
    tok, cnt = np.unique(np.concatenate(streams), return_counts=True)
    by_count = tok[np.argsort(cnt, kind="stable")]
    rare = [int(t) for t, c in zip(tok, cnt) if 3 <= c <= 8][:3]  # a few occurrences: the other clause
    # tokens at counts from a handful to thousands, and many around the cap and its per-shard share
    spread = [int(by_count[i]) for i in np.unique(np.geomspace(1, len(by_count) - 1, 40).astype(int))]
    spread += [int(t) for t, c in zip(tok, cnt) if 20 <= c <= 120][:30]
    answered = left = 0
    for a in spread:
        for b in rare:
            cnf = [[[a]], [[b]]]
            r = small.engine.find_cnf(cnf=cnf, max_clause_freq=40, max_diff_tokens=20)
            mine = small._find_cnf(cnf, 20)
            if mine is None:
                assert small.search_documents(cnf, max_diff_tokens=20).approx, cnf
                left += 1
                continue
            assert mine["cnt"] == r["cnt"], cnf
            engine_ptrs = [sorted(p) for p in r["ptrs_by_shard"]] if r["ptrs_by_shard"] else []
            assert [sorted(p.tolist()) for p in mine["ptrs_by_shard"]] == engine_ptrs or r["cnt"] == 0, cnf
            assert not small.search_documents(cnf, max_diff_tokens=20).approx, cnf
            answered += 1
    assert answered >= 20 and left >= 20  # both sides of the share were seen


@pytest.mark.slow  # starts a local Ray
def test_shards_built_at_once_locally_and_on_ray_equal_the_sequential_build(ds, tmp_path):
    """One task per shard: two local worker processes, and Ray tasks on a local Ray, write the same
    files, byte for byte, as the one-at-a-time build (the integrity section holds every file's sha256)."""
    from retromem.errors import ConfigError
    from retromem.index.ngram_build import NgramBuildConfig, build_ngram_index

    small = dict(shard_tokens=max(int(ds.manifest["counts"]["tokens"]) // 3, 1000), cpus=1)
    one = build_ngram_index(ds.path, tmp_path / "one", NgramBuildConfig(**small), progress=False)
    two = build_ngram_index(ds.path, tmp_path / "two", NgramBuildConfig(**small, workers=2), progress=False)
    assert len(one.manifest["shards"]) >= 3
    assert two.manifest["integrity"] == one.manifest["integrity"] and two.manifest["shards"] == one.manifest["shards"]
    ray = pytest.importorskip("ray")
    try:
        via_ray = build_ngram_index(ds.path, tmp_path / "ray", NgramBuildConfig(**small, executor="ray", workers=2),
                                    progress=False)
    finally:
        ray.shutdown()
    assert via_ray.manifest["integrity"] == one.manifest["integrity"]
    with pytest.raises(ConfigError, match="--executor"):
        NgramBuildConfig(executor="spark")

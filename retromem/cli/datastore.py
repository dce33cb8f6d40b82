"""Commands: `retromem datastore build|add|delete|compact|check-takedown|log|info|show|verify`,
`retromem index verify` (any artifact), and
the demo's first two steps (build the demo datastore, read a chunk, its continuation and a
document back)."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

import click

from retromem.cli._common import PATH_OR_URL, fail, fmt_bytes, handle_errors, local_out, parse_size
from retromem.config import from_dict, read_yaml
from retromem.errors import ConfigError, RetromemError


@click.group("datastore")
def group() -> None:
    """Build and inspect datastores (normalize, dedup, tokenize, chunk)."""


@group.command("build")
@click.argument("inputs", nargs=-1)
@click.option("--out", "-o", help="Output datastore directory.")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help="YAML file of build settings (flags override it).")
@click.option("--format", "fmt", type=click.Choice(["auto", "jsonl", "parquet", "text"]), default="auto", show_default=True,
              help="Input format; auto goes by extension (.jsonl/.json/.ndjson, .parquet, anything else is text; .gz/.zst stripped first).")
@click.option("--text-field", default="text", show_default=True, help="JSON field or Parquet column holding the text.")
@click.option("--id-field", default="id", show_default=True, help="JSON field or Parquet column holding the document id ('' for none: file:line).")
@click.option("--tokenizer", default="smollm2-135m", show_default=True, help="Built-in name (smollm2-135m, gpt2), local directory or hub id.")
@click.option("--chunk-length", type=int, default=64, show_default=True, help="Tokens per chunk (RETRO: 64).")
@click.option("--shard-size", default="16MiB", show_default=True, help="Normalized text per shard.")
@click.option("--exact-dedup/--no-exact-dedup", default=True, show_default=True)
@click.option("--near-dedup/--no-near-dedup", default=True, show_default=True)
@click.option("--dedup-threshold", type=float, default=0.8, show_default=True, help="Jaccard similarity of near duplicates.")
@click.option("--dedup-ngram", type=int, default=13, show_default=True, help="Words per MinHash shingle.")
@click.option("--num-perm", type=int, default=128, show_default=True, help="MinHash permutations.")
@click.option("--bloom-fp-rate", type=float, default=1e-5, show_default=True, help="False-positive rate of each LSH band's Bloom filter.")
@click.option("--on-error", type=click.Choice(["raise", "skip"]), default="raise", show_default=True,
              help="Bad records: stop with an error naming file and line, or count, log and skip them.")
@click.option("--workers", type=int, default=0, show_default=True, help="Worker processes (0: one per core).")
@click.option("--executor", type=click.Choice(["local", "ray"]), default="local", show_default=True)
@click.option("--ray-address", default=None, help="Address of an existing Ray cluster (default: start a local one).")
@click.option("--dedup-partitions", type=int, default=0, show_default=True,
              help="Dedup key partitions, one task each (0: from the corpus size and workers); never changes the output.")
@click.option("--overwrite", is_flag=True, help="Delete an existing datastore at --out first.")
@click.option("--keep-work", is_flag=True, help="Keep the _work/ directory of intermediate files.")
@click.option("--json", "as_json", is_flag=True, help="Print the manifest summary as JSON.")
@click.pass_context
@handle_errors
def datastore_build(ctx: click.Context, inputs: tuple[str, ...], out: str | None, config_path: str | None,
                    fmt: str, text_field: str, id_field: str, tokenizer: str, chunk_length: int,
                    shard_size: str, exact_dedup: bool, near_dedup: bool, dedup_threshold: float,
                    dedup_ngram: int, num_perm: int, bloom_fp_rate: float, on_error: str, workers: int,
                    executor: str, ray_address: str | None, dedup_partitions: int, overwrite: bool, keep_work: bool,
                    as_json: bool) -> None:
    """Build a datastore from INPUTS (files, directories or globs; JSONL, Parquet or text; plain, .gz or .zst;
    local paths or URLs such as s3://bucket/prefix/ or gs://b/*.jsonl.gz). --out may be a URL too.

    Re-running the same command after an interruption resumes where it stopped.
    """
    from retromem.datastore import BuildConfig, build

    settings: dict[str, Any] = read_yaml(config_path) if config_path else {}
    dedup = settings.pop("dedup", None) or {}
    if not isinstance(dedup, dict):
        raise ConfigError(f"{config_path}: `dedup` must be a mapping of settings, got {type(dedup).__name__}")
    dedup = dict(dedup)

    def given(name: str) -> bool:
        return ctx.get_parameter_source(name) != click.core.ParameterSource.DEFAULT

    flags = {
        "format": ("fmt", fmt), "text_field": ("text_field", text_field),
        "id_field": ("id_field", id_field or None), "tokenizer": ("tokenizer", tokenizer),
        "chunk_length": ("chunk_length", chunk_length), "shard_bytes": ("shard_size", parse_size(shard_size, "--shard-size")),
        "on_error": ("on_error", on_error), "workers": ("workers", workers), "executor": ("executor", executor),
        "ray_address": ("ray_address", ray_address), "keep_work": ("keep_work", keep_work),
        "dedup_partitions": ("dedup_partitions", dedup_partitions),
    }
    for key, (param, value) in flags.items():
        if given(param) or key not in settings:
            settings[key] = value
    dedup_flags = {"exact": ("exact_dedup", exact_dedup), "near": ("near_dedup", near_dedup),
                   "threshold": ("dedup_threshold", dedup_threshold), "ngram": ("dedup_ngram", dedup_ngram),
                   "num_perm": ("num_perm", num_perm), "near_fp_rate": ("bloom_fp_rate", bloom_fp_rate)}
    for key, (param, value) in dedup_flags.items():
        if given(param) or key not in dedup:
            dedup[key] = value
    settings["dedup"] = dedup
    if inputs:
        settings["inputs"] = list(inputs)
    if out:
        settings["out"] = out
    if not settings.get("inputs"):
        raise ConfigError("no input given: name files, directories or globs, or `inputs:` in --config")
    if not settings.get("out"):
        raise ConfigError("no output given: pass --out DIR (or `out:` in --config)")
    if isinstance(settings.get("shard_bytes"), str):
        settings["shard_bytes"] = parse_size(settings["shard_bytes"], "shard_bytes")
    cfg = from_dict(BuildConfig, settings, where=config_path or "")  # unknown keys refused by name, `dedup.foo` too
    with local_out(cfg.out, overwrite) as out_dir:  # a URL: built in a staging directory, then put there
        result = build(dataclasses.replace(cfg, out=out_dir), overwrite=overwrite)
    if as_json:
        click.echo(json.dumps(_summary(result.manifest), indent=2))
        return
    if result.already_complete:
        click.echo(f"{cfg.out} is already complete (same inputs and settings); nothing to do.")
    print_summary(result.manifest, result.seconds)


def _summary(m: dict[str, Any]) -> dict[str, Any]:
    return {"datastore_id": m["datastore_id"], "counts": m["counts"], "tokenizer": m["tokenizer"],
            "chunk_length": m["chunk_length"], "dedup": m["dedup"]}


def print_summary(m: dict[str, Any], seconds: dict[str, float] | None = None) -> None:
    c, d, t = m["counts"], m["dedup"], m["tokenizer"]
    skipped = sum(d["skipped"].values())
    lines = [
        f"datastore   {m['datastore_id'][:16]}  (format {m['format_version']}, {m['created_by']})",
        f"tokenizer   {t['name']}  vocab {t['vocab_size']:,}  {t['token_dtype']}  sha256:{t['vocab_hash'][:12]}",
        f"documents   {d['input_documents']:,} read -> {skipped:,} skipped, {d['removed_exact']:,} exact duplicates, "
        f"{d['removed_near']:,} near duplicates removed -> {c['documents']:,} kept",
        f"chunks      {c['chunks']:,} of {m['chunk_length']} tokens  ({c['tokens']:,} tokens, {c['shards']} shards)",
        f"text        {fmt_bytes(c['text_bytes'])} normalized UTF-8",
        f"dedup       MinHash {d['num_perm']} perms, {d['bands']} bands x {d['rows']} rows, {d['ngram']}-word shingles, "
        f"Jaccard {d['threshold']}; Bloom memory {fmt_bytes(d['bloom_bytes_this_build'])} here, "
        f"{fmt_bytes(d['bloom_bytes_per_billion_documents'])} per billion documents",
    ]
    if skipped:
        lines.append("skipped     " + ", ".join(f"{k}: {v:,}" for k, v in sorted(d["skipped"].items())) + "  (see skipped.txt)")
    if seconds:
        # the pipeline's own time: loading the tokenizer is a one-off, not per byte
        total = seconds.get("total", 0.0) - seconds.get("tokenizer", 0.0)
        mb = c["input_chars"] / 1e6
        lines.append("time        " + "  ".join(f"{k} {v:.1f}s" for k, v in seconds.items()))
        if total:
            lines.append(f"throughput  {mb / total:.2f} MB/s of input text, {c['tokens'] / total:,.0f} tokens/s")
    click.echo("\n".join(lines))


def _detection_line(d: dict[str, Any]) -> str:
    """The LSH detection curve of the banding this datastore was deduplicated with."""
    from retromem.datastore.dedup import detection_curve, detection_midpoint

    b, r = d["bands"], d["rows"]
    curve = "  ".join(f"{s:.2f}:{p:.2f}" for s, p in detection_curve(b, r))
    return (f"near-dup    P(caught) by Jaccard  {curve}  (50% at {detection_midpoint(b, r):.3f}, "
            f"threshold {d['threshold']})")


@group.command("info")
@click.argument("path", type=PATH_OR_URL)
@click.option("--json", "as_json", is_flag=True, help="Print the whole manifest as JSON.")
@click.option("--verify", is_flag=True, help="Recompute and check every checksum.")
@handle_errors
def datastore_info(path: str, as_json: bool, verify: bool) -> None:
    """Counts, tokenizer, sizes and dedup statistics of the datastore at PATH."""
    from retromem.datastore import Datastore

    ds = Datastore.open(path)
    if as_json:
        click.echo(json.dumps(ds.manifest, indent=2))
    else:
        print_summary(ds.manifest)
        click.echo(f"version     {ds.version}  ({len(ds.segments)} segment(s), {len(ds.deleted_doc_ids):,} deleted documents; "
                   f"`retromem datastore log` lists versions and takedowns)")
        if ds.metadata_fields:
            click.echo("metadata    " + ", ".join(f"{k}: {v}" for k, v in ds.metadata_fields.items()))
        click.echo(_detection_line(ds.manifest["dedup"]))
        on_disk = sum(f.stat().st_size for f in ds.path.rglob("*") if f.is_file())  # a URL: its local mirror
        click.echo(f"on disk     {fmt_bytes(on_disk)}  ({on_disk / max(ds.manifest['counts']['tokens'], 1):.2f} bytes per token)")
    if verify:
        problems = ds.verify()
        for p in problems:
            click.echo(f"checksum: {p}", err=True)
        if problems:
            sys.exit(1)
        click.echo("verify      all checksums match")


@group.command("show")
@click.argument("path", type=PATH_OR_URL)
@click.argument("chunk_id", type=int)
@click.option("--json", "as_json", is_flag=True)
@click.option("--continuation/--no-continuation", default=True, show_default=True, help="Also show the next chunk of the document.")
@handle_errors
def datastore_show(path: str, chunk_id: int, as_json: bool, continuation: bool) -> None:
    """Show chunk CHUNK_ID of the datastore at PATH: text, tokens, document, continuation."""
    from retromem.datastore import Datastore

    ds = Datastore.open(path)
    try:
        (chunk,) = ds.chunks([chunk_id])
    except IndexError as exc:
        raise ConfigError(str(exc)) from exc
    doc = ds.document(chunk.doc_id)
    nxt = ds.chunks([chunk.continuation_id])[0] if continuation and chunk.continuation_id is not None else None
    if as_json:
        record = {
            "chunk_id": chunk.chunk_id, "doc_id": chunk.doc_id, "position": chunk.position,
            "char_span": [chunk.char_start, chunk.char_end], "tokens": chunk.tokens.tolist(), "text": chunk.text,
            "document": {"source": doc.source, "source_id": doc.source_id, "n_chunks": doc.n_chunks},
            "continuation": None if nxt is None else {"chunk_id": nxt.chunk_id, "tokens": nxt.tokens.tolist(), "text": nxt.text},
        }
        click.echo(json.dumps(record, indent=2, ensure_ascii=False))
        return
    click.echo(f"chunk {chunk.chunk_id}: document {chunk.doc_id} ({doc.source_id} from {doc.source}), "
               f"chunk {chunk.position + 1} of {doc.n_chunks}, chars {chunk.char_start}..{chunk.char_end}, {len(chunk.tokens)} tokens")
    click.echo(f"tokens: {chunk.tokens.tolist()}")
    click.echo("text:\n" + click.style(chunk.text, fg="green"))
    if nxt is not None:
        click.echo(f"continuation (chunk {nxt.chunk_id}):\n" + click.style(nxt.text, fg="cyan"))
    elif continuation:
        click.echo("continuation: none (last chunk of its document)")


# ---------------------------------------------------------------------------------------------
# verify


def _open_checked(kind: str, path: Path, datastore: str | None) -> None:
    """Open the artifact with its own opener (its structural checks), checksums left to the caller."""
    if kind == "embeddings":
        from retromem.index.embed import Embeddings

        emb = Embeddings(path)
        for i in range(len(emb.shards)):
            emb.shard(i)
        return
    from retromem.datastore import Datastore

    ds = Datastore.open(datastore) if datastore else None
    if kind == "dense-index":
        from retromem.index.dense import DenseIndex

        DenseIndex.open(path, datastore=ds, verify=False)
    elif kind == "ngram-index":
        from retromem.index.ngram import NgramIndex

        NgramIndex(path, ds, verify=False)
    elif kind == "fm-index":
        from retromem.index.fm_index import FMIndex

        FMIndex(path, ds, verify=False)
    elif kind == "neighbours":
        from retromem.retro.neighbours import NeighbourTable

        NeighbourTable(path, ds)


def verify_path(path: str | Path, datastore: str | None = None, echo=click.echo) -> list[str]:
    """Check the artifact at ``path`` (any kind): every recorded checksum, then its opener's
    structural checks. Prints what was checked; returns ``file: what`` for each problem."""
    import time

    from retromem import storage
    from retromem.datastore.integrity import VerifyReport, artifact_kind, recorded_files, verify_artifact

    path = storage.local_dir(str(path))  # a URL (`serve --verify`): the local mirror the server will open
    kind = artifact_kind(path)
    if kind == "datastore":
        from retromem.datastore import Datastore

        t0 = time.perf_counter()
        try:
            ds = Datastore.open(path)
        except RetromemError as exc:  # structure broken: name every damaged file from the checksums
            report = verify_artifact(path, kind)
            return [f"{path / rel}: {what}" for rel, what in report.problems] or [str(exc)]
        problems = [f"{path / p}" for p in ds.verify()]  # every file, then damaged arrays shard by shard
        files = recorded_files(ds.manifest) or {}
        report = VerifyReport(path, kind, bool(files), len(files), sum(int(r["bytes"]) for r in files.values()),
                              time.perf_counter() - t0)
    else:
        report = verify_artifact(path, kind)
        problems = [f"{path / rel}: {what}" for rel, what in report.problems]
        if not problems:
            try:
                _open_checked(kind, path, datastore)
            except RetromemError as exc:
                problems.append(str(exc))
    if not report.recorded:
        echo(f"note: {path} ({kind}) records no checksums (written before retromem recorded them): "
             "structural checks only" + (" and the shards' own checksums" if kind == "datastore" else ""))
    elif not problems:
        echo(f"{path} ({kind}): {report.files} files, {fmt_bytes(report.bytes)}: every checksum matches "
             f"and the structure is sound ({report.seconds:.1f}s)")
    return problems


def _report(problems: list[str]) -> None:
    if problems:
        for p in problems[:-1]:
            click.echo(f"error: {p}", err=True)
        fail(problems[-1])


@group.command("verify")
@click.argument("path", type=click.Path(exists=True, file_okay=False))
@click.option("--all-versions", is_flag=True, help="Check every readable version, not only the newest.")
@handle_errors
def datastore_verify(path: str, all_versions: bool) -> None:
    """Recompute the checksum of every file of the datastore at PATH and check its structure; name
    each damaged file (`error: FILE: what`, exit 2)."""
    if not all_versions:
        _report(verify_path(path))
        return
    from retromem.datastore import Datastore
    from retromem.datastore.segments import list_versions

    problems: list[str] = []
    for v in list_versions(path) or [1]:
        try:
            ds = Datastore.open(path, version=v)
        except RetromemError as exc:
            if "no longer readable" in str(exc):
                click.echo(f"version {v}: compacted away (not readable)")
                continue
            problems.append(f"version {v}: {exc}")
            continue
        found = ds.verify()
        problems += [f"version {v}: {Path(path) / p}" for p in found]
        if not found:
            click.echo(f"version {v}: every checksum matches and the structure is sound")
    _report(problems)


# ---------------------------------------------------------------------------------------------
# growing and forgetting (issue 18)


@group.command("add")
@click.argument("path", type=PATH_OR_URL)
@click.argument("inputs", nargs=-1, required=True)
@click.option("--format", "fmt", type=click.Choice(["auto", "jsonl", "parquet", "text"]), default="auto", show_default=True)
@click.option("--text-field", default="text", show_default=True)
@click.option("--id-field", default="id", show_default=True, help="'' for none: file:line.")
@click.option("--shard-size", default=None, help="Normalized text per shard (default: the datastore's).")
@click.option("--on-error", type=click.Choice(["raise", "skip"]), default="raise", show_default=True)
@click.option("--workers", type=int, default=0, show_default=True)
@click.option("--executor", type=click.Choice(["local", "ray"]), default="local", show_default=True)
@click.option("--ray-address", default=None)
@handle_errors
def datastore_add(path: str, inputs: tuple[str, ...], fmt: str, text_field: str, id_field: str, shard_size: str | None,
                  on_error: str, workers: int, executor: str, ray_address: str | None) -> None:
    """Append INPUTS to the datastore at PATH as a new segment and version: ids continue, documents
    already in it (exactly or nearly) are dropped. Re-run the same command to resume a killed add."""
    from retromem.datastore.pipeline import add

    with local_out(path) as ds_dir:  # a URL: added in a staging copy, then put back, manifest last
        res = add(ds_dir, list(inputs), format=fmt, text_field=text_field, id_field=id_field or None,
                  on_error=on_error, shard_bytes=parse_size(shard_size, "--shard-size") if shard_size else None,
                  workers=workers, executor=executor, ray_address=ray_address)
    seg, d = res.segment, res.manifest["dedup"]
    ids = (f"doc ids {seg['first_doc_id']}..{seg['first_doc_id'] + seg['n_docs'] - 1}" if seg["n_docs"]
           else "every input document was already in the datastore")
    click.echo(f"version {res.version}: segment {seg['name']} with {seg['n_docs']:,} documents ({ids}), "
               f"{seg['n_chunks']:,} chunks, {seg['n_tokens']:,} tokens; {fmt_bytes(res.bytes_written)} written in "
               f"{res.seconds['total']:.1f}s")
    click.echo(f"dedup       the whole datastore now: {d['removed_exact']:,} exact and {d['removed_near']:,} near "
               f"duplicates removed, {d['kept']:,} kept")


@group.command("delete")
@click.argument("path", type=click.Path(exists=True, file_okay=False))
@click.option("--doc-id", "doc_ids", type=int, multiple=True, help="A doc id to delete (repeatable).")
@click.option("--source-id", "source_ids", multiple=True, help="Delete every document with this source id (repeatable).")
@click.option("--ids-file", type=click.Path(exists=True, dir_okay=False),
              help="A file of ids, one a line: an integer is a doc id, `source:ID` a source id.")
@click.option("--reason", required=True, help="Why (copyright, privacy request #123, ...): kept in the audit log.")
@click.option("--who", default=None, help="Who asked or approved (default: the user name).")
@handle_errors
def datastore_delete(path: str, doc_ids: tuple[int, ...], source_ids: tuple[str, ...], ids_file: str | None,
                     reason: str, who: str | None) -> None:
    """Delete documents (tombstones in a new version, an audit log entry). Reads refuse them at once;
    `retromem datastore compact` then removes their bytes."""
    from retromem.datastore.tombstones import delete, read_ids_file

    docs, sources = list(doc_ids), list(source_ids)
    if ids_file:
        more_docs, more_sources = read_ids_file(ids_file)
        docs += more_docs
        sources += more_sources
    entry = delete(path, doc_ids=docs, source_ids=sources, reason=reason, who=who)
    n = len(entry["doc_ids"])
    click.echo(f"version {entry['version']}: deleted {n:,} document(s) ({_ids_text(entry['doc_ids'])}) "
               f"by {entry['who']} at {entry['time']}: {entry['why']}")
    if entry["already_deleted"]:
        click.echo(f"already deleted before: {_ids_text(entry['already_deleted'])}")


def _ids_text(ids: list[int], limit: int = 10) -> str:
    return ", ".join(map(str, ids[:limit])) + (f" and {len(ids) - limit:,} more" if len(ids) > limit else "")


@group.command("log")
@click.argument("path", type=click.Path(exists=True, file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Versions and audit entries as JSON.")
@handle_errors
def datastore_log(path: str, as_json: bool) -> None:
    """Versions of the datastore at PATH (what each added, deleted or compacted) and its audit log."""
    from retromem.datastore import Datastore
    from retromem.datastore.integrity import read_manifest
    from retromem.datastore.segments import list_versions, version_file

    ds = Datastore.open(path)
    rows = []
    for v in list_versions(path) or [1]:
        m = read_manifest(Path(path) / version_file(v)) if list_versions(path) else ds.manifest
        c = m["counts"]
        rows.append({"version": v, "operation": m.get("operation", "build"), "created": m.get("created"),
                     "documents": c["documents"], "chunks": c["chunks"], "segments": len(m.get("segments", [])) or 1,
                     "deleted": c.get("deleted_documents", 0),
                     "readable": v >= int(ds.manifest.get("min_readable_version", 1))})
    audit = ds.audit_log()
    if as_json:
        click.echo(json.dumps({"versions": rows, "audit": audit}, indent=2, ensure_ascii=False))
        return
    click.echo(f"{'version':>7}  {'operation':<9} {'created':<25} {'documents':>10} {'chunks':>10} {'segments':>8} {'deleted':>8}")
    for r in rows:
        click.echo(f"{r['version']:>7}  {r['operation']:<9} {r['created'] or '-':<25} {r['documents']:>10,} {r['chunks']:>10,} "
                   f"{r['segments']:>8} {r['deleted']:>8,}" + ("" if r["readable"] else "  (compacted away)"))
    click.echo(f"audit log: {len(audit)} takedown(s)")
    for e in audit:
        click.echo(f"  v{e['version']} {e['time']} by {e['who']}: {e['why']} -- {len(e['doc_ids'])} document(s): "
                   f"doc ids {_ids_text(e['doc_ids'])}; source ids {', '.join(map(repr, e['source_ids'][:5]))}"
                   + (" ..." if len(e["source_ids"]) > 5 else ""))


group.add_command(datastore_log, name="versions")


@group.command("compact")
@click.argument("path", type=click.Path(exists=True, file_okay=False))
@handle_errors
def datastore_compact(path: str) -> None:
    """Rewrite the segments that hold deleted documents without their text and tokens (ids kept), as a
    new version; delete the superseded files (older versions become unreadable)."""
    from retromem.datastore.takedown import compact

    res = compact(path)
    if res.version is None:
        click.echo(f"{path}: nothing to compact (no deleted document left in any file)")
        return
    click.echo(f"version {res.version}: rewrote {', '.join(res.segments)} without {res.purged_docs:,} deleted "
               f"document(s); {fmt_bytes(res.bytes_written)} written, {fmt_bytes(res.bytes_freed)} of superseded files removed")


@group.command("check-takedown")
@click.argument("path", type=click.Path(exists=True, file_okay=False))
@click.option("--index", "indexes", multiple=True, type=click.Path(exists=True),
              help="Also scan this index directory (repeatable).")
@handle_errors
def datastore_check_takedown(path: str, indexes: tuple[str, ...]) -> None:
    """Prove that no text or token bytes of a deleted document remain in any file of the datastore
    at PATH (and the --index directories); exit 1 naming file and doc id for each found."""
    from retromem.datastore import Datastore
    from retromem.datastore.takedown import check

    ds = Datastore.open(path)
    rep = check([path, *indexes], ds)
    for f, d, kind in rep.found:
        click.echo(f"found: {f}: doc_id {d} ({kind})", err=True)
    click.echo(f"{rep.deleted_docs:,} deleted document(s), {rep.probes:,} probes ({rep.shared_probes:,} left out: also "
               f"in live documents; {rep.unprobed_docs:,} document(s) too short to probe), {rep.files:,} files, "
               f"{fmt_bytes(rep.bytes)} scanned: " + ("no deleted text or tokens remain" if rep.ok else
                                                      f"{len(rep.found):,} finding(s)"))
    if not rep.ok:
        sys.exit(1)


@click.command("verify")
@click.argument("path", type=click.Path(exists=True, file_okay=False))
@click.option("--datastore", "datastore_path", type=click.Path(exists=True, file_okay=False),
              help="The datastore the index was built from (default: the path it records).")
@handle_errors
def index_verify(path: str, datastore_path: str | None) -> None:
    """Recompute every checksum of the artifact at PATH (any kind: datastore, embeddings, dense, n-gram
    or FM index, neighbours; told by its marker) and check its structure; name each damaged file."""
    _report(verify_path(path, datastore_path))


def verify_option(command):
    """``--verify`` for `retromem serve`: recompute every checksum of the artifacts named by
    ``--datastore``, ``--dense`` and ``--ngram`` before the command opens them; refuse damaged ones."""
    import functools

    @click.option("--verify", is_flag=True, help="Recompute every checksum of the datastore and indexes before "
                                                 "serving; refuse to serve damaged ones.")
    @functools.wraps(command)
    def wrapper(*args, verify: bool = False, **kwargs):
        if verify:
            try:
                problems = [p for key in ("datastore_path", "dense", "ngram") if kwargs.get(key)
                            for p in verify_path(kwargs[key], kwargs.get("datastore_path"),
                                                 echo=lambda m: click.echo(m, err=True))]
            except RetromemError as exc:
                fail(str(exc))
            _report(problems)
        return command(*args, **kwargs)

    return wrapper

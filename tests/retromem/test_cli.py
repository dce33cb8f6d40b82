"""The command line, run as a user runs it (in-process through click's runner)."""

import json

import pytest
from click.testing import CliRunner

from retromem.cli import main
from retromem.cli._common import parse_size


def run(*args):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def test_build_info_show(tmp_path, corpus_dir):
    out = tmp_path / "ds"
    r = run("datastore", "build", str(corpus_dir), "--out", str(out), "--tokenizer", "gpt2", "--workers", "1")
    assert r.exit_code == 0, r.output
    assert "2 exact duplicates, 2 near duplicates removed -> 12 kept" in r.output
    info = run("datastore", "info", str(out), "--verify")
    assert info.exit_code == 0 and "all checksums match" in info.output
    manifest = json.loads(run("datastore", "info", str(out), "--json").output)
    assert manifest["counts"]["documents"] == 12
    shown = json.loads(run("datastore", "show", str(out), "5", "--json").output)
    assert shown["chunk_id"] == 5 and shown["continuation"]["chunk_id"] == 6
    assert run("datastore", "show", str(out), "5").exit_code == 0


def test_user_errors_exit_2_with_a_message(tmp_path):
    r = CliRunner().invoke(main, ["datastore", "build", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and "input not found" in r.output
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": \n')
    r = CliRunner().invoke(main, ["datastore", "build", str(bad), "--out", str(tmp_path / "o2"), "--tokenizer", "gpt2", "--workers", "1"])
    assert r.exit_code == 2 and f"{bad}:2: invalid_json" in r.output
    r = CliRunner().invoke(main, ["datastore", "build", str(bad), "--out", str(tmp_path / "o3"), "--shard-size", "lots"])
    assert r.exit_code == 2 and "--shard-size" in r.output


def test_config_file_with_flag_override(tmp_path, corpus_dir):
    cfg = tmp_path / "build.yaml"
    cfg.write_text(f"inputs: [{corpus_dir}]\nout: {tmp_path / 'ds'}\ntokenizer: gpt2\nchunk_length: 32\n"
                   "shard_bytes: 200KB\ndedup:\n  near: false\nworkers: 1\n")
    r = run("datastore", "build", "--config", str(cfg), "--chunk-length", "16", "--json")
    assert r.exit_code == 0, r.output
    summary = json.loads(r.output)
    assert summary["chunk_length"] == 16 and summary["dedup"]["removed_near"] == 0
    assert summary["dedup"]["removed_exact"] == 2


def test_parse_size():
    assert parse_size("16MiB", "x") == 16 << 20 and parse_size("1.5GB", "x") == 1_500_000_000 and parse_size("100", "x") == 100


@pytest.mark.slow
def test_demo_runs_on_the_built_in_corpus_with_the_default_tokenizer(tmp_path):
    r = run("demo", "--out", str(tmp_path / "demo"), "--workers", "1")
    assert r.exit_code == 0, r.output
    assert "smollm2-135m" in r.output
    assert "gives back its text: True" in r.output


def test_one_naming_scheme_with_the_old_spellings_as_hidden_aliases():
    top = run("index", "--help").output
    assert all(g in top for g in ("dense", "ngram", "fm"))
    assert "build-dense" not in top and "ngram-query" not in top  # old spellings: hidden
    for new, old in ((("index", "dense", "build"), ("index", "build-dense")),
                     (("index", "dense", "eval"), ("index", "eval-dense")),
                     (("index", "ngram", "query"), ("index", "ngram-query")),
                     (("index", "ngram", "score"), ("ngram", "score")),
                     (("index", "fm", "build"), ("index", "build-fm"))):
        a, b = run(*new, "--help"), run(*old, "--help")
        assert a.exit_code == 0 and b.exit_code == 0, (new, old)
        assert a.output.split("\n", 1)[1] == b.output.split("\n", 1)[1]  # same command, only the usage line differs


@pytest.mark.slow
def test_no_library_module_imports_the_command_line():
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    code = ("import sys, importlib, pkgutil, retromem\n"
            "for pkg in ('datastore', 'index', 'service', 'retro', 'memory'):\n"
            "    m = importlib.import_module('retromem.' + pkg)\n"
            "    for info in pkgutil.walk_packages(m.__path__, m.__name__ + '.'):\n"
            "        importlib.import_module(info.name)\n"
            "bad = [m for m in sys.modules if m.startswith('retromem.cli')]\n"
            "assert not bad, bad\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=repo, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]

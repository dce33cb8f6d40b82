"""The command line's error discipline: every user error (a bad config, a bad option, what the
operating system says about a user's path) is one `error: ...` line and exit status 2, never a
traceback."""

from __future__ import annotations

import errno
import json

import click
import pytest
from click.testing import CliRunner

from retromem.cli import main
from retromem.cli._common import handle_errors, os_error_message, parse_list, parse_number
from retromem.errors import ConfigError


def run(*args: str):
    return CliRunner().invoke(main, list(args))


def assert_one_error_line(r, *needles: str) -> str:
    assert r.exit_code == 2, (r.exit_code, r.output, r.exception)
    assert isinstance(r.exception, SystemExit)  # not a traceback
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.output
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def doc(tmp_path):
    p = tmp_path / "in.jsonl"
    p.write_text(json.dumps({"text": "one short document"}) + "\n")
    return p


def test_unknown_key_under_dedup_in_a_build_config_is_named(tmp_path, doc):
    """Was a bare TypeError traceback with exit status 1."""
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("dedup:\n  threshold: 0.9\n  shingles: 5\n")
    r = run("datastore", "build", str(doc), "--out", str(tmp_path / "out"), "--config", str(cfg))
    line = assert_one_error_line(r, "dedup.shingles", str(cfg))
    assert "allowed under `dedup`" in line and "threshold" in line
    assert not (tmp_path / "out").exists()


def test_bad_values_in_a_build_config_name_key_and_flag(tmp_path, doc):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("dedup:\n  threshold: 1.5\n")
    r = run("datastore", "build", str(doc), "--out", str(tmp_path / "out"), "--config", str(cfg))
    assert_one_error_line(r, "`dedup.threshold` (--dedup-threshold) must be in (0, 1), got 1.5")
    r = run("datastore", "build", str(doc), "--out", str(tmp_path / "out"), "--dedup-threshold", "0")
    assert_one_error_line(r, "`dedup.threshold` (--dedup-threshold)")
    cfg.write_text("dedup: 3\n")
    r = run("datastore", "build", str(doc), "--out", str(tmp_path / "out"), "--config", str(cfg))
    assert_one_error_line(r, "`dedup` must be a mapping")
    cfg.write_text("out: [unclosed\n")
    r = run("datastore", "build", str(doc), "--out", str(tmp_path / "out"), "--config", str(cfg))
    assert_one_error_line(r, "not valid YAML")


def test_an_out_path_under_a_file_is_one_error_line(tmp_path, doc):
    r = run("datastore", "build", str(doc), "--out", str(doc / "ds"), "--tokenizer", "gpt2", "--workers", "1")
    assert_one_error_line(r, str(doc), "Not a directory")


def test_os_errors_from_user_paths_are_one_error_line(tmp_path):
    """Permission denied and a full disk cannot be provoked portably (root, no small filesystem):
    raise them where a library would and check the boundary."""

    @click.command()
    @click.argument("kind")
    @handle_errors
    def cmd(kind: str) -> None:
        if kind == "enospc":
            raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "out" / "shard-0.parquet"))
        if kind == "eacces":
            raise PermissionError(errno.EACCES, "Permission denied", "/root/ds")
        if kind == "rename":
            raise OSError(errno.EXDEV, "Invalid cross-device link", "/a/tmp", None, "/b/ds")  # (.., winerror, filename2)
        raise RuntimeError("a bug keeps its traceback")

    r = CliRunner().invoke(cmd, ["enospc"])
    assert_one_error_line(r, f"{tmp_path / 'out' / 'shard-0.parquet'}: no space left on device", "free there now",
                          "Free some space")
    assert_one_error_line(CliRunner().invoke(cmd, ["eacces"]), "/root/ds: Permission denied")
    assert_one_error_line(CliRunner().invoke(cmd, ["rename"]), "/a/tmp -> /b/ds: Invalid cross-device link")
    r = CliRunner().invoke(cmd, ["bug"])
    assert r.exit_code == 1 and isinstance(r.exception, RuntimeError)
    assert os_error_message(OSError("no errno")) == "no errno"


def test_bad_numbers_on_the_command_line_are_config_errors():
    assert parse_list("1,2 3", "--ids") == (1, 2, 3) and parse_list("0,0.5", "--depths", float) == (0.0, 0.5)
    assert parse_list("", "--docs") == ()
    with pytest.raises(ConfigError, match=r"`--lengths` must be integers separated by commas or spaces, got '1,x'"):
        parse_list("1,x", "--lengths")
    with pytest.raises(ConfigError, match="`--lambdas` must be numbers"):
        parse_list("0.1,a", "--lambdas", float)
    assert parse_number("1e12", "--tokens") == 10**12 and parse_number("42", "--next") == 42
    for bad in ("2.5", "x", "inf", "nan"):
        with pytest.raises(ConfigError, match=r"`--tokens` must be a number such as 1e12"):
            parse_number(bad, "--tokens", example="1e12")


def test_bad_numbers_through_the_commands(tmp_path):
    assert_one_error_line(run("plan", "--tokens", "lots"), "`--tokens` must be a number such as 1e12, got 'lots'")
    r = run("memory", "eval", "--lengths", "1024,x", "--out", str(tmp_path / "e"))
    assert_one_error_line(r, "`--lengths`")
    r = run("memory", "eval", "--lengths", "32", "--out", str(tmp_path / "e"))  # refused by MemoryEvalConfig itself
    assert_one_error_line(r, "`lengths` (--lengths) must be passkey lengths >= 64 tokens")

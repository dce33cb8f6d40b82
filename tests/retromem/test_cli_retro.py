"""`retromem retro ...` as a user runs it: neighbours (and its resume message), train with the tiny
config, eval, generate; user errors exit 2 with a message."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from retromem.cli import main
from tests.retro.conftest import SPLIT, one_thread, retro_ds, retro_index  # noqa: F401  (fixtures)

REPO = Path(__file__).resolve().parents[2]


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


@pytest.mark.slow  # trains a tiny RETRO model end to end
def test_neighbours_train_eval_generate(retro_ds, retro_index, tmp_path):  # noqa: F811
    split = ["--eval-fraction", SPLIT["eval_fraction"], "--split-seed", SPLIT["split_seed"]]
    dirs = []
    for name in ("train", "eval"):
        out = tmp_path / f"nb-{name}"
        r = run("retro", "neighbours", retro_ds.path, "--index", retro_index.path, "--out", out, "--split", name, *split)
        assert r.exit_code == 0, r.output
        assert "own document" in r.output
        dirs += ["--neighbours", out]
    again = run("retro", "neighbours", retro_ds.path, "--index", retro_index.path, "--out", tmp_path / "nb-eval",
                "--split", "eval", *split)
    assert "already complete" in again.output

    r = run("retro", "train", "--config", REPO / "configs/retro/tiny-scratch.yaml", "--output-dir", tmp_path / "run",
            "--datastore", retro_ds.path, *dirs, "--max-steps", 4)
    assert r.exit_code == 0, r.output
    assert "trained 4 steps" in r.output
    final = tmp_path / "run" / "final"

    r = run("retro", "eval", "--model", final, "--datastore", retro_ds.path, *dirs, "--seq-chunks", 2,
            "--max-sequences", 4, "--groups", "sequence", "--threads", 1, "--out", tmp_path / "eval",
            "--control-model", final)  # the run itself as its own control: a difference of exactly 0
    assert r.exit_code == 0, r.output
    res = json.loads((tmp_path / "eval" / "results.json").read_text())
    # from scratch: no base model unless given
    assert set(res["settings"]) == {"retro", "retro_random", "retro_off", "control"}
    assert set(res["differences"]) == {"retro - retro_random", "retro - retro_off", "retro_random - retro_off",
                                       "retro - control"}
    assert res["differences"]["retro - control"]["low"] == res["differences"]["retro - control"]["high"] == 0.0
    assert "retro - retro_random" in r.output and "paired bootstrap" in r.output
    assert "leakage" in r.output and (tmp_path / "eval" / "leakage.png").is_file()

    r = run("retro", "generate", "The for statement", "--model", final, "--index", retro_index.path,
            "--max-new-tokens", 40, "--threads", 1)
    assert r.exit_code == 0, r.output
    assert "chunk 0 complete -> retrieved" in r.output  # progress on stderr (click >= 8.2 mixes it in)
    assert "The for statement" in r.output


def test_user_errors_exit_2(tmp_path, retro_ds, retro_index):  # noqa: F811
    r = CliRunner().invoke(main, ["retro", "neighbours", str(retro_ds.path), "--index", str(retro_index.path),
                                  "--out", str(tmp_path / "x"), "-k", "0"])
    assert r.exit_code == 2 and "`k` (-k) must be a positive integer, got 0" in r.output
    r = CliRunner().invoke(main, ["retro", "train", "--config", str(tmp_path / "missing.yaml")])
    assert r.exit_code == 2 and "does not exist" in r.output
    r = CliRunner().invoke(main, ["retro", "eval", "--model", str(tmp_path), "--datastore", str(retro_ds.path),
                                  "--neighbours", str(tmp_path)])
    assert r.exit_code == 2 and "holds no RETRO model" in r.output

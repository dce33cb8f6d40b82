"""retromem.config: configs built from mappings and YAML (unknown keys refused by dotted name at every
level, lists into tuples), and the checks' one message style (`key` (--flag) must ..., got ...)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np
import pytest

from retromem.config import (ConfigError, boolean, fail, from_dict, integer, key_name, load_yaml, non_negative_int,
                             number, one_of, optional_non_negative_int, optional_number, optional_positive_int,
                             positive_int, read_yaml)


@dataclass(frozen=True)
class Inner:
    ngram: int = 13
    threshold: float = 0.8

    def __post_init__(self) -> None:
        positive_int(self.ngram, "dedup.ngram", flag="--dedup-ngram")
        number(self.threshold, "dedup.threshold", gt=0, lt=1, flag="--dedup-threshold")


@dataclass(frozen=True)
class Deep:
    inner: Inner = field(default_factory=Inner)


@dataclass(frozen=True)
class Outer:
    out: str
    dedup: Inner = field(default_factory=Inner)
    maybe: Inner | None = None
    deep: Deep = field(default_factory=Deep)
    ids: tuple[int, ...] = ()
    pair: tuple[float, float] = (0.0, 1.0)
    inners: tuple[Inner, ...] = ()


# -- from_dict ---------------------------------------------------------------------------------


def test_from_dict_builds_nested_dataclasses_and_tuples():
    cfg = from_dict(Outer, {"out": "ds", "dedup": {"threshold": 0.9}, "maybe": {"ngram": 5},
                            "deep": {"inner": {"ngram": 7}}, "ids": [1, 2, 3], "pair": [0.5, 0.75],
                            "inners": [{"ngram": 2}, {"threshold": 0.5}]})
    assert cfg == Outer(out="ds", dedup=Inner(threshold=0.9), maybe=Inner(ngram=5), deep=Deep(Inner(ngram=7)),
                        ids=(1, 2, 3), pair=(0.5, 0.75), inners=(Inner(ngram=2), Inner(threshold=0.5)))
    assert isinstance(cfg.ids, tuple) and isinstance(cfg.pair, tuple)
    assert from_dict(Outer, {"out": "ds"}) == Outer(out="ds")  # defaults kept
    assert from_dict(Outer, {"out": "ds", "maybe": None}).maybe is None
    given = Inner(ngram=3)
    assert from_dict(Outer, {"out": "ds", "dedup": given}).dedup is given  # an instance passes through


def test_from_dict_refuses_unknown_keys_at_every_level_by_dotted_name():
    with pytest.raises(ConfigError, match=r"unknown keys \['dedup.foo'\]; allowed under `dedup`: \['ngram', 'threshold'\]"):
        from_dict(Outer, {"out": "ds", "dedup": {"foo": 1}})
    with pytest.raises(ConfigError, match=r"unknown keys \['deep.inner.bar', 'deep.inner.foo'\]; allowed under `deep.inner`"):
        from_dict(Outer, {"out": "ds", "deep": {"inner": {"foo": 1, "bar": 2}}})
    with pytest.raises(ConfigError, match=r"unknown keys \['maybe.x'\]"):
        from_dict(Outer, {"out": "ds", "maybe": {"x": 1}})
    with pytest.raises(ConfigError, match=r"unknown keys \['inners\[1\].x'\]"):
        from_dict(Outer, {"out": "ds", "inners": [{}, {"x": 1}]})
    with pytest.raises(ConfigError, match=r"^unknown keys \['lr2'\]; allowed: \["):  # top level: no "under"
        from_dict(Outer, {"out": "ds", "lr2": 1})


def test_from_dict_names_the_place_missing_keys_and_non_mappings():
    with pytest.raises(ConfigError, match=r"^build.yaml: unknown keys \['dedup.foo'\]"):
        from_dict(Outer, {"out": "ds", "dedup": {"foo": 1}}, where="build.yaml")
    with pytest.raises(ConfigError, match=r"^build.yaml: `dedup.threshold` \(--dedup-threshold\) must be in \(0, 1\), got 1.5$"):
        from_dict(Outer, {"out": "ds", "dedup": {"threshold": 1.5}}, where="build.yaml")
    with pytest.raises(ConfigError, match=r"missing keys \['out'\]"):
        from_dict(Outer, {})
    with pytest.raises(ConfigError, match="`dedup` must be a mapping of settings, got int"):
        from_dict(Outer, {"out": "ds", "dedup": 3})
    with pytest.raises(ConfigError, match="a config must be a mapping of settings, got list"):
        from_dict(Outer, [1, 2])
    with pytest.raises(ConfigError, match=r"unknown keys \['x.y'\]"):  # prefix given by a caller nesting by hand
        from_dict(Inner, {"y": 1}, prefix="x.")


def test_configs_are_frozen_and_config_error_is_a_value_error():
    cfg = from_dict(Outer, {"out": "ds"})
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.out = "other"  # type: ignore[misc]
    assert issubclass(ConfigError, ValueError)


# -- load_yaml ---------------------------------------------------------------------------------


def test_load_yaml_reads_overrides_and_refuses_by_name(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("out: from-file\ndedup:\n  threshold: 0.9\nids: [4, 5]\n")
    assert load_yaml(p, Outer) == Outer(out="from-file", dedup=Inner(threshold=0.9), ids=(4, 5))
    assert load_yaml(p, Outer, out="from-flag").out == "from-flag"
    assert load_yaml(p, Outer, out=None).out == "from-file"  # None: the option was not given
    p.write_text("dedup:\n  foo: 1\nout: x\n")
    with pytest.raises(ConfigError, match=rf"^{p}: unknown keys \['dedup.foo'\]"):
        load_yaml(p, Outer)
    p.write_text("dedup: {}\n")
    with pytest.raises(ConfigError, match="`out` is required"):
        load_yaml(p, Outer, required=("out",))


def test_load_yaml_errors_for_missing_bad_and_non_mapping_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_yaml(tmp_path / "nope.yaml", Outer)
    with pytest.raises(ConfigError, match="does not exist"):  # a directory is not a config file
        load_yaml(tmp_path, Outer)
    bad = tmp_path / "bad.yaml"
    bad.write_text("out: [unclosed\n")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        load_yaml(bad, Outer)
    bad.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="a config is a YAML mapping, got list"):
        load_yaml(bad, Outer)
    bad.write_bytes(b"out: \xff\xfe\n")
    with pytest.raises(ConfigError, match="cannot read `--config`.*utf-8"):
        read_yaml(bad)
    bad.write_text("")
    assert read_yaml(bad) == {}  # an empty file is an empty mapping


# -- checks ------------------------------------------------------------------------------------


def test_the_message_style_names_key_flag_rule_and_value():
    with pytest.raises(ConfigError) as e:
        number(1.5, "dedup.threshold", gt=0, lt=1, flag="--dedup-threshold")
    assert str(e.value) == "`dedup.threshold` (--dedup-threshold) must be in (0, 1), got 1.5"
    with pytest.raises(ConfigError) as e:
        positive_int(0, "workers")
    assert str(e.value) == "`workers` must be a positive integer, got 0"
    assert key_name("port", "--port") == "`port` (--port)" and key_name("seed") == "`seed`"
    with pytest.raises(ConfigError) as e:
        fail("tls_cert", "come with `tls_key`", flag="--tls-cert")
    assert str(e.value) == "`tls_cert` (--tls-cert) must come with `tls_key`"  # no "got" without a value


@pytest.mark.parametrize("check, good, bad, rule", [
    (positive_int, [1, 7, np.int64(3)], [0, -1, True, 1.0, "1", None], "be a positive integer"),
    (non_negative_int, [0, 5], [-1, False, 0.5, None], "be a non-negative integer"),
    (optional_positive_int, [None, 1], [0, True], "be a positive integer or null"),
    (optional_non_negative_int, [None, 0], [-1, True], "be a non-negative integer or null"),
    (boolean, [True, False], [0, 1, "yes", None], "be true or false"),
])
def test_int_and_bool_checks(check, good, bad, rule):
    for v in good:
        assert check(v, "k") is v  # a check returns what it checked
    for v in bad:
        with pytest.raises(ConfigError, match=rf"^`k` \(--k\) must {rule}, got "):
            check(v, "k", flag="--k")


def test_integer_bounds():
    assert integer(65535, "port", ge=0, le=65535) == 65535
    with pytest.raises(ConfigError, match=r"`port` \(--port\) must be an integer in 0..65535, got 70000"):
        integer(70000, "port", ge=0, le=65535, flag="--port")
    with pytest.raises(ConfigError, match="must be an integer >= 2, got 1"):
        integer(1, "num_perm", ge=2)
    with pytest.raises(ConfigError, match="must be an integer <= 3, got 4"):
        integer(4, "x", le=3)
    with pytest.raises(ConfigError, match="must be an integer, got True"):
        integer(True, "x")


def test_number_ends_open_and_closed():
    assert number(0, "x", ge=0, le=1) == 0 and number(1, "x", ge=0, le=1) == 1
    for v, msg in [(0, r"be in \(0, 1\)"), (1, r"be in \(0, 1\)")]:
        with pytest.raises(ConfigError, match=msg):
            number(v, "x", gt=0, lt=1)
    with pytest.raises(ConfigError, match=r"must be in \[0, 1\), got 1"):
        number(1, "lambda", ge=0, lt=1)
    with pytest.raises(ConfigError, match="must be > 0, got 0"):
        number(0, "lr", gt=0)
    with pytest.raises(ConfigError, match="must be >= 0, got -1"):
        number(-1, "grace", ge=0)
    with pytest.raises(ConfigError, match="must be <= 2"):
        number(3, "x", le=2)
    for v in (float("nan"), float("inf"), True, "0.5", None):
        with pytest.raises(ConfigError, match="must be a finite number"):
            number(v, "x")
    assert optional_number(None, "x", gt=0) is None
    with pytest.raises(ConfigError, match="must be > 0 or null, got 0"):
        optional_number(0, "x", gt=0)


def test_one_of():
    assert one_of("delta", "infini.update", ("linear", "delta")) == "delta"
    with pytest.raises(ConfigError, match=r"^`infini.update` must be one of 'linear', 'delta', got 'x'$"):
        one_of("x", "infini.update", ("linear", "delta"))
    with pytest.raises(ConfigError, match="must be one of 0, 1, got True"):  # True == 1, but not a choice
        one_of(True, "x", (0, 1))
    with pytest.raises(ConfigError, match="got \\[1\\]"):  # unhashable against a set
        one_of([1], "x", {1, 2})


def test_a_memory_module_section_refuses_an_unknown_key_by_its_dotted_name():
    from retromem.memory.training import MemoryTrainConfig

    with pytest.raises(ConfigError, match=r"unknown keys \['infini.segment_lenght'\]; allowed under `infini`"):
        MemoryTrainConfig(output_dir="x", infini={"segment_lenght": 64})

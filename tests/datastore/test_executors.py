"""The executors: a bad --workers is named before any process starts; ``pooled`` keeps one pool of
worker processes across several maps (the dedup's three short maps) and closes it after the block."""

from __future__ import annotations

import os

import pytest

from retromem.datastore.executors import LocalExecutor, make_executor
from retromem.errors import ConfigError


def _pid(ctx: int, item: int) -> tuple[int, int]:
    return os.getpid(), ctx + item


@pytest.mark.parametrize("kind", ["local", "ray"])
def test_negative_workers_is_named(kind):
    with pytest.raises(ConfigError, match=r"`workers` \(--workers\) must be an integer >= 0, got -2"):
        make_executor(kind, -2)


def test_pooled_maps_share_one_pool_which_closes_after_the_block():
    ex = LocalExecutor(2)
    with ex.pooled():
        first = dict(ex.map(_pid, 10, [1, 2, 3, 4]))
        second = dict(ex.map(_pid, 20, [1, 2, 3]))
        pool = ex._pool
    assert {v[1] for v in first.values()} == {11, 12, 13, 14} and {v[1] for v in second.values()} == {21, 22, 23}
    pids = {v[0] for v in first.values()} | {v[0] for v in second.values()}
    assert os.getpid() not in pids and len(pids) <= 2  # the same two workers served both maps
    assert ex._pool is None and pool._shutdown_thread  # closed with the block

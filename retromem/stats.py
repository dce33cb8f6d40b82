"""Paired bootstrap confidence intervals for "is A better than B on the same data?".

Every gain this project reports (RETRO with retrieved against random neighbours, in-context
retrieval against none, ...) is a difference between two scores of the *same* held-out tokens.
:func:`paired_bootstrap` turns the per-item scores of both systems into the mean difference and a
percentile bootstrap interval for it. Items are paired, so the noise shared by both systems (hard
tokens are hard for both) cancels and the interval is much tighter than two separate ones.

Tokens of one document are not independent, so resampling tokens understates the uncertainty;
pass ``groups`` (a document or sequence id per item) and whole groups are resampled instead (a
cluster bootstrap). The statistic is then the token-weighted mean difference over the resampled
groups, the same quantity the point estimate is, so a long document weighs as much as its tokens.

Scores are usually per-token negative log-likelihoods in nats; a difference ``d`` of mean NLLs is
a perplexity ratio ``exp(d)``, and since ``exp`` is monotone, ``exp(low)`` and ``exp(high)`` bound
the ratio.

Ground floor: depends on numpy and :mod:`retromem.errors` only.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import numpy as np

from retromem.errors import ConfigError

# Resamples are drawn in blocks so that n x groups index arrays stay small (a few MB).
_BLOCK_CELLS = 2_000_000


@dataclass(frozen=True)
class BootstrapResult:
    """Mean of ``a - b`` and its bootstrap interval at ``level`` (e.g. 0.95).

    ``n_items`` paired items in ``n_groups`` resampling units (equal without ``groups``);
    ``n_resamples`` bootstrap draws.
    """

    mean: float
    low: float
    high: float
    level: float
    n_items: int
    n_groups: int
    n_resamples: int

    def excludes_zero(self) -> bool:
        """True when the whole interval lies on one side of 0 (the difference is significant)."""
        return self.low > 0 or self.high < 0

    def contains(self, value: float) -> bool:
        return self.low <= value <= self.high

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def mcnemar_p(a_only: int, b_only: int) -> float:
    """Exact two-sided McNemar p-value: the discordant pairs under Binomial(a_only + b_only, 1/2)."""
    n = a_only + b_only
    if n == 0:
        return 1.0
    m = min(a_only, b_only)
    tail = sum(math.comb(n, i) for i in range(m + 1)) / 2.0 ** n
    return min(1.0, 2 * tail)


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion k / n (95% for z = 1.96); (0, 1) when n is 0."""
    if n == 0:
        return (0.0, 1.0)
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def paired_bootstrap(
    a: Sequence[float] | np.ndarray,
    b: Sequence[float] | np.ndarray,
    *,
    groups: Sequence[Any] | np.ndarray | None = None,
    n: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> BootstrapResult:
    """Mean of ``a - b`` over paired items with a percentile bootstrap interval.

    a, b:   (N,) scores of the same N items under two systems (e.g. per-token NLL).
    groups: (N,) optional id of the unit to resample (document, sequence); items of one group are
            drawn together and the statistic is the item-weighted mean of the drawn groups.
    n:      number of resamples; ``seed`` makes the interval reproducible.
    level:  coverage of the interval, in (0, 1).
    """
    a_arr = np.asarray(a, dtype=np.float64)
    b_arr = np.asarray(b, dtype=np.float64)
    if a_arr.ndim != 1 or a_arr.shape != b_arr.shape:
        raise ConfigError(
            f"paired_bootstrap: `a` and `b` must be 1-D arrays of the same length (paired items), "
            f"got shapes {a_arr.shape} and {b_arr.shape}"
        )
    if a_arr.size == 0:
        raise ConfigError("paired_bootstrap: `a` and `b` are empty; there is nothing to compare")
    if not (np.isfinite(a_arr).all() and np.isfinite(b_arr).all()):
        raise ConfigError("paired_bootstrap: `a` and `b` must be finite (found NaN or inf)")
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ConfigError(f"paired_bootstrap: `n` (resamples) must be a positive integer, got {n!r}")
    if not (0 < float(level) < 1):
        raise ConfigError(f"paired_bootstrap: `level` must be in (0, 1), got {level!r}")

    diff = a_arr - b_arr
    if groups is None:
        sums, counts = diff, np.ones_like(diff)
    else:
        g = np.asarray(groups)
        if g.shape != diff.shape:
            raise ConfigError(
                f"paired_bootstrap: `groups` must give one id per item ({diff.size}), got shape {g.shape}"
            )
        _, inverse = np.unique(g, return_inverse=True)
        sums = np.bincount(inverse, weights=diff)
        counts = np.bincount(inverse).astype(np.float64)

    n_groups = sums.size
    rng = np.random.default_rng(seed)
    stats = np.empty(int(n), dtype=np.float64)
    block = max(1, _BLOCK_CELLS // n_groups)
    for start in range(0, int(n), block):
        stop = min(int(n), start + block)
        idx = rng.integers(0, n_groups, size=(stop - start, n_groups))  # (draws, groups)
        stats[start:stop] = sums[idx].sum(axis=1) / counts[idx].sum(axis=1)
    alpha = (1.0 - float(level)) / 2.0
    low, high = np.quantile(stats, [alpha, 1.0 - alpha])
    return BootstrapResult(
        mean=float(diff.mean()),
        low=float(low),
        high=float(high),
        level=float(level),
        n_items=int(diff.size),
        n_groups=int(n_groups),
        n_resamples=int(n),
    )

"""Exit thresholds whose accuracy promise holds on new data: Learn then Test with an exact binomial test.

The promise, at ``level`` (say 0.95): with probability at least ``level`` over the draw of the calibration
split, the rate of *introduced* errors (samples the final exit gets right and the cascade gets wrong) is
at most ``max_drop`` on the distribution the split came from. The accuracy drop nets those against the
errors the cascade fixes, so it is at most that rate: the promise bounds the drop too.

How (Angelopoulos et al., "Learn then Test", 2021): for each threshold t on a grid fixed in advance, the
null hypothesis "at t the introduced-error rate exceeds max_drop" gets the exact binomial p-value of the
errors counted on the calibration split. The hypotheses are tested in a fixed order, from the most
cautious threshold down, each at ``1 - level``; the first one not rejected ends the sequence (fixed-sequence
testing keeps the chance of any false rejection within ``1 - level`` without a multiplicity correction).
The lowest threshold rejected is the answer. Validity needs the order and the family fixed before the data
is seen, so the threshold is shared by every early exit and applies to raw scores: temperatures fitted on
the same split would make the family depend on it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import stats

from splitexit.errors import ConfigError

__all__ = ["Certified", "cascade_exits", "certify", "upper_bound"]

#: Shared thresholds tried, most cautious first (scores are in [0, 1]); fixed before any data is seen.
GRID = 1.0 - np.geomspace(1e-6, 1.0, 400)


@dataclass(frozen=True)
class Certified:
    """What the test certified on the calibration split."""

    threshold: float | None  # the shared threshold; None: no early exit could be certified
    errors: int  # introduced errors at that threshold (0 when none was certified: nothing leaves early)
    samples: int
    bound: float  # upper bound at the level on the introduced-error rate at that threshold
    smallest_promise: float  # the least max_drop these samples could certify at this level (with 0 errors)


def cascade_exits(scores: np.ndarray, thresholds: list[float]) -> np.ndarray:
    """Which exit each sample leaves at: the first early exit whose score reaches its threshold, else the
    final one (index ``len(scores)``). ``scores`` is (early exits, samples)."""
    early, n = scores.shape[0], scores.shape[1]
    exit_at = np.full(n, early)
    for i in reversed(range(early)):
        exit_at = np.where(scores[i] >= thresholds[i], i, exit_at)
    return exit_at


def upper_bound(errors: int, samples: int, level: float) -> float:
    """Clopper-Pearson: the largest error rate under which seeing ``errors`` or fewer has probability
    ``1 - level`` or more."""
    if errors >= samples:
        return 1.0
    return float(stats.beta.ppf(level, errors + 1, samples - errors))


def certify(scores: np.ndarray, correct: np.ndarray, *, max_drop: float, level: float) -> Certified:
    """The lowest shared threshold certified to keep introduced errors within ``max_drop`` at ``level``.

    ``scores``: (early exits, samples) raw confidences in [0, 1]; ``correct``: (exits, samples) booleans, the
    final exit last.
    """
    if not 0 < level < 1:
        raise ConfigError(f"--guarantee is a probability in (0, 1), e.g. 0.95; got {level}")
    if scores.size and (scores.min() < 0 or scores.max() > 1):
        raise ConfigError("a guarantee needs confidence scores in [0, 1]; this confidence function gives "
                          f"{scores.min():.3g}..{scores.max():.3g}: use a built-in one, or --guarantee none")
    n = correct.shape[1]
    final_right = correct[-1]
    rows = np.arange(n)
    chosen: tuple[float, int] | None = None
    for threshold in GRID:
        exit_at = cascade_exits(scores, [float(threshold)] * scores.shape[0])
        errors = int((final_right & ~correct[exit_at, rows]).sum())
        if stats.binom.cdf(errors, n, max_drop) > 1 - level:  # not rejected: the sequence ends here
            break
        chosen = (float(threshold), errors)
    smallest = upper_bound(0, n, level)
    if chosen is None:
        return Certified(None, 0, n, 0.0, smallest)
    return Certified(chosen[0], chosen[1], n, upper_bound(chosen[1], n, level), smallest)

"""Scaling-law fits recover known laws; the compute-optimal frontier is the law's minimum along C = 6 N D."""

import itertools

import numpy as np
import pytest
from scipy.optimize import minimize_scalar

from hyla.errors import DataError
from hyla.experiments.scaling import Fit, fit

TRUE = dict(E=1.7, A=400.0, B=410.0, alpha=0.34, beta=0.28)
STARTS = list(itertools.product([0, 5, 10], [0, 5, 10], [0.0, 0.5], [0.2, 0.5], [0.2, 0.5]))


def runs(noise: float, seed: int = 0, sizes=(1e5, 4e5, 2e6, 1e7), budgets=(1e6, 1e7, 1e8)):
    law = Fit(**TRUE)
    grid = list(itertools.product(sizes, budgets))
    n, d = np.array([g[0] for g in grid]), np.array([g[1] for g in grid])
    rng = np.random.default_rng(seed)
    return n, d, law.loss(n, d) * np.exp(rng.normal(0, noise, len(n)))


def test_a_noise_free_law_is_recovered():
    result = fit(*runs(0.0), bootstrap=0, starts=STARTS)
    for name, value in TRUE.items():
        assert getattr(result, name) == pytest.approx(value, rel=2e-2), name


def test_bootstrap_intervals_hold_the_estimate_and_cover_the_truth_with_enough_runs():
    sizes, budgets = np.geomspace(1e5, 1e8, 6), np.geomspace(1e6, 1e9, 5)  # 30 runs over three decades each
    result = fit(*runs(0.002, seed=1, sizes=sizes, budgets=budgets), bootstrap=20, starts=STARTS[:24])
    for name in ("E", "alpha", "beta"):
        low, high = result.intervals[name]
        assert low <= getattr(result, name) <= high and low < high, (name, low, high)
        assert low - 0.02 * abs(TRUE[name]) <= TRUE[name] <= high + 0.02 * abs(TRUE[name]), (name, low, high)


def test_the_frontier_is_the_minimum_along_equal_compute():
    law = Fit(**TRUE)
    for compute in (1e15, 1e18, 1e21):
        n, d, loss = law.optimal(compute)
        assert 6 * n * d == pytest.approx(compute)

        def along(log_n: float, compute: float = compute) -> float:
            return law.loss(np.exp(log_n), compute / (6 * np.exp(log_n)))

        best = minimize_scalar(along, bounds=(0, 40), method="bounded")
        assert np.log(n) == pytest.approx(best.x, abs=1e-3) and loss == pytest.approx(best.fun, rel=1e-6)


def test_too_few_or_bad_runs_are_refused():
    with pytest.raises(DataError, match="at least 5 runs"):
        fit([1, 2], [1, 2], [1, 2])
    with pytest.raises(DataError, match="positive"):
        fit([1, 2, 3, 4, 0], [1] * 5, [1] * 5)


def test_the_gradient_is_the_objectives():
    from scipy.optimize import check_grad

    from hyla.experiments.scaling import _objective

    n, d, loss = runs(0.01)
    args = (np.log(n), np.log(d), np.log(loss), 1e-3)
    for theta in ([5.0, 6.0, 0.5, 0.3, 0.3], [1.0, 9.0, -0.5, 0.8, 0.1]):
        error = check_grad(lambda t: _objective(t, *args)[0], lambda t: _objective(t, *args)[1], np.array(theta))
        assert error < 1e-5 * max(1.0, np.abs(_objective(np.array(theta), *args)[1]).max())

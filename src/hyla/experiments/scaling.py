"""Scaling-law fits: ``L(N, D) = E + A / N^alpha + B / D^beta`` from a sweep's runs, as Chinchilla's approach 3
(Hoffmann et al. 2022): the Huber loss (``delta = 1e-3``) between ``log L`` and the log of the law, written as a
log-sum-exp of ``a - alpha log N``, ``b - beta log D`` and ``e`` (``A = exp a``, ...), minimised with L-BFGS
(analytic gradient) from every start of a grid, the best kept; confidence intervals by refitting on bootstrap
resamples of the runs. The compute-optimal frontier follows from ``C = 6 N D``.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import minimize

from hyla.errors import DataError

PARAMETERS = ("E", "A", "B", "alpha", "beta")
# A coarser version of Chinchilla's grid of starts (a, b in 0..25, e in -1..1, alpha, beta in 0..2): 243 starts,
# seconds of L-BFGS for a sweep's runs where Chinchilla's 4,500 would take minutes on a small CPU.
_STARTS = list(itertools.product([0, 10, 20], [0, 10, 20], [-1, 0, 1], [0.25, 0.75, 1.5], [0.25, 0.75, 1.5]))


@dataclass
class Fit:
    """The fitted law; ``intervals[name] = (low, high)``, the bootstrap's 2.5 and 97.5 percentiles."""

    E: float
    A: float
    B: float
    alpha: float
    beta: float
    intervals: dict[str, tuple[float, float]] = field(default_factory=dict)

    def loss(self, n: np.ndarray | float, d: np.ndarray | float) -> np.ndarray | float:
        return self.E + self.A / np.power(n, self.alpha) + self.B / np.power(d, self.beta)

    def optimal(self, compute: float) -> tuple[float, float, float]:
        """``(N, D, L)`` minimising the law at ``C = 6 N D = compute``: ``N = G (C/6)^(beta/(alpha+beta))``,
        ``G = (alpha A / (beta B))^(1/(alpha+beta))``."""
        g = (self.alpha * self.A / (self.beta * self.B)) ** (1 / (self.alpha + self.beta))
        n = g * (compute / 6) ** (self.beta / (self.alpha + self.beta))
        d = compute / (6 * n)
        return n, d, float(self.loss(n, d))

    def to_json(self) -> dict:
        return {**{p: getattr(self, p) for p in PARAMETERS}, "intervals": self.intervals}


def _objective(theta: np.ndarray, log_n: np.ndarray, log_d: np.ndarray, log_l: np.ndarray, delta: float):
    """The Huber loss of ``theta = (a, b, e, alpha, beta)`` and its gradient."""
    a, b, e, alpha, beta = theta
    terms = np.stack([a - alpha * log_n, b - beta * log_d, np.full_like(log_n, e)])  # [3, runs]
    top = terms.max(axis=0)
    w = np.exp(terms - top)
    total = w.sum(axis=0)
    w /= total  # d predicted / d terms: the softmax weights
    residual = top + np.log(total) - log_l  # log-sum-exp of the terms, minus log L
    small = np.abs(residual) <= delta
    value = np.where(small, 0.5 * residual**2, delta * (np.abs(residual) - 0.5 * delta)).sum()  # Huber
    slope = np.clip(residual, -delta, delta)  # d huber / d residual
    grad = np.array([w[0] @ slope, w[1] @ slope, w[2] @ slope, -(w[0] * log_n) @ slope, -(w[1] * log_d) @ slope])
    return float(value), grad


def _fit_once(log_n, log_d, log_l, starts, delta: float) -> np.ndarray:
    best = None
    for start in starts:
        result = minimize(_objective, np.array(start, dtype=float), args=(log_n, log_d, log_l, delta),
                          jac=True, method="L-BFGS-B")  # fmt: skip
        if best is None or result.fun < best.fun:
            best = result
    return best.x


def fit(n, d, loss, delta: float = 1e-3, bootstrap: int = 100, seed: int = 0, starts=None) -> Fit:
    """Fit the law to runs of ``n`` parameters, ``d`` training tokens and held-out ``loss`` (sequences of equal
    length, at least 5 runs for 5 parameters). ``bootstrap`` resamples refit from the full fit's solution."""
    n, d, loss = (np.asarray(x, dtype=float) for x in (n, d, loss))
    if not len(n) == len(d) == len(loss) or len(n) < len(PARAMETERS):
        raise DataError(f"a fit of {len(PARAMETERS)} parameters needs at least 5 runs with N, D and L each")
    if (n <= 0).any() or (d <= 0).any() or (loss <= 0).any():
        raise DataError("N, D and the loss must be positive")
    logs = np.log(n), np.log(d), np.log(loss)
    theta = _fit_once(*logs, starts or _STARTS, delta)
    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(bootstrap):
        pick = rng.integers(0, len(n), len(n))
        samples.append(_fit_once(*(x[pick] for x in logs), [theta], delta))

    def natural(t: np.ndarray) -> list[float]:  # (a, b, e, alpha, beta) -> (E, A, B, alpha, beta)
        return [float(np.exp(t[2])), float(np.exp(t[0])), float(np.exp(t[1])), float(t[3]), float(t[4])]

    result = Fit(*natural(theta))
    if samples:
        values = np.array([natural(s) for s in samples])
        low, high = np.percentile(values, [2.5, 97.5], axis=0)
        result.intervals = {p: (float(lo), float(hi)) for p, lo, hi in zip(PARAMETERS, low, high, strict=True)}
    return result

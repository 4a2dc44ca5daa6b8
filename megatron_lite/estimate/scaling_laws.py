"""Scaling laws that plan a run: L(N, D) = E + A / N^alpha + B / D^beta and its compute frontier.

The fit is Hoffmann et al. 2022 ("Training Compute-Optimal Large Language Models"), approach 3
(section 3.3 and appendix D.2): minimise over (a, b, e, alpha, beta), with A = exp(a), B = exp(b),
E = exp(e),

    sum_i Huber_delta( LSE(a - alpha log N_i, b - beta log D_i, e) - log L_i ),   delta = 1e-3,

with L-BFGS from a grid of initialisations (alpha, beta in 0..2 by 0.5, e in -1..1 by 0.5, a, b in
0..25 by 5). We score the whole grid first and start L-BFGS from its best `starts` points (the
paper starts from every one and keeps the best fit; the best starts are where that fit comes from).

The compute-optimal frontier for C = 6 N D (section 3.3, closed form): N_opt = G (C/6)^(beta /
(alpha + beta)), D_opt = (C/6) / N_opt, G = (alpha A / (beta B))^(1 / (alpha + beta)). With the
exact FLOP count instead (`model.flops.model_flops_per_token`), `best_shape` walks a family of
model shapes, each with D = C / FLOPs-per-token, and keeps the lowest predicted loss.
"""

from __future__ import annotations

import itertools
import math
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np

HUBER_DELTA = 1e-3
GRID = {
    "alpha": np.arange(0.0, 2.01, 0.5),
    "beta": np.arange(0.0, 2.01, 0.5),
    "e": np.arange(-1.0, 1.01, 0.5),
    "a": np.arange(0.0, 25.1, 5.0),
    "b": np.arange(0.0, 25.1, 5.0),
}


@dataclass(frozen=True)
class ScalingLaw:
    E: float
    A: float
    B: float
    alpha: float
    beta: float

    def loss(self, n, d):
        """Predicted loss of N parameters trained on D tokens (scalars or arrays)."""
        n, d = np.asarray(n, dtype=float), np.asarray(d, dtype=float)
        return self.E + self.A / n**self.alpha + self.B / d**self.beta

    def compute_optimal(self, flops: float) -> tuple[float, float]:
        """(N_opt, D_opt) for a budget of `flops` with C = 6 N D."""
        a, b = self.alpha, self.beta
        g = (a * self.A / (b * self.B)) ** (1 / (a + b))
        n = g * (flops / 6) ** (b / (a + b))
        return n, flops / (6 * n)

    def to_dict(self) -> dict:
        return asdict(self)


def _huber(r: np.ndarray, delta: float) -> tuple[np.ndarray, np.ndarray]:
    """(Huber loss, its derivative) elementwise."""
    small = np.abs(r) <= delta
    loss = np.where(small, 0.5 * r**2, delta * (np.abs(r) - 0.5 * delta))
    return loss, np.where(small, r, delta * np.sign(r))


def objective(
    theta: np.ndarray, log_n: np.ndarray, log_d: np.ndarray, log_l: np.ndarray, delta: float
) -> tuple[float, np.ndarray]:
    """Hoffmann's objective and its gradient at theta = (a, b, e, alpha, beta)."""
    a, b, e, alpha, beta = theta
    terms = np.stack([a - alpha * log_n, b - beta * log_d, np.full_like(log_n, e)])  # [3, points]
    top = terms.max(axis=0)
    w = np.exp(terms - top)
    lse = top + np.log(w.sum(axis=0))
    w /= w.sum(axis=0)  # softmax: d lse / d term
    loss, dr = _huber(lse - log_l, delta)
    grad = np.array(
        [
            np.sum(dr * w[0]),
            np.sum(dr * w[1]),
            np.sum(dr * w[2]),
            np.sum(dr * w[0] * -log_n),
            np.sum(dr * w[1] * -log_d),
        ]
    )
    return float(loss.sum()), grad


def _grid_scores(log_n, log_d, log_l, delta: float) -> tuple[np.ndarray, np.ndarray]:
    """(every grid point [k, 5], its objective [k]), vectorised over the grid."""
    pts = np.array(list(itertools.product(*(GRID[k] for k in ("a", "b", "e", "alpha", "beta")))))
    a, b, e, alpha, beta = (pts[:, i : i + 1] for i in range(5))
    t_n, t_d = a - alpha * log_n, b - beta * log_d  # [k, points]
    lse = np.logaddexp(np.logaddexp(t_n, t_d), np.broadcast_to(e, t_n.shape))
    loss, _ = _huber(lse - log_l, delta)
    return pts, loss.sum(axis=1)


def fit(
    n: Sequence[float],
    d: Sequence[float],
    loss: Sequence[float],
    delta: float = HUBER_DELTA,
    starts: int = 32,
) -> tuple[ScalingLaw, float]:
    """Fit L(N, D) to (n, d, loss) points; (the law, its objective value)."""
    if "scipy.optimize" not in sys.modules:
        # scipy's OpenBLAS wakes a thread pool for these 5-vectors: on a busy machine every L-BFGS
        # step then waits for threads (40x slower measured here). One thread unless set otherwise.
        os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    from scipy.optimize import minimize  # heavy, only for a fit (after the thread setting above)

    log_n, log_d = np.log(np.asarray(n, float)), np.log(np.asarray(d, float))
    log_l = np.log(np.asarray(loss, float))
    if len(log_l) < 5:
        raise ValueError(f"fitting 5 parameters needs at least 5 points, got {len(log_l)}")
    pts, scores = _grid_scores(log_n, log_d, log_l, delta)
    best_theta, best_value = None, math.inf
    for theta0 in pts[np.argsort(scores)[:starts]]:
        res = minimize(
            objective,
            theta0,
            args=(log_n, log_d, log_l, delta),
            jac=True,
            method="L-BFGS-B",
            options={"maxiter": 1000, "gtol": 1e-12, "ftol": 1e-15},
        )
        if res.fun < best_value:
            best_theta, best_value = res.x, float(res.fun)
    a, b, e, alpha, beta = best_theta
    return ScalingLaw(math.exp(e), math.exp(a), math.exp(b), alpha, beta), best_value


def best_shape(
    law: ScalingLaw,
    flops: float,
    shapes: Sequence[dict],
    params: Callable[[dict], float],
    flops_per_token: Callable[[dict], float],
) -> tuple[dict, float, float, float]:
    """The shape of lowest predicted loss for a budget when D = flops / FLOPs-per-token(shape);
    (shape, N, D, predicted loss)."""
    best = None
    for shape in shapes:
        n = params(shape)
        d = flops / flops_per_token(shape)
        pred = float(law.loss(n, d))
        if best is None or pred < best[3]:
            best = (shape, n, d, pred)
    if best is None:
        raise ValueError("no model shape to choose from")
    return best

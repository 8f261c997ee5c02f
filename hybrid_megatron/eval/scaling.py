"""Power-law fits of loss against model size, L(N) = E + A * N^-alpha, with a bootstrap interval.

For a fixed ``alpha`` the law is linear in (E, A), so the fit is an exact least-squares solve inside a
one-dimensional search over ``alpha`` (a log grid, then finer grids around its best point): no starting guess,
no local minimum in (E, A). The bootstrap resamples the runs with replacement and refits; resamples with
fewer than three distinct sizes are skipped. Red flags follow the go/no-go practice our users cite:
loss not decreasing with size, a train/validation gap of about zero, and alpha below 0.1.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

ALPHA_RANGE = (0.001, 3.0)


@dataclass(frozen=True, slots=True)
class PowerLaw:
    E: float
    A: float
    alpha: float
    sse: float

    def __call__(self, n):
        return self.E + self.A * np.asarray(n, dtype=np.float64) ** -self.alpha


def _solve(n: np.ndarray, loss: np.ndarray, alpha) -> tuple:
    """(E, A, SSE) of the least-squares fit at this alpha, in closed form (simple linear regression of the
    loss on N^-alpha); ``alpha`` may be an array of exponents, giving arrays."""
    x = n[None, :] ** -np.atleast_1d(np.asarray(alpha, dtype=np.float64))[:, None]
    xc = x - x.mean(axis=1, keepdims=True)
    lc = loss - loss.mean()
    a = (xc @ lc) / np.einsum("ij,ij->i", xc, xc)
    e = loss.mean() - a * x.mean(axis=1)
    resid = loss[None, :] - (e[:, None] + a[:, None] * x)
    sse = np.einsum("ij,ij->i", resid, resid)
    if np.ndim(alpha) == 0:
        return float(e[0]), float(a[0]), float(sse[0])
    return e, a, sse


def fit_power_law(params, losses) -> PowerLaw:
    """Least-squares L(N) = E + A N^-alpha over at least three distinct sizes."""
    n = np.asarray(params, dtype=np.float64)
    loss = np.asarray(losses, dtype=np.float64)
    if n.size != loss.size or len(np.unique(n)) < 3:
        raise ValueError("a power-law fit needs losses at three or more distinct model sizes")
    # scale N so the search is well conditioned whatever the units
    n = n / np.exp(np.mean(np.log(n)))
    lo, hi = ALPHA_RANGE
    for _ in range(6):  # a log grid, then finer grids between the best point's neighbours (to ~1e-13 of alpha)
        grid = np.exp(np.linspace(np.log(lo), np.log(hi), 400))
        i = int(np.argmin(_solve(n, loss, grid)[2]))
        lo, hi = grid[max(i - 1, 0)], grid[min(i + 1, grid.size - 1)]
    alpha = (lo + hi) / 2
    e, a, s = _solve(n, loss, alpha)
    scale = np.exp(np.mean(np.log(np.asarray(params, dtype=np.float64))))
    return PowerLaw(E=e, A=float(a * scale**alpha), alpha=float(alpha), sse=s)  # A in the caller's units of N


@dataclass(frozen=True, slots=True)
class ChinchillaLaw:
    E: float
    A: float
    alpha: float
    B: float
    beta: float
    sse: float

    def __call__(self, n, d):
        n, d = np.asarray(n, dtype=np.float64), np.asarray(d, dtype=np.float64)
        return self.E + self.A * n ** -self.alpha + self.B * d ** -self.beta


def _solve2(n: np.ndarray, d: np.ndarray, loss: np.ndarray, alpha: float, beta: float):
    design = np.stack([np.ones_like(n), n ** -alpha, d ** -beta], axis=1)
    coef, *_ = np.linalg.lstsq(design, loss, rcond=None)
    resid = loss - design @ coef
    return coef, float(resid @ resid)


def fit_chinchilla(params, tokens, losses) -> ChinchillaLaw:
    """Least-squares L(N, D) = E + A/N^alpha + B/D^beta: linear in (E, A, B) for fixed exponents, which are
    searched on a grid and refined by alternating golden-section steps."""
    n = np.asarray(params, dtype=np.float64)
    d = np.asarray(tokens, dtype=np.float64)
    loss = np.asarray(losses, dtype=np.float64)
    if len(np.unique(n)) < 2 or len(np.unique(d)) < 2 or loss.size < 5:
        raise ValueError("an L(N, D) fit needs five or more runs spanning two or more sizes and token counts")
    sn, sd = np.exp(np.mean(np.log(n))), np.exp(np.mean(np.log(d)))
    n, d = n / sn, d / sd
    grid = np.exp(np.linspace(np.log(ALPHA_RANGE[0]), np.log(ALPHA_RANGE[1]), 90))
    best = min(((a, b) for a in grid for b in grid), key=lambda ab: _solve2(n, d, loss, *ab)[1])
    alpha, beta = best
    golden = (np.sqrt(5) - 1) / 2
    for _ in range(30):
        for which in (0, 1):
            lo, hi = (alpha / 1.2, alpha * 1.2) if which == 0 else (beta / 1.2, beta * 1.2)
            for _ in range(30):
                c, e = hi - golden * (hi - lo), lo + golden * (hi - lo)
                fc = _solve2(n, d, loss, *((c, beta) if which == 0 else (alpha, c)))[1]
                fe = _solve2(n, d, loss, *((e, beta) if which == 0 else (alpha, e)))[1]
                hi, lo = (e, lo) if fc < fe else (hi, c)
            if which == 0:
                alpha = (lo + hi) / 2
            else:
                beta = (lo + hi) / 2
    (e0, a0, b0), sse = _solve2(n, d, loss, alpha, beta)
    return ChinchillaLaw(E=float(e0), A=float(a0 * sn**alpha), alpha=float(alpha), B=float(b0 * sd**beta),
                         beta=float(beta), sse=sse)


def bootstrap_laws(params, losses, samples: int = 1000, seed: int = 0) -> list[PowerLaw]:
    """The law refitted to ``samples`` resamples of the runs (with replacement; resamples of fewer than three
    distinct sizes are skipped). Empty with fewer than four distinct sizes: three parameters fitted to three
    sizes pass through every point, and every resample that can be fitted is the same three sizes again, so
    the spread would only repeat the estimate."""
    n = np.asarray(params, dtype=np.float64)
    loss = np.asarray(losses, dtype=np.float64)
    if len(np.unique(n)) < 4:
        return []
    rng = np.random.default_rng(seed)
    laws = []
    for _ in range(samples):
        pick = rng.integers(0, n.size, n.size)
        if len(np.unique(n[pick])) >= 3:
            laws.append(fit_power_law(n[pick], loss[pick]))
    return laws


def interval(values) -> tuple[float, float] | None:
    """The central 95% of bootstrap values (None for none)."""
    if len(values) == 0:
        return None
    low, high = np.percentile(np.asarray(values, dtype=np.float64), [2.5, 97.5])
    return float(low), float(high)


def bootstrap_alpha(params, losses, samples: int = 1000, seed: int = 0) -> tuple[float, float] | None:
    """95% interval of alpha over resampled runs; None with fewer than four distinct sizes."""
    return interval([law.alpha for law in bootstrap_laws(params, losses, samples, seed)])


def crossings(first: PowerLaw, second: PowerLaw, low: float, high: float) -> list[float]:
    """The sizes in [low, high] where the two laws predict the same loss (a log-spaced scan, then bisection)."""
    grid = np.exp(np.linspace(np.log(low), np.log(high), 400))
    gap = first(grid) - second(grid)
    found = []
    for i in np.nonzero(np.sign(gap[:-1]) * np.sign(gap[1:]) < 0)[0]:
        a, b = np.log(grid[i]), np.log(grid[i + 1])
        for _ in range(60):
            mid = (a + b) / 2
            if np.sign(first(np.exp(mid)) - second(np.exp(mid))) == np.sign(gap[i]):
                a = mid
            else:
                b = mid
        found.append(float(np.exp((a + b) / 2)))
    return found


def red_flags(params, val_losses, train_losses, alpha: float | None) -> list[str]:
    """The warning signs of a size sweep, as sentences (empty when none)."""
    flags = []
    order = np.argsort(np.asarray(params, dtype=np.float64))
    ordered = np.asarray(val_losses, dtype=np.float64)[order]
    if np.any(np.diff(ordered) > 0):
        flags.append("validation loss does not decrease monotonically with model size")
    gaps = [abs(v - t) for v, t in zip(val_losses, train_losses) if v is not None and t is not None]
    if gaps and max(gaps) < 1e-3:
        flags.append("train and validation loss are the same to 1e-3 in every run: is the validation data "
                     "really held out?")
    if alpha is not None and alpha < 0.1:
        flags.append(f"alpha = {alpha:.3f} < 0.1: scaling this architecture is unlikely to pay")
    return flags

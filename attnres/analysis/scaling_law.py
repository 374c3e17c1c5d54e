"""Scaling-law fits and compute multipliers (ZOO.md §5), in numpy only.

- :func:`power_law`: ln L = ln A - alpha ln C, ordinary least squares in log space (the paper's form).
- :func:`shared_alpha`: one alpha for every scheme, its own A each; the multiplier of scheme v against
  baseline b is then a constant, m = (A_b / A_v)^(1/alpha).
- :func:`floor_fit`: L = E + A_s C^-alpha with E and alpha shared, by variable projection: for each alpha
  on a grid, (E, A_s) is a linear least-squares problem (rejected where a coefficient is negative); the
  alpha with the smallest log-space residual wins. ``identified`` says whether the data pinned it down
  (an interior alpha and E > 0).
- :func:`multiplier`: m = C_b*(L_v) / C_v for each variant point, where C_b* inverts the baseline fit;
  a point whose C_b* falls outside the baseline's fitted compute range is an extrapolation, flagged and
  left out of the mean.
- :func:`t_interval`: mean ± t_{0.975, n-1} sd / sqrt(n) of per-seed ln m, exponentiated.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class PowerLaw:
    """L = A * C^-alpha, fitted on ``n`` points spanning compute ``c_min``..``c_max``."""

    A: float
    alpha: float
    n: int
    c_min: float
    c_max: float
    rmse_log: float

    def loss(self, c) -> np.ndarray:
        return self.A * np.asarray(c, dtype=float) ** -self.alpha

    def compute_for(self, loss: float) -> float:
        """The compute at which the fit reaches ``loss`` (inf when alpha <= 0)."""
        if self.alpha <= 0:
            return math.inf
        return (self.A / loss) ** (1.0 / self.alpha)

    def to_dict(self) -> dict:
        return asdict(self)


def _points(c, loss, least: int = 2) -> tuple[np.ndarray, np.ndarray]:
    c, loss = np.atleast_1d(np.asarray(c, dtype=float)), np.atleast_1d(np.asarray(loss, dtype=float))
    if c.shape != loss.shape or c.ndim != 1:
        raise ValueError(f"compute and loss must be 1-D of one length, got {c.shape} and {loss.shape}")
    if len(c) < least:
        raise ValueError(f"need at least {least} points, got {len(c)}")
    if (c <= 0).any() or (loss <= 0).any() or not (np.isfinite(c).all() and np.isfinite(loss).all()):
        raise ValueError("compute and loss must be finite and > 0")
    return c, loss


def power_law(c, loss) -> PowerLaw:
    """OLS of ln L on ln C."""
    c, loss = _points(c, loss)
    x, y = np.log(c), np.log(loss)
    slope, intercept = np.polyfit(x, y, 1)
    resid = y - (intercept + slope * x)
    return PowerLaw(float(math.exp(intercept)), float(-slope), len(c), float(c.min()), float(c.max()),
                    float(np.sqrt(np.mean(resid**2))))


def shared_alpha(groups: dict[str, tuple]) -> dict:
    """One OLS over every scheme's points: ln L = a_s - alpha ln C. Returns {alpha, A: {scheme: A_s}, rmse_log}."""
    names = list(groups)
    xs, ys, rows = [], [], []
    for i, name in enumerate(names):
        c, loss = _points(*groups[name])
        xs.append(np.log(c))
        ys.append(np.log(loss))
        rows.extend([i] * len(c))
    x, y = np.concatenate(xs), np.concatenate(ys)
    design = np.zeros((len(x), len(names) + 1))
    design[np.arange(len(x)), rows] = 1.0
    design[:, -1] = -x
    coef, *_ = np.linalg.lstsq(design, y, rcond=None)
    resid = y - design @ coef
    return {
        "alpha": float(coef[-1]),
        "A": {n: float(math.exp(coef[i])) for i, n in enumerate(names)},
        "rmse_log": float(np.sqrt(np.mean(resid**2))),
    }


def shared_multiplier(fit: dict, baseline: str, variant: str) -> float:
    """m = (A_b / A_v)^(1/alpha) of a shared-alpha fit (shared floor too for :func:`floor_fit`)."""
    a = fit["alpha"]
    if a <= 0:
        return math.nan
    return (fit["A"][baseline] / fit["A"][variant]) ** (1.0 / a)


def floor_fit(groups: dict[str, tuple], alphas=None) -> dict:
    """L = E + A_s C^-alpha with E, alpha shared, by variable projection over ``alphas`` (default
    0.02..1.0). Returns {E, alpha, A, rmse_log, identified, why}."""
    alphas = np.linspace(0.02, 1.0, 99) if alphas is None else np.asarray(alphas, dtype=float)
    names = list(groups)
    pts = [_points(*groups[n]) for n in names]
    c = np.concatenate([p[0] for p in pts])
    loss = np.concatenate([p[1] for p in pts])
    rows = np.concatenate([[i] * len(p[0]) for i, p in enumerate(pts)]).astype(int)
    scale = c.min()  # C^-alpha on C / C_min keeps the columns near 1
    profile = []
    for a in alphas:
        design = np.zeros((len(c), len(names) + 1))
        design[:, 0] = 1.0
        design[np.arange(len(c)), rows + 1] = (c / scale) ** -a
        coef, *_ = np.linalg.lstsq(design, loss, rcond=None)
        pred = design @ coef
        if (coef < 0).any() or (pred <= 0).any():
            continue
        profile.append((float(np.sum((np.log(pred) - np.log(loss)) ** 2)), float(a), coef))
    if not profile:
        return {"E": None, "alpha": None, "A": None, "rmse_log": None, "identified": False,
                "why": "no alpha on the grid gives a non-negative floor and amplitudes"}
    sse, a, coef = min(profile, key=lambda t: t[0])
    pure = shared_alpha(groups)["rmse_log"] ** 2 * len(c)  # the same data without a floor
    identified, why = _identified(profile, sse, a, coef[0], float(alphas[0]), float(alphas[-1]), c, pure)
    return {
        "E": float(coef[0]),
        "alpha": a,
        # A in units of C (not C / C_min): L = E + A C^-alpha
        "A": {n: float(coef[i + 1] * scale**a) for i, n in enumerate(names)},
        "rmse_log": math.sqrt(sse / len(c)),
        "identified": identified,
        "why": why,
    }


def _identified(profile, sse: float, a: float, e: float, lo: float, hi: float, c, pure: float) -> tuple[bool, str]:
    """Whether the data pin down the floor: an interior alpha, E > 0, C spanning >= 10x, a floor that at least
    halves the residual of the pure power law, and a profile that rules out half and double the best alpha
    (their best residual at least twice the optimum's)."""
    if a in (lo, hi):
        return False, "alpha at the edge of the grid"
    if e <= 0:
        return False, "E = 0 at the optimum"
    if c.max() / c.min() < 10:
        return False, f"C spans only {c.max() / c.min():.1f}x (< 10x)"
    if sse > 0.5 * pure:
        return False, "a pure power law fits about as well (the floor does not halve its residual)"
    far = [t[0] for t in profile if t[1] <= a / 2 or t[1] >= 2 * a]
    if not far or min(far) < 2 * sse + 1e-12:
        return False, "flat profile: half or double the alpha fits about as well"
    return True, "interior alpha, E > 0, better than no floor, profile rules out half and double alpha"


def multiplier(base: PowerLaw, c_v, loss_v) -> dict:
    """Per variant point: m = C_b*(L_v) / C_v, and whether C_b* lies inside the baseline's fitted
    compute range (interpolated). ``ln_m``: the mean ln m over interpolated points (None if none)."""
    c_v, loss_v = _points(c_v, loss_v, least=1)
    points = []
    for c, loss in zip(c_v, loss_v, strict=True):
        cb = base.compute_for(float(loss))
        inside = base.c_min <= cb <= base.c_max
        points.append({"c": float(c), "loss": float(loss), "c_base": cb, "m": cb / float(c), "interpolated": inside})
    kept = [math.log(p["m"]) for p in points if p["interpolated"]]
    return {"points": points, "ln_m": sum(kept) / len(kept) if kept else None, "interpolated": len(kept),
            "extrapolated": len(points) - len(kept)}


def t_interval(xs: list[float], t_quantile) -> dict:
    """mean ± t sd / sqrt(n) of ``xs`` (per-seed ln m); ``t_quantile(df)`` -> (t, how). Exponentiated:
    {m, lo, hi, n, sd_ln}."""
    n = len(xs)
    if n == 0:
        return {"m": None, "lo": None, "hi": None, "n": 0, "sd_ln": None}
    mean = sum(xs) / n
    if n == 1:
        return {"m": math.exp(mean), "lo": None, "hi": None, "n": 1, "sd_ln": None}
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1))
    half = t_quantile(n - 1)[0] * sd / math.sqrt(n)
    return {"m": math.exp(mean), "lo": math.exp(mean - half), "hi": math.exp(mean + half), "n": n, "sd_ln": sd}


__all__ = ["PowerLaw", "floor_fit", "multiplier", "power_law", "shared_alpha", "shared_multiplier", "t_interval"]

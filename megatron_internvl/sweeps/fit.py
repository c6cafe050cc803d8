"""Scaling-law fits with bootstrap uncertainty and held-out error.

- Compute law on the frontier: L(C) = A * C^-alpha, fitted in log space (Huber) to the points
  that beat every point of smaller compute.
- Parametric law: L(N, D) = E + A / N^alpha + B / D^beta, or with the parameters split when the
  sweep varies both towers: E + A_v / N_v^alpha_v + A_l / N_l^alpha_l + B / D^beta. Fitted as
  Hoffmann et al. (2022) do: Huber loss (delta 1e-3) between log L and
  log(e^e + sum_k e^(a_k - alpha_k log X_k)), L-BFGS-B from a grid of starts. Its compute-optimal
  allocation under C ~ 6ND: N_opt ~ C^(beta / (alpha + beta)), D_opt ~ C^(alpha / (alpha + beta)).
- IsoFLOP minima: per budget a parabola of loss in log N; its vertex gives N_opt (D_opt from the
  budget's own N -> D relation); then N_opt = k_N C^a and D_opt = k_D C^b across budgets.

Uncertainty: every constant's 95% interval is the 2.5-97.5 percentile range over bootstrap
resamples of the points. Held-out error: the largest-compute fraction of points is left out,
the law fitted on the rest predicts them (RMSE and mean relative error of the loss).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy.optimize import least_squares, minimize

HUBER_DELTA = 1e-3


@dataclass
class Estimate:
    """A fitted constant with its bootstrap 95% interval (NaN when there was no bootstrap)."""

    value: float
    low: float = math.nan
    high: float = math.nan

    def text(self, digits: int = 3) -> str:
        if math.isnan(self.low):
            return f"{self.value:.{digits}g}"
        return f"{self.value:.{digits}g} [{self.low:.{digits}g}, {self.high:.{digits}g}]"


def _interval(value: float, samples: Sequence[float]) -> Estimate:
    finite = np.asarray([s for s in samples if np.isfinite(s)])
    if len(finite) < 2:
        return Estimate(float(value))
    low, high = np.percentile(finite, [2.5, 97.5])
    return Estimate(float(value), float(low), float(high))


# ---------------------------------------------------------------- compute law on the frontier


SAME_COMPUTE = 0.02
"""Points whose compute differs by less than this fraction are one budget (whole steps make
points of one IsoFLOP budget differ a little)."""


def frontier(compute: np.ndarray, loss: np.ndarray) -> np.ndarray:
    """Indices (by increasing compute) of the lower envelope: per budget (computes within
    SAME_COMPUTE of each other) its lowest loss, kept if it beats every smaller budget's."""
    order = np.argsort(compute, kind="stable")
    groups: list[list[int]] = []
    for i in order:
        if groups and compute[i] <= compute[groups[-1][0]] * (1 + SAME_COMPUTE):
            groups[-1].append(int(i))
        else:
            groups.append([int(i)])
    best, keep = math.inf, []
    for group in groups:
        i = min(group, key=lambda j: (loss[j], j))
        if loss[i] < best:
            keep.append(i)
            best = loss[i]
    return np.asarray(keep, dtype=int)


def _power_law(log_c: np.ndarray, log_l: np.ndarray) -> tuple[float, float]:
    """(log A, alpha) of log L = log A - alpha log C, robust (Huber) in log space."""
    slope, intercept = np.polyfit(log_c, log_l, 1)
    result = least_squares(
        lambda p: p[0] - p[1] * log_c - log_l, [intercept, -slope], loss="huber", f_scale=0.01
    )
    return float(result.x[0]), float(result.x[1])


def fit_compute_law(
    compute: Sequence[float], loss: Sequence[float], bootstrap: int = 200, seed: int = 0
) -> dict[str, Any]:
    """L = A * C^-alpha on the frontier; needs 2 frontier points (4 for an interval)."""
    c, y = np.asarray(compute, float), np.asarray(loss, float)
    front = frontier(c, y)
    if len(front) < 2:
        return {"status": f"skipped: {len(front)} frontier point(s), need 2"}
    log_c, log_l = np.log(c[front]), np.log(y[front])
    log_a, alpha = _power_law(log_c, log_l)
    rng = np.random.default_rng(seed)
    samples = []
    if len(front) >= 4:  # fewer points resample into degenerate fits: no interval
        for _ in range(bootstrap):
            pick = rng.integers(0, len(front), len(front))
            if len(set(pick)) >= 2:
                samples.append(_power_law(log_c[pick], log_l[pick]))
    boot = np.asarray(samples) if samples else np.zeros((0, 2))
    return {
        "status": "ok",
        "form": "L = A * C^-alpha",
        "A": asdict(_interval(math.exp(log_a), np.exp(boot[:, 0]))),
        "alpha": asdict(_interval(alpha, boot[:, 1])),
        "frontier": [int(i) for i in front],
    }


# ---------------------------------------------------------------- parametric L(N, D)


def _objective(params: np.ndarray, log_x: np.ndarray, log_l: np.ndarray) -> tuple[float, Any]:
    """Huber loss of log-space residuals (in units of delta^2, so that L-BFGS-B's tolerances
    bite) and its gradient. params = [e, a_1, alpha_1, ..., a_k, alpha_k]."""
    k = log_x.shape[1]
    a, alpha = params[1::2], params[2::2]
    terms = np.empty((len(log_l), k + 1))
    terms[:, :k] = a - alpha * log_x
    terms[:, k] = params[0]
    top = terms.max(axis=1, keepdims=True)
    weights = np.exp(terms - top)
    total = weights.sum(axis=1)
    r = top[:, 0] + np.log(total) - log_l  # log prediction - log observation
    small = np.abs(r) <= HUBER_DELTA
    value = np.where(small, 0.5 * r**2, HUBER_DELTA * (np.abs(r) - 0.5 * HUBER_DELTA)).sum()
    dr = np.where(small, r, HUBER_DELTA * np.sign(r))
    w = weights * (dr / total)[:, None]  # softmax (d log-pred / d term) x d huber / d r
    grad = np.empty_like(params)
    grad[0] = w[:, k].sum()
    grad[1::2] = w[:, :k].sum(axis=0)
    grad[2::2] = -(w[:, :k] * log_x).sum(axis=0)
    scale = HUBER_DELTA**-2
    return float(value) * scale, grad * scale


ALPHA_BOUNDS = (0.0, 3.0)
E_FLOOR = 1e-4
"""E is bounded below at this fraction of the smallest loss seen: E at that bound means the
points show no floor (reported as not identifiable, not as E = 0)."""


def _bounds(log_x: np.ndarray, log_l: np.ndarray) -> list[tuple[float, float]]:
    """Finite bounds of [e, a_1, alpha_1, ...] (log E, log A_k, alpha_k), from the data: E below
    the smallest loss, each term able to span from negligible to the largest loss. Finite
    bounds keep exp() finite in every resample."""
    low, high = float(log_l.min()), float(log_l.max())
    bounds = [(low + math.log(E_FLOOR), low)]
    for column in log_x.T:
        bounds += [(low - 10.0, high + ALPHA_BOUNDS[1] * float(column.max()) + 1.0), ALPHA_BOUNDS]
    return bounds


def _minimize(
    start: np.ndarray, log_x: np.ndarray, log_l: np.ndarray, bounds: list[tuple[float, float]]
) -> Any:
    lo, hi = np.array(bounds).T
    return minimize(
        _objective,
        np.clip(start, lo, hi),
        args=(log_x, log_l),
        jac=True,
        method="L-BFGS-B",
        bounds=bounds,
        options={"maxiter": 500},  # a start that has not settled by then is not the best one
    )


def _best_fit(log_x: np.ndarray, log_l: np.ndarray, bounds: list[tuple[float, float]]) -> Any:
    """Best of L-BFGS-B runs from a grid of starts (the objective has many local minima)."""
    k = log_x.shape[1]
    e_grid = log_l.min() + np.log([0.3, 0.9])  # E below the smallest loss seen
    # (a_k, alpha_k) starts per term; coarser with three terms (the grid grows as 6^k).
    coefs_grid = [0.0, 5.0, 10.0] if k <= 2 else [0.0, 8.0]
    per_term = list(itertools.product(coefs_grid, [0.2, 0.5]))
    best = None
    for e in e_grid:
        for coefs in itertools.product(per_term, repeat=k):
            start = np.array([e, *itertools.chain.from_iterable(coefs)])
            result = _minimize(start, log_x, log_l, bounds)
            if best is None or result.fun < best.fun:
                best = result
    return best.x


def predict(params: np.ndarray, x: np.ndarray) -> np.ndarray:
    """L for rows of x (one column per power-law term: N or N_v, N_l, then D)."""
    log_x = np.log(np.asarray(x, float))
    a, alpha = params[1::2], params[2::2]
    return np.exp(params[0]) + (np.exp(a - alpha * log_x)).sum(axis=1)


def fit_parametric(
    x: np.ndarray,
    loss: Sequence[float],
    names: Sequence[str],
    compute: Sequence[float] | None = None,
    bootstrap: int = 200,
    holdout_fraction: float = 0.2,
    seed: int = 0,
    max_heldout_error: float = 0.05,
) -> dict[str, Any]:
    """L = E + sum_k A_k / X_k^alpha_k over the columns of `x` (named by `names`, e.g.
    ["N", "D"]). `compute` orders points for the held-out split (largest held out); a held-out
    relative error above `max_heldout_error` is flagged."""
    x = np.asarray(x, float)
    y = np.asarray(loss, float)
    n, k = x.shape
    n_params = 1 + 2 * k
    if n < n_params + 1:
        return {"status": f"skipped: {n} points for {n_params} constants, need {n_params + 1}"}
    log_x, log_l = np.log(x), np.log(y)
    result: dict[str, Any] = {"status": "ok", "form": _form(names), "n_points": n}

    order = np.argsort(np.asarray(compute if compute is not None else x.prod(axis=1), float))
    n_held = math.floor(holdout_fraction * n)
    bounds = _bounds(log_x, log_l)
    if n_held and n - n_held >= n_params + 1:
        train, held = order[: n - n_held], order[n - n_held :]
        params = _best_fit(log_x[train], log_l[train], _bounds(log_x[train], log_l[train]))
        pred = predict(params, x)
        error = pred[held] - y[held]
        relative = np.abs(error) / y[held]
        result["heldout"] = {
            "n_points": int(n_held),
            "rmse": float(np.sqrt(np.mean(error**2))),
            "mean_relative_error": float(np.mean(relative)),
            "max_relative_error": float(np.max(relative)),
            "threshold": max_heldout_error,
            "within_threshold": bool(np.max(relative) <= max_heldout_error),
            "indices": [int(i) for i in held],
        }
        result["predictions"] = [
            {"index": int(i), "observed": float(y[i]), "predicted": float(pred[i]),
             "heldout": bool(i in held)}
            for i in range(n)
        ]  # fmt: skip
    else:
        result["heldout"] = {
            "n_points": 0,
            "note": f"not enough points to hold out {holdout_fraction:.0%} and still fit",
        }

    params = _best_fit(log_x, log_l, bounds)
    if "predictions" not in result:
        pred = predict(params, x)
        result["predictions"] = [
            {"index": i, "observed": float(y[i]), "predicted": float(pred[i]), "heldout": False}
            for i in range(n)
        ]
    fitted = np.sqrt(np.mean((predict(params, x) - y) ** 2))
    result["train_rmse"] = float(fitted)
    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(bootstrap):
        pick = rng.integers(0, n, n)
        samples.append(_minimize(params, log_x[pick], log_l[pick], bounds).x)
    boot = np.asarray(samples) if samples else np.zeros((0, n_params))
    reasons = _unidentified(params, boot, bounds, log_x, y, names)
    constants = {"E": _interval(math.exp(params[0]), np.exp(boot[:, 0]))}
    for j, name in enumerate(names):
        constants[f"A_{name}"] = _interval(math.exp(params[1 + 2 * j]), np.exp(boot[:, 1 + 2 * j]))
        constants[f"alpha_{name}"] = _interval(params[2 + 2 * j], boot[:, 2 + 2 * j])
    if list(names) == ["N", "D"]:  # Chinchilla's compute-optimal exponents under C ~ 6ND
        alpha, beta = params[2], params[4]
        a_boot = boot[:, 4] / np.maximum(boot[:, 2] + boot[:, 4], 1e-12)
        constants["a_N_opt"] = _interval(beta / max(alpha + beta, 1e-12), a_boot)
        constants["b_D_opt"] = _interval(alpha / max(alpha + beta, 1e-12), 1 - a_boot)
        for derived in ("a_N_opt", "b_D_opt"):
            parents = [r for key, r in reasons.items() if key in ("alpha_N", "alpha_D")]
            if parents:
                reasons[derived] = "follows from alpha_N and alpha_D: " + "; ".join(parents)
            elif (why := _not_6nd(compute, x)) is not None:
                reasons[derived] = why
    result["constants"] = {
        key: {**asdict(value), "identifiable": key not in reasons, "reason": reasons.get(key)}
        for key, value in constants.items()
    }
    if reasons:
        result["warning"] = "not identifiable from these points: " + "; ".join(
            f"{key} ({why})" for key, why in reasons.items()
        )
    result["params"] = [float(p) for p in params]
    return result


def _not_6nd(compute: Sequence[float] | None, x: np.ndarray) -> str | None:
    """Why C ~ 6ND (which the law's compute-optimal exponents assume) does not hold for these
    points, or None. Tiny models spend most FLOPs outside N (a fixed ViT, the output layer
    over a vocabulary, attention): then the IsoFLOP exponents are the ones to read."""
    if compute is None:
        return None
    ratio = np.asarray(compute, float) / (6 * x[:, 0] * x[:, 1])
    if ratio.max() / ratio.min() <= 1.5:
        return None
    return (
        f"assumes C ~ 6ND, but these points spend {ratio.min():.2g}-{ratio.max():.2g} x 6ND "
        "(FLOPs outside N): read the IsoFLOP exponents"
    )


def _unidentified(
    params: np.ndarray,
    boot: np.ndarray,
    bounds: list[tuple[float, float]],
    log_x: np.ndarray,
    loss: np.ndarray,
    names: Sequence[str],
) -> dict[str, str]:
    """Constant name -> why the points cannot determine it: at a bound, a degenerate (zero-width)
    or enormous bootstrap interval, E ~ 0 (no floor), or a term that is negligible at every
    point (so its A and exponent are free)."""
    reasons: dict[str, str] = {}
    keys = ["E"] + [f"{p}_{n}" for n in names for p in ("A", "alpha")]
    for i, key in enumerate(keys):
        lo, hi = bounds[i]
        if min(params[i] - lo, hi - params[i]) <= 1e-3 * (hi - lo):
            if key == "E" and params[i] - lo <= 1e-3 * (hi - lo):
                reasons[key] = "E ~ 0: the points show no loss floor"
            else:
                reasons[key] = f"estimate at its bound [{lo:.3g}, {hi:.3g}]"
        elif len(boot) >= 10:
            spread = np.percentile(boot[:, i], 97.5) - np.percentile(boot[:, i], 2.5)
            # e and a_k are logs: a spread of ln(1e3) is three orders of magnitude.
            limit = 1.5 if key.startswith("alpha") else math.log(1e3)
            if spread <= 1e-9 * max(1.0, abs(params[i])):
                reasons[key] = "zero-width bootstrap interval (every resample lands on one value)"
            elif spread > limit:
                reasons[key] = "bootstrap interval spans more than the data can pin down"
    for j, name in enumerate(names):
        if len(boot) >= 10 and np.percentile(boot[:, 2 + 2 * j], 2.5) <= 1e-3 * ALPHA_BOUNDS[1]:
            # An exponent that may be 0 makes the term a constant: the loss need not fall
            # with this quantity at all, and the term trades off against E.
            for key in (f"A_{name}", f"alpha_{name}"):
                reasons.setdefault(
                    key,
                    f"alpha_{name}'s interval reaches 0: the {name} term cannot be told from "
                    f"a constant (the loss need not change with {name} over the sizes run)",
                )
        share = np.exp(params[1 + 2 * j] - params[2 + 2 * j] * log_x[:, j]) / loss
        if share.max() < 1e-2:
            for key in (f"A_{name}", f"alpha_{name}"):
                reasons.setdefault(
                    key,
                    f"the {name} term is under 1% of the loss at every point: {name} does "
                    "not change the loss over the sizes run",
                )
    return reasons


def _form(names: Sequence[str]) -> str:
    return "L = E + " + " + ".join(f"A_{n} / {n}^alpha_{n}" for n in names)


# ---------------------------------------------------------------- IsoFLOP minima


def _vertex(log_n: np.ndarray, loss: np.ndarray) -> tuple[float, float] | None:
    """(log N at the minimum, min loss) of a parabola in log N; None if not convex."""
    c2, c1, c0 = np.polyfit(log_n, loss, 2)
    if c2 <= 0:
        return None
    x = -c1 / (2 * c2)
    return float(x), float(c0 - c1**2 / (4 * c2))


def isoflop_minima(
    budgets: Sequence[float],
    n_params: Sequence[float],
    tokens: Sequence[float],
    loss: Sequence[float],
    compute: Sequence[float],
    bootstrap: int = 200,
    seed: int = 0,
) -> dict[str, Any]:
    """Per budget: N_opt, D_opt, L_min (a budget needs 3 model sizes and a convex parabola);
    across >= 2 budgets: N_opt = k_N C^a and D_opt = k_D C^b with bootstrap intervals."""
    b, n, d = (np.asarray(v, float) for v in (budgets, n_params, tokens))
    y, c = np.asarray(loss, float), np.asarray(compute, float)
    rng = np.random.default_rng(seed)
    per_budget, groups = [], []
    for budget in sorted(set(b.tolist())):
        idx = np.flatnonzero(b == budget)
        entry: dict[str, Any] = {"budget": budget, "n_points": len(idx)}
        per_budget.append(entry)
        if len(set(n[idx].tolist())) < 3:
            entry["status"] = "skipped: needs 3 model sizes"
            continue
        vertex = _vertex(np.log(n[idx]), y[idx])
        if vertex is None:
            entry["status"] = "skipped: loss is not convex in log N at this budget"
            continue
        slope, intercept = np.polyfit(np.log(n[idx]), np.log(d[idx]), 1)
        log_n_opt, l_min = vertex
        if not np.log(n[idx]).min() <= log_n_opt <= np.log(n[idx]).max():
            # A vertex outside the sampled sizes is an extrapolation, not a measured minimum.
            entry["status"] = (
                f"skipped: minimum at N = {math.exp(log_n_opt):.3g}, outside the sampled sizes; "
                "add sizes on that side"
            )
            continue
        entry.update(
            status="ok",
            compute=float(c[idx].mean()),
            N_opt=math.exp(log_n_opt),
            D_opt=math.exp(intercept + slope * log_n_opt),
            L_min=l_min,
            parabola=[float(v) for v in np.polyfit(np.log(n[idx]), y[idx], 2)],
            d_of_n=[float(slope), float(intercept)],
        )
        groups.append((entry, idx, slope, intercept))
    result: dict[str, Any] = {"budgets": per_budget}
    if len(groups) < 2:
        result["status"] = f"no law: {len(groups)} budget(s) with a minimum, need 2"
        return result

    def exponents(minima: list[tuple[float, float, float]]) -> tuple[float, ...]:
        log_c, log_n_opt, log_d_opt = (np.asarray(v) for v in zip(*minima, strict=True))
        a, log_kn = np.polyfit(log_c, log_n_opt, 1)
        b_exp, log_kd = np.polyfit(log_c, log_d_opt, 1)
        return a, log_kn, b_exp, log_kd

    minima = [
        (math.log(e["compute"]), math.log(e["N_opt"]), math.log(e["D_opt"])) for e, *_ in groups
    ]
    best = exponents(minima)
    samples = []
    for _ in range(bootstrap):
        redo = []
        for entry, idx, slope, intercept in groups:
            pick = rng.choice(idx, len(idx))
            if len(set(n[pick].tolist())) < 3:
                continue
            vertex = _vertex(np.log(n[pick]), y[pick])
            if vertex is not None:
                log_c = math.log(entry["compute"])
                redo.append((log_c, vertex[0], intercept + slope * vertex[0]))
        if len({m[0] for m in redo}) >= 2:
            samples.append(exponents(redo))
    boot = np.asarray(samples) if samples else np.zeros((0, 4))
    result.update(
        status="ok",
        a_N_opt=asdict(_interval(best[0], boot[:, 0])),
        k_N=asdict(_interval(math.exp(best[1]), np.exp(boot[:, 1]))),
        b_D_opt=asdict(_interval(best[2], boot[:, 2])),
        k_D=asdict(_interval(math.exp(best[3]), np.exp(boot[:, 3]))),
    )
    return result


# ---------------------------------------------------------------- a whole sweep


LOSS_NAMES = {
    "valid_loss": "validation loss",
    "smoothed_loss": "training loss (smoothed)",
    "final_loss": "training loss (last step)",
}


def choose_loss(rows: list[dict[str, Any]], requested: str = "auto") -> tuple[str, str | None]:
    """(collected column to fit, note). "auto": validation loss when every finished point logged
    one (the standard for scaling laws: it measures the model, not the batches it last saw),
    else the smoothed training loss, with a note saying why."""
    if requested != "auto":
        return requested, None
    done = [r for r in rows if r.get("status") == "done"]
    if done and all(r.get("valid_loss") is not None for r in done):
        return "valid_loss", None
    return "smoothed_loss", (
        "no validation loss (valid/loss) logged by every finished point: fitting the smoothed "
        "training loss; set data.valid_shards to fit validation loss"
    )


PARAM_NAMES = {
    "non_embedding": "non-embedding parameters (ViT + projector + LLM)",
    "total": "parameters (ViT + projector + LLM with embeddings)",
    "language": "LLM non-embedding parameters",
    "language_total": "LLM parameters (with embeddings)",
}


def model_size(row: dict[str, Any], params: str = "non_embedding") -> int:
    """The row's N under `params` (see FitSection.params)."""
    base = row["n_language"] if params.startswith("language") else row["N"]
    return base + (row["n_embedding"] if params in ("total", "language_total") else 0)


def fit_sweep(
    rows: list[dict[str, Any]],
    loss_key: str = "auto",
    bootstrap: int = 200,
    holdout_fraction: float = 0.2,
    seed: int = 0,
    max_heldout_error: float = 0.05,
    params: str = "non_embedding",
) -> dict[str, Any]:
    """Every law the sweep's finished points support. Point order is `rows` order among the
    points used (listed in "ids")."""
    loss_key, note = choose_loss(rows, loss_key)
    used = [
        r for r in rows
        if r.get("status") == "done" and r.get(loss_key) is not None
        and math.isfinite(r[loss_key])
    ]  # fmt: skip
    out: dict[str, Any] = {
        "loss": loss_key,
        "quantity": LOSS_NAMES[loss_key],
        "params": params,
        "params_name": PARAM_NAMES[params],
        "ids": [r["id"] for r in used],
        "sizes": [model_size(r, params) for r in used],
    }
    if note:
        out["loss_note"] = note
    if not used:
        out["status"] = "no finished points"
        return out
    loss = [r[loss_key] for r in used]
    compute = [r["flops"] for r in used]
    out["compute_law"] = fit_compute_law(compute, loss, bootstrap, seed)
    # Split N only when both towers change shape (the projector follows the LLM's width).
    split = (
        len({(r["vit_layers"], r["vit_hidden"]) for r in used}) > 1
        and len({(r["llm_layers"], r["llm_hidden"]) for r in used}) > 1
    )
    if split:
        with_embeddings = params in ("total", "language_total")
        x = [
            [
                r["n_vision"],
                r["n_language"] + (r["n_embedding"] if with_embeddings else 0),
                r["tokens"],
            ]
            for r in used
        ]
        names = ["Nv", "Nl", "D"]
    else:
        x = [[size, r["tokens"]] for size, r in zip(out["sizes"], used, strict=True)]
        names = ["N", "D"]
    out["parametric"] = fit_parametric(
        np.asarray(x), loss, names, compute, bootstrap, holdout_fraction, seed, max_heldout_error
    )
    with_budget = [i for i, r in enumerate(used) if r.get("budget") is not None]
    if with_budget:
        out["isoflop"] = isoflop_minima(
            [used[i]["budget"] for i in with_budget],
            [out["sizes"][i] for i in with_budget],
            [used[i]["tokens"] for i in with_budget],
            [loss[i] for i in with_budget],
            [compute[i] for i in with_budget],
            bootstrap,
            seed,
        )
        out["agreement"] = exponent_agreement(out["parametric"], out["isoflop"])
    out["status"] = "ok"
    return out


def exponent_agreement(parametric: dict[str, Any], isoflop: dict[str, Any]) -> dict[str, Any]:
    """Do the two estimates of N_opt's exponent, the parametric law's implied a_N_opt and the
    IsoFLOP minima's fitted slope, agree (their 95% intervals overlap)? Two methods on the same
    points that disagree mean the law's form does not describe them; the report says so instead
    of leaving two numbers side by side."""
    implied = parametric.get("constants", {}).get("a_N_opt")
    minima = isoflop.get("a_N_opt") if isoflop.get("status") == "ok" else None
    if implied is None or minima is None:
        return {"status": "not comparable: one of the two estimates was not made"}
    if not implied.get("identifiable", True):
        return {"status": "not comparable: the law's a_N_opt is not identifiable"}
    bounds = [(e["low"], e["high"]) for e in (implied, minima)]
    if any(math.isnan(v) for pair in bounds for v in pair):
        return {"status": "not comparable: no bootstrap intervals"}
    low, high = max(b[0] for b in bounds), min(b[1] for b in bounds)
    agree = low <= high
    return {
        "status": "agree" if agree else "disagree",
        "parametric": implied["value"],
        "isoflop": minima["value"],
        "overlap": [low, high] if agree else None,
    }

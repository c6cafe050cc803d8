"""PNG figures of a fitted sweep (matplotlib, Agg: no display needed)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _fmt_params(n: float) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g}{unit}"
    return f"{n:.0f}"


def _used(rows: list[dict[str, Any]], fit: dict[str, Any]) -> list[dict[str, Any]]:
    """The fitted points in the fit's order (its indices refer to it)."""
    by_id = {r["id"]: r for r in rows}
    return [by_id[i] for i in fit["ids"]]


def _estimate(e: dict[str, float]) -> str:
    if math.isnan(e.get("low", math.nan)):
        return f"{e['value']:.3g}"
    return f"{e['value']:.3g} [{e['low']:.3g}, {e['high']:.3g}]"


def _decorate(ax: Any) -> None:
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)


def _save(plt: Any, fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def loss_vs_compute(rows: list[dict[str, Any]], fit: dict[str, Any], path: Path) -> Path:
    """Each model's points (connected, by compute), the frontier and the fitted compute law."""
    plt = _pyplot()
    used = _used(rows, fit)
    loss_key = fit["loss"]
    fig, ax = plt.subplots(figsize=(7.5, 5))
    models = sorted(
        {r["model"] for r in used}, key=lambda m: next(r["N"] for r in used if r["model"] == m)
    )
    colors = plt.cm.viridis(np.linspace(0, 0.9, max(len(models), 1)))
    for model, color in zip(models, colors, strict=True):
        pts = sorted((r["flops"], r[loss_key]) for r in used if r["model"] == model)
        n = next(r["N"] for r in used if r["model"] == model)
        ax.plot(
            *zip(*pts, strict=True),
            "o-",
            color=color,
            alpha=0.8,
            label=f"{model} (N={_fmt_params(n)})",
        )
    law = fit.get("compute_law", {})
    if law.get("status") == "ok":
        front = [used[i] for i in law["frontier"]]
        ax.scatter(
            [r["flops"] for r in front],
            [r[loss_key] for r in front],
            s=160,
            facecolors="none",
            edgecolors="crimson",
            linewidths=1.5,
            label="frontier",
        )
        c = np.geomspace(min(r["flops"] for r in used), max(r["flops"] for r in used) * 2, 100)
        a, alpha = law["A"]["value"], law["alpha"]["value"]
        ax.plot(
            c,
            a * c**-alpha,
            "--",
            color="crimson",
            label=f"fit L = A C^-α, α = {_estimate(law['alpha'])}",
        )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("training compute C (FLOPs: ViT + projector + LLM, forward + backward)")
    ax.set_ylabel(f"training loss ({loss_key.replace('_', ' ')})")
    ax.set_title("Loss vs compute, with the fitted compute-optimal frontier")
    _decorate(ax)
    return _save(plt, fig, path)


def isoflop_curves(rows: list[dict[str, Any]], fit: dict[str, Any], path: Path) -> Path | None:
    """Left: loss vs N per budget with the parabola and its minimum; right: N_opt and D_opt vs C."""
    iso = fit.get("isoflop")
    if not iso:
        return None
    plt = _pyplot()
    used = [r for r in _used(rows, fit) if r.get("budget") is not None]
    loss_key = fit["loss"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 5))
    budgets = sorted({r["budget"] for r in used})
    colors = plt.cm.plasma(np.linspace(0, 0.85, len(budgets)))
    entries = {e["budget"]: e for e in iso["budgets"]}
    for budget, color in zip(budgets, colors, strict=True):
        pts = sorted((r["N"], r[loss_key]) for r in used if r["budget"] == budget)
        left.plot(*zip(*pts, strict=True), "o", color=color, label=f"C = {budget:.2g} FLOPs")
        entry = entries.get(budget, {})
        if "parabola" in entry:
            n = np.geomspace(pts[0][0] / 1.5, pts[-1][0] * 1.5, 100)
            left.plot(n, np.polyval(entry["parabola"], np.log(n)), "-", color=color, alpha=0.7)
            left.plot(
                entry["N_opt"],
                entry["L_min"],
                "*",
                color=color,
                markersize=16,
                markeredgecolor="black",
            )
    left.set_xscale("log")
    left.set_xlabel("non-embedding parameters N")
    left.set_ylabel(f"training loss ({loss_key.replace('_', ' ')})")
    left.set_title("IsoFLOP curves (star: fitted minimum)")
    left.grid(True, which="both", alpha=0.3)
    left.legend(fontsize=8)
    ok = [e for e in iso["budgets"] if "N_opt" in e]
    if ok:
        c = np.array([e["compute"] for e in ok])
        right.plot(c, [e["N_opt"] for e in ok], "s", color="tab:blue", label="N_opt (parameters)")
        right.plot(c, [e["D_opt"] for e in ok], "^", color="tab:orange", label="D_opt (tokens)")
        if iso.get("status") == "ok":
            grid = np.geomspace(c.min() / 2, c.max() * 2, 50)
            for name, k, exponent, color in (
                ("N_opt", "k_N", "a_N_opt", "tab:blue"),
                ("D_opt", "k_D", "b_D_opt", "tab:orange"),
            ):
                right.plot(
                    grid,
                    iso[k]["value"] * grid ** iso[exponent]["value"],
                    "--",
                    color=color,
                    label=f"{name} ∝ C^{_estimate(iso[exponent])}",
                )
    else:
        right.text(
            0.5,
            0.5,
            "no budget has a measured minimum\n(see report.md)",
            ha="center",
            va="center",
            transform=right.transAxes,
        )
    right.set_xscale("log")
    right.set_yscale("log")
    right.set_xlabel("training compute C (FLOPs)")
    right.set_ylabel("compute-optimal N or D")
    right.set_title("Compute-optimal model size and tokens")
    right.grid(True, which="both", alpha=0.3)
    right.legend(fontsize=8)
    return _save(plt, fig, path)


def predicted_vs_observed(
    rows: list[dict[str, Any]], fit: dict[str, Any], path: Path
) -> Path | None:
    """The parametric law's prediction of every point; held-out points predicted by the fit
    that did not see them."""
    par = fit.get("parametric", {})
    if par.get("status") != "ok":
        return None
    plt = _pyplot()
    preds = par["predictions"]
    fig, ax = plt.subplots(figsize=(5.5, 5.5))
    for held, style, label in ((False, "o", "fitted points"), (True, "D", "held-out points")):
        sel = [p for p in preds if p["heldout"] == held]
        if sel:
            ax.plot(
                [p["observed"] for p in sel],
                [p["predicted"] for p in sel],
                style,
                color="crimson" if held else "tab:blue",
                label=label,
            )
    values = [p["observed"] for p in preds] + [p["predicted"] for p in preds]
    lo, hi = min(values), max(values)
    pad = 0.05 * (hi - lo or 1)
    ax.plot([lo - pad, hi + pad], [lo - pad, hi + pad], "k--", lw=1, label="y = x")
    held = par.get("heldout", {})
    err = f"held-out RMSE {held['rmse']:.3g}" if "rmse" in held else "no held-out points"
    ax.set_title(f"{par['form']}\n{err}", fontsize=9)
    ax.set_xlabel("observed loss")
    ax.set_ylabel("predicted loss")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    return _save(plt, fig, path)


def loss_vs_lr(rows: list[dict[str, Any]], fit: dict[str, Any], path: Path) -> Path | None:
    """Loss vs peak learning rate per (model, tokens), when the sweep varies the learning rate."""
    used = _used(rows, fit)
    if len({r["lr"] for r in used}) < 2:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for key in sorted({(r["model"], r["tokens"]) for r in used}):
        pts = sorted((r["lr"], r[fit["loss"]]) for r in used if (r["model"], r["tokens"]) == key)
        ax.plot(*zip(*pts, strict=True), "o-", label=f"{key[0]}, {key[1]:,} tokens")
    ax.set_xscale("log")
    ax.set_xlabel("peak learning rate")
    ax.set_ylabel(f"training loss ({fit['loss'].replace('_', ' ')})")
    ax.set_title("Learning-rate sensitivity")
    _decorate(ax)
    return _save(plt, fig, path)


def draw_all(rows: list[dict[str, Any]], fit: dict[str, Any], out: Path) -> dict[str, Path]:
    """Every figure the fit supports, as <out>/<name>.png."""
    out.mkdir(parents=True, exist_ok=True)
    figures = {
        "loss_vs_compute": loss_vs_compute(rows, fit, out / "loss_vs_compute.png"),
        "isoflop": isoflop_curves(rows, fit, out / "isoflop.png"),
        "predicted_vs_observed": predicted_vs_observed(
            rows, fit, out / "predicted_vs_observed.png"
        ),
        "loss_vs_lr": loss_vs_lr(rows, fit, out / "loss_vs_lr.png"),
    }
    return {name: path for name, path in figures.items() if path is not None}

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
    sizes = fit.get("sizes") or [by_id[i]["N"] for i in fit["ids"]]
    return [{**by_id[i], "N_fit": n} for i, n in zip(fit["ids"], sizes, strict=True)]


def _estimate(e: dict[str, float]) -> str:
    if math.isnan(e.get("low", math.nan)):
        return f"{e['value']:.3g}"
    return f"{e['value']:.3g} [{e['low']:.3g}, {e['high']:.3g}]"


def _decorate(ax: Any, fontsize: int = 7) -> None:
    ax.grid(True, which="both", alpha=0.3)
    if ax.get_legend_handles_labels()[0]:  # no empty legend boxes
        ax.legend(fontsize=fontsize)


def _note(ax: Any, text: str) -> None:
    """Say in the panel itself why it has nothing (or less) to show."""
    ax.text(
        0.5,
        0.5,
        text,
        ha="center",
        va="center",
        wrap=True,
        fontsize=9,
        transform=ax.transAxes,
        bbox={"boxstyle": "round", "facecolor": "lightyellow", "edgecolor": "grey"},
    )


def _quantity(fit: dict[str, Any]) -> str:
    """The fitted quantity, for axis labels: validation or training loss."""
    return fit.get("quantity") or fit["loss"].replace("_", " ")


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
        {r["model"] for r in used}, key=lambda m: next(r["N_fit"] for r in used if r["model"] == m)
    )
    colors = plt.cm.viridis(np.linspace(0, 0.9, max(len(models), 1)))
    vit_varies = len({(r["vit_layers"], r["vit_hidden"]) for r in used}) > 1
    for model, color in zip(models, colors, strict=True):
        pts = sorted((r["flops"], r[loss_key]) for r in used if r["model"] == model)
        first = next(r for r in used if r["model"] == model)
        size = f"N={_fmt_params(first['N_fit'])}"
        if vit_varies:  # N may count the LLM only: name the ViT's share too
            size += f", ViT {_fmt_params(first['n_vision'])}"
        ax.plot(
            *zip(*pts, strict=True),
            "o-",
            color=color,
            alpha=0.8,
            label=f"{model} ({size})",
        )
    # The frontier: the lower envelope of all points (best loss reached at <= this compute).
    ordered = sorted((r["flops"], r[loss_key]) for r in used)
    envelope, best = [], math.inf
    for c_value, l_value in ordered:
        best = min(best, l_value)
        envelope.append((c_value, best))
    ax.step(*zip(*envelope, strict=True), where="post", color="crimson", lw=1.5,
            label="frontier (lower envelope)")  # fmt: skip
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
            label="frontier points (fitted)",
        )
        c = np.geomspace(min(r["flops"] for r in used), max(r["flops"] for r in used) * 2, 100)
        a, alpha = law["A"]["value"], law["alpha"]["value"]
        ax.plot(c, a * c**-alpha, "--", color="crimson",
                label=f"fit L = A C^-α, α = {_estimate(law['alpha'])}"
                + ("" if math.isnan(law["alpha"].get("low", math.nan)) else " (95%)"))  # fmt: skip
    else:
        _note(ax, f"no compute law: {law.get('status', 'not fitted')}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("training compute C (FLOPs: ViT + projector + LLM, forward + backward)")
    ax.xaxis.set_minor_formatter("")
    ax.set_ylabel(_quantity(fit))
    ax.set_title(f"{_quantity(fit)} vs compute, with the compute-optimal frontier")
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
        pts = sorted((r["N_fit"], r[loss_key]) for r in used if r["budget"] == budget)
        entry = entries.get(budget, {})
        label = f"C = {budget:.2g} FLOPs"
        if entry.get("status", "ok") != "ok":
            label += " (no minimum)"
        left.plot(*zip(*pts, strict=True), "o", color=color, label=label)
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
    left.xaxis.set_minor_formatter("")  # minor labels (3x10^4, 4x10^4, ...) overlap
    left.set_xlabel(f"N: {fit.get('params_name', 'non-embedding parameters')}")
    left.set_ylabel(_quantity(fit))
    left.set_title(f"IsoFLOP curves of {_quantity(fit)} (star: fitted minimum)")
    _decorate(left, 8)
    _optimal_panel(right, iso)
    return _save(plt, fig, path)


def _optimal_panel(ax: Any, iso: dict[str, Any]) -> None:
    """N_opt and D_opt per budget, the fitted power laws and their 95% bands (the exponent's
    bootstrap range, pivoting on the minima's centre)."""
    ok = [e for e in iso["budgets"] if "N_opt" in e]
    if not ok:
        why = "; ".join(f"C={e['budget']:.2g}: {e['status']}" for e in iso["budgets"])
        _note(ax, f"no budget has an interior minimum:\n{why}")
    else:
        c = np.array([e["compute"] for e in ok])
        ax.plot(c, [e["N_opt"] for e in ok], "s", color="tab:blue", label="N_opt (parameters)")
        ax.plot(c, [e["D_opt"] for e in ok], "^", color="tab:orange", label="D_opt (tokens)")
        if iso.get("status") == "ok":
            grid = np.geomspace(c.min() / 2, c.max() * 2, 50)
            pivot = math.exp(np.log(c).mean())
            for name, k, exponent, color in (
                ("N_opt", "k_N", "a_N_opt", "tab:blue"),
                ("D_opt", "k_D", "b_D_opt", "tab:orange"),
            ):
                e = iso[exponent]
                at_pivot = iso[k]["value"] * pivot ** e["value"]
                ax.plot(grid, at_pivot * (grid / pivot) ** e["value"], "--", color=color,
                        label=f"{name} ∝ C^{_estimate(e)} (95%)")  # fmt: skip
                if not math.isnan(e.get("low", math.nan)):
                    lines = [at_pivot * (grid / pivot) ** e[b] for b in ("low", "high")]
                    ax.fill_between(grid, np.minimum(*lines), np.maximum(*lines),
                                    color=color, alpha=0.15)  # fmt: skip
        else:
            _note(ax, f"no N_opt ~ C^a fitted ({iso.get('status')})")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("training compute C (FLOPs)")
    ax.xaxis.set_minor_formatter("")  # decade labels only: minor labels overlap
    if not ok:  # nothing plotted: no scale to read (after set_xscale, which resets ticks)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.minorticks_off()
    ax.set_ylabel("compute-optimal N or D")
    ax.set_title("Compute-optimal model size and tokens")
    _decorate(ax, 8)


def predicted_vs_observed(
    rows: list[dict[str, Any]], fit: dict[str, Any], path: Path
) -> Path | None:
    """The parametric law's prediction of every point; held-out points predicted by the fit
    that did not see them."""
    par = fit.get("parametric", {})
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 5.5))
    if par.get("status") != "ok":
        _note(ax, f"no parametric law: {par.get('status', 'not fitted')}")
        return _save(plt, fig, path)
    preds = par["predictions"]
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
    if "rmse" in held:
        err = f"held-out error: max {held['max_relative_error']:.1%}, mean "
        err += f"{held['mean_relative_error']:.1%}"
        if not held["within_threshold"]:
            err += f" > {held['threshold']:.0%}: DOES NOT EXTRAPOLATE"
    else:
        err = "no held-out points"
    ax.set_title(f"{par['form']}\n{err}", fontsize=8)
    ax.set_xlabel(f"observed {_quantity(fit)}")
    ax.set_ylabel(f"predicted {_quantity(fit)}")
    if par.get("warning"):
        ax.text(0.02, 0.98, "not identifiable: " + ", ".join(
            k for k, v in par["constants"].items() if not v.get("identifiable", True)),
            transform=ax.transAxes, va="top", fontsize=7, color="darkred", wrap=True)  # fmt: skip
    _decorate(ax, 8)
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
    ax.set_ylabel(_quantity(fit))
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

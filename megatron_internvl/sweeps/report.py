"""The sweep's markdown report: what ran, the fitted laws with their intervals, the held-out
error, the IsoFLOP minima, and links to the figures."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

_FIGURE_TEXT = {
    "loss_vs_compute": "Loss vs training compute: one line per model size, the frontier "
    "(circled) and the fitted power law through it.",
    "isoflop": "IsoFLOP curves: at each compute budget, loss vs model size with the fitted "
    "parabola and its minimum; right, the compute-optimal N and D vs compute.",
    "predicted_vs_observed": "The parametric law L(N, D) against every point; held-out points "
    "(largest compute) are predicted by a fit that did not see them.",
    "loss_vs_lr": "Loss vs peak learning rate for each model and token count.",
}


def _e(e: dict[str, Any]) -> list[str]:
    """[value, 95% interval] cells; a constant the points cannot determine says so and why."""
    if not e.get("identifiable", True):
        return ["not identifiable", e.get("reason") or "-"]
    if math.isnan(e.get("low", math.nan)):
        return [f"{e['value']:.4g}", "-"]
    return [f"{e['value']:.4g}", f"{e['low']:.4g} – {e['high']:.4g}"]


def _agreement_lines(agreement: dict[str, Any]) -> list[str]:
    """The two estimates of N_opt's exponent side by side, and whether they agree."""
    status = agreement.get("status", "not compared")
    if status not in ("agree", "disagree"):
        return [f"N_opt's exponent, law vs minima: {status}."]
    both = (
        f"the parametric law implies a = {agreement['parametric']:.3g}, the IsoFLOP minima give "
        f"a = {agreement['isoflop']:.3g}"
    )
    if status == "agree":
        low, high = agreement["overlap"]
        return [f"N_opt's exponent, law vs minima: {both}; their 95% intervals overlap "
                f"({low:.3g} – {high:.3g}), so the two methods are consistent."]  # fmt: skip
    return [
        f"**Flag:** N_opt's exponent, law vs minima: {both}, and their 95% intervals do not "
        "overlap: the parametric form does not describe these points well enough to trust its "
        "compute-optimal exponents; prefer the IsoFLOP minima (model-free), or sample more "
        "sizes per budget."
    ]


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines


def write_report(
    sweep_name: str,
    rows: list[dict[str, Any]],
    fit: dict[str, Any],
    figures: dict[str, Path],
    path: Path,
) -> Path:
    """Write <sweep>/report.md; figure links are relative to it."""
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    lines = [
        f"# Scaling-law sweep `{sweep_name}`",
        "",
        f"Points: {len(rows)} ("
        + ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
        + f"). Fitted quantity: **{fit.get('quantity', fit['loss'])}** (`{fit['loss']}`); "
        f"N: {fit.get('params_name', 'non-embedding parameters')}. Table: "
        "[results.csv](results.csv); every constant: [fit.json](fit.json).",
        "",
        *([f"**Note:** {fit['loss_note']}.", ""] if fit.get("loss_note") else []),
        "Compute C is the model FLOPs of training (training/flops.py, the MFU formula): ViT and "
        "projector once per image tile, LLM over every packed token, x3 for forward + backward. "
        f"N is {fit.get('params_name', 'non-embedding parameters')}, D the LLM "
        "tokens trained on. Intervals are bootstrap 95% ranges; a constant the points cannot "
        "determine (at a bound, a degenerate or huge interval, a negligible term) is reported "
        "as not identifiable, with the reason.",
        "",
    ]
    law = fit.get("compute_law", {})
    lines.append("## Loss vs compute")
    if law.get("status") == "ok":
        lines += _table(
            ["constant", "value", "95% interval"],
            [["A", *_e(law["A"])], ["alpha", *_e(law["alpha"])]],
        )
        lines.append(f"\n`{law['form']}`, fitted to {len(law['frontier'])} frontier points.")
    else:
        lines.append(law.get("status", "not fitted"))
    lines.append("")

    par = fit.get("parametric", {})
    lines.append("## Parametric law")
    if par.get("status") == "ok":
        lines.append(f"`{par['form']}` over {par['n_points']} points.\n")
        lines += _table(
            ["constant", "value", "95% interval"],
            [[name, *_e(value)] for name, value in par["constants"].items()],
        )
        if par.get("warning"):
            lines.append(f"\n**Warning:** {par['warning']}.")
        held = par["heldout"]
        if held.get("n_points"):
            lines.append(
                f"\nHeld out: the {held['n_points']} largest-compute points, predicted by the fit "
                f"on the others: RMSE {held['rmse']:.4g}, mean relative error "
                f"{held['mean_relative_error']:.2%}, max {held['max_relative_error']:.2%}. Fit "
                f"RMSE on all points: {par['train_rmse']:.4g}."
            )
            if not held["within_threshold"]:
                lines.append(
                    f"\n**Flag:** held-out error {held['max_relative_error']:.1%} is above "
                    f"{held['threshold']:.0%}: this law does not extrapolate from these points."
                )
        else:
            lines.append(f"\nHeld-out error: {held.get('note', 'none')}.")
        if "a_N_opt" in par["constants"]:
            lines.append(
                "\n`a_N_opt` and `b_D_opt` are the compute-optimal exponents the law implies "
                "(N_opt ∝ C^a, D_opt ∝ C^b under C ≈ 6ND)."
            )
    else:
        lines.append(par.get("status", "not fitted"))
    lines.append("")

    iso = fit.get("isoflop")
    if iso:
        lines.append("## IsoFLOP minima")
        lines += _table(
            ["budget (FLOPs)", "points", "N_opt", "D_opt", "L_min", "status"],
            [
                [
                    f"{e['budget']:.3g}",
                    e["n_points"],
                    f"{e['N_opt']:.4g}" if "N_opt" in e else "-",
                    f"{e['D_opt']:.4g}" if "D_opt" in e else "-",
                    f"{e['L_min']:.4g}" if "L_min" in e else "-",
                    e["status"],
                ]
                for e in iso["budgets"]
            ],
        )
        if iso.get("status") == "ok":
            lines.append("")
            lines += _table(
                ["law", "exponent", "95% interval", "coefficient"],
                [
                    ["N_opt = k_N C^a", *_e(iso["a_N_opt"]), f"{iso['k_N']['value']:.4g}"],
                    ["D_opt = k_D C^b", *_e(iso["b_D_opt"]), f"{iso['k_D']['value']:.4g}"],
                ],
            )
        else:
            lines.append(f"\n{iso.get('status')}")
        lines += ["", *_agreement_lines(fit.get("agreement", {})), ""]

    lines.append("## Figures")
    for name, figure in figures.items():
        rel = figure.relative_to(path.parent)
        lines += [
            "",
            f"**{name.replace('_', ' ')}**: {_FIGURE_TEXT[name]}",
            "",
            f"![{name}]({rel})",
        ]
    failed = [r["id"] for r in rows if r["status"] != "done"]
    if failed:
        lines += ["", "## Points not in the fits", ""]
        lines += [f"- `{i}`: {next(r['status'] for r in rows if r['id'] == i)}" for i in failed]
    path.write_text("\n".join(lines) + "\n")
    return path

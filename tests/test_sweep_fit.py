"""The scaling-law fits recover the constants that generated synthetic losses (parametric L(N, D),
split vision/language N, the compute frontier, IsoFLOP minima), with honest intervals and
held-out error."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from megatron_internvl.sweeps.fit import (
    fit_compute_law,
    fit_parametric,
    fit_sweep,
    frontier,
    isoflop_minima,
)

# Hoffmann et al. (2022)'s fitted constants: a realistic, strongly correlated problem.
E, A, ALPHA, B, BETA = 1.69, 406.4, 0.34, 410.7, 0.28


def _law(n, d):
    return E + A / n**ALPHA + B / d**BETA


def _grid(noise: float, seed: int = 0):
    n, d = np.meshgrid(np.logspace(7, 10, 6), np.logspace(9, 12, 6))
    n, d = n.ravel(), d.ravel()
    rng = np.random.default_rng(seed)
    return n, d, _law(n, d) * np.exp(rng.normal(0, noise, n.size))


def test_noise_free_losses_give_back_every_constant():
    n, d, loss = _grid(noise=0.0)
    fit = fit_parametric(np.c_[n, d], loss, ["N", "D"], 6 * n * d, bootstrap=0)
    got = {k: v["value"] for k, v in fit["constants"].items()}
    for name, true in (("E", E), ("A_N", A), ("alpha_N", ALPHA), ("A_D", B), ("alpha_D", BETA)):
        assert got[name] == pytest.approx(true, rel=0.01), name
    assert got["a_N_opt"] == pytest.approx(BETA / (ALPHA + BETA), rel=0.01)
    assert fit["heldout"]["mean_relative_error"] < 1e-4


def test_noisy_losses_give_constants_inside_their_bootstrap_intervals():
    n, d, loss = _grid(noise=0.003, seed=1)
    fit = fit_parametric(np.c_[n, d], loss, ["N", "D"], 6 * n * d, bootstrap=60, seed=0)
    c = fit["constants"]
    assert c["E"]["value"] == pytest.approx(E, rel=0.03)
    assert c["alpha_N"]["value"] == pytest.approx(ALPHA, abs=0.03)
    assert c["alpha_D"]["value"] == pytest.approx(BETA, abs=0.03)
    for name, true in (("E", E), ("alpha_N", ALPHA), ("alpha_D", BETA)):
        assert c[name]["low"] <= true <= c[name]["high"], (name, c[name])
        assert c[name]["high"] - c[name]["low"] < 0.2 * true  # an interval, not a shrug
    held = fit["heldout"]  # the 7 largest-compute points, predicted by a fit without them
    assert held["n_points"] == 7
    assert held["mean_relative_error"] < 0.01
    assert "warning" not in fit


def test_split_vision_and_language_parameters_are_recovered():
    nv, nl, d = (v.ravel() for v in np.meshgrid(*(np.logspace(lo, lo + 3, 4) for lo in (6, 7, 9))))
    loss = 1.5 + 50 / nv**0.3 + A / nl**ALPHA + B / d**BETA
    fit = fit_parametric(np.c_[nv, nl, d], loss, ["Nv", "Nl", "D"], bootstrap=0, holdout_fraction=0)
    got = {k: v["value"] for k, v in fit["constants"].items()}
    assert got["alpha_Nv"] == pytest.approx(0.3, abs=0.01)
    assert got["alpha_Nl"] == pytest.approx(ALPHA, abs=0.01)
    assert got["alpha_D"] == pytest.approx(BETA, abs=0.01)
    assert got["E"] == pytest.approx(1.5, rel=0.01)


def test_compute_law_is_fitted_on_the_frontier_only():
    c = np.logspace(15, 20, 8)
    best = 3e3 * c**-0.15
    rng = np.random.default_rng(2)
    dominated = best * 1.3  # the same budgets, worse models: must not pull the fit
    fit = fit_compute_law(
        np.r_[c, c], np.r_[best * np.exp(rng.normal(0, 0.002, c.size)), dominated], 100
    )
    assert sorted(fit["frontier"]) == list(range(8))
    assert fit["alpha"]["value"] == pytest.approx(0.15, abs=0.005)
    assert fit["alpha"]["low"] <= 0.15 <= fit["alpha"]["high"]
    assert list(frontier(np.array([1.0, 2.0, 3.0]), np.array([5.0, 6.0, 4.0]))) == [0, 2]
    # Points of one budget whose compute differs by a step's worth: one frontier point, its best.
    compute = np.array([1.0, 1.004, 1.008, 2.0, 2.01, 4.0])
    loss = np.array([5.0, 4.8, 4.9, 4.0, 4.2, 4.5])
    assert list(frontier(compute, loss)) == [1, 3]


def test_isoflop_minima_follow_the_laws_compute_optimal_exponent():
    # Under C = 6ND the law's optimum is N_opt = G (C/6)^(beta/(alpha+beta)).
    g = (ALPHA * A / (BETA * B)) ** (1 / (ALPHA + BETA))
    a_true = BETA / (ALPHA + BETA)
    budgets, n_all, d_all, loss, compute = [], [], [], [], []
    for c in (1e18, 1e19, 1e20, 1e21):
        n_opt = g * (c / 6) ** a_true
        for n in n_opt * np.logspace(-0.6, 0.6, 7):
            d = c / (6 * n)
            budgets.append(c), n_all.append(n), d_all.append(d)
            loss.append(_law(n, d)), compute.append(c)
    iso = isoflop_minima(budgets, n_all, d_all, loss, compute, bootstrap=50)
    assert iso["status"] == "ok"
    assert iso["a_N_opt"]["value"] == pytest.approx(a_true, abs=0.02)
    assert iso["b_D_opt"]["value"] == pytest.approx(1 - a_true, abs=0.02)
    for entry in iso["budgets"]:
        n_opt = g * (entry["budget"] / 6) ** a_true
        assert entry["N_opt"] == pytest.approx(n_opt, rel=0.1)
        assert entry["N_opt"] * entry["D_opt"] * 6 == pytest.approx(entry["budget"], rel=0.01)


def test_too_few_points_or_edge_minima_are_refused_not_invented():
    n, d, loss = _grid(noise=0.0)
    few = fit_parametric(np.c_[n[:5], d[:5]], loss[:5], ["N", "D"])
    assert few["status"].startswith("skipped: 5 points for 5 constants")
    # Loss still falling at the largest size: the parabola's vertex lies outside the sizes.
    sizes = np.array([1e6, 2e6, 4e6])
    iso = isoflop_minima([1e18] * 3, sizes, 1e18 / (6 * sizes), [3.0, 2.5, 2.2], [1e18] * 3)
    assert iso["budgets"][0]["status"].startswith("skipped")
    assert iso["status"].startswith("no law")


def test_fit_sweep_uses_only_finished_points_and_splits_n_when_both_towers_vary():
    n, d, loss = _grid(noise=0.0)
    rows = [
        {
            "id": f"p{i}",
            "status": "done",
            "smoothed_loss": float(loss[i]),
            "flops": 6 * n[i] * d[i],
            "N": n[i],
            "tokens": d[i],
            "n_vision": 1.0,
            "n_language": n[i],
            "vit_layers": 2,
            "vit_hidden": 32,
            "llm_layers": i,
            "llm_hidden": 64,
            "budget": None,
        }
        for i in range(len(n))
    ]
    rows.append(dict(rows[0], id="broken", status="failed", smoothed_loss=0.01))
    out = fit_sweep(rows, bootstrap=0)
    assert "broken" not in out["ids"] and len(out["ids"]) == len(n)
    assert out["parametric"]["form"] == "L = E + A_N / N^alpha_N + A_D / D^alpha_D"
    assert out["parametric"]["constants"]["alpha_N"]["value"] == pytest.approx(ALPHA, rel=0.01)
    # Both towers change shape: N splits into N_v and N_l (7 constants, so 6 points are short).
    rows = rows[:6]
    for i, r in enumerate(rows):
        r["vit_layers"] = 2 + i % 2
    split = fit_sweep(rows, bootstrap=0)["parametric"]
    assert split["status"] == "skipped: 6 points for 7 constants, need 8"


def test_constants_the_points_cannot_determine_are_reported_as_such_without_warnings():
    """No loss floor (E = 0) and a size term that changes nothing: E, A_N and alpha_N are
    flagged with the reason, not printed as results; fitting raises no numerical warnings."""
    n, d = (v.ravel() for v in np.meshgrid(np.logspace(4, 6, 5), np.logspace(5, 8, 5)))
    rng = np.random.default_rng(3)
    loss = 300 / d**0.4 * np.exp(rng.normal(0, 0.002, n.size))  # no E, no N dependence
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # overflow, invalid value, ...: a test failure
        fit = fit_parametric(np.c_[n, d], loss, ["N", "D"], 6 * n * d, bootstrap=30)
    c = fit["constants"]
    assert not c["E"]["identifiable"] and "no loss floor" in c["E"]["reason"]
    assert not c["A_N"]["identifiable"] and not c["alpha_N"]["identifiable"]
    assert not c["a_N_opt"]["identifiable"]  # derived from alpha_N
    assert c["alpha_D"]["identifiable"] and c["alpha_D"]["value"] == pytest.approx(0.4, abs=0.02)
    assert "not identifiable" in fit["warning"]


def test_held_out_error_above_the_threshold_is_flagged():
    n, d, loss = _grid(noise=0.0)
    bent = loss * np.where(6 * n * d >= np.sort(6 * n * d)[-7], 1.3, 1.0)  # the law breaks
    fit = fit_parametric(np.c_[n, d], bent, ["N", "D"], 6 * n * d, bootstrap=0)
    assert fit["heldout"]["max_relative_error"] > 0.05
    assert fit["heldout"]["within_threshold"] is False
    clean = fit_parametric(np.c_[n, d], loss, ["N", "D"], 6 * n * d, bootstrap=0)
    assert clean["heldout"]["within_threshold"] is True


def test_sweeps_fit_validation_loss_when_every_point_has_one_and_say_which():
    n, d, loss = _grid(noise=0.0)
    rows = [
        {"id": f"p{i}", "status": "done", "smoothed_loss": float(loss[i]) + 1.0,
         "valid_loss": float(loss[i]), "flops": 6 * n[i] * d[i], "N": n[i], "tokens": d[i],
         "vit_layers": 2, "vit_hidden": 32, "llm_layers": i, "llm_hidden": 64, "budget": None}
        for i in range(len(n))
    ]  # fmt: skip
    valid = fit_sweep(rows, bootstrap=0)
    assert (valid["loss"], valid["quantity"]) == ("valid_loss", "validation loss")
    assert "loss_note" not in valid
    assert valid["parametric"]["constants"]["E"]["value"] == pytest.approx(E, rel=0.01)
    rows[0] = {k: v for k, v in rows[0].items() if k != "valid_loss"}
    train = fit_sweep(rows, bootstrap=0)
    assert (train["loss"], train["quantity"]) == ("smoothed_loss", "training loss (smoothed)")
    assert "valid/loss" in train["loss_note"]


def _isoflop_rows(noise: float) -> list[dict]:
    """IsoFLOP points of the law: 7 sizes around the optimum at each of 4 budgets."""
    g = (ALPHA * A / (BETA * B)) ** (1 / (ALPHA + BETA))
    rng, rows = np.random.default_rng(1), []
    for c in (1e18, 1e19, 1e20, 1e21):
        for n in g * (c / 6) ** (BETA / (ALPHA + BETA)) * np.logspace(-0.6, 0.6, 7):
            d = c / (6 * n)
            rows.append(
                {"id": f"p{len(rows)}", "status": "done", "flops": c, "budget": c, "N": n,
                 "tokens": d, "smoothed_loss": float(_law(n, d) * np.exp(rng.normal(0, noise))),
                 "vit_layers": 2, "vit_hidden": 32, "llm_layers": len(rows), "llm_hidden": 64}
            )  # fmt: skip
    return rows


def test_the_two_exponent_estimates_are_compared_and_a_disagreement_flagged(tmp_path):
    from megatron_internvl.sweeps.fit import exponent_agreement
    from megatron_internvl.sweeps.report import write_report

    fit = fit_sweep(_isoflop_rows(noise=0.002), bootstrap=30)
    agreement = fit["agreement"]
    assert agreement["status"] == "agree", agreement
    a_true = BETA / (ALPHA + BETA)
    assert agreement["parametric"] == pytest.approx(a_true, abs=0.03)
    assert agreement["isoflop"] == pytest.approx(a_true, abs=0.03)
    low, high = agreement["overlap"]
    assert low <= high
    report = write_report("s", [], fit, {}, tmp_path / "report.md").read_text()
    assert "their 95% intervals overlap" in report and "**Flag:** N_opt" not in report
    # Intervals that do not overlap (what a law whose form misses the points gives) are flagged.
    parametric = {"constants": {"a_N_opt": {"value": 0.78, "low": 0.44, "high": 0.91}}}
    isoflop = {"status": "ok", "a_N_opt": {"value": 0.21, "low": -0.3, "high": 0.4}}
    apart = exponent_agreement(parametric, isoflop)
    assert apart["status"] == "disagree" and apart["overlap"] is None
    fit["agreement"] = apart
    flagged = write_report("s", [], fit, {}, tmp_path / "flagged.md").read_text()
    assert "**Flag:** N_opt's exponent, law vs minima" in flagged
    no_boot = exponent_agreement(
        {"constants": {"a_N_opt": {"value": 0.5, "low": float("nan"), "high": float("nan")}}},
        isoflop,
    )
    assert no_boot["status"].startswith("not comparable")

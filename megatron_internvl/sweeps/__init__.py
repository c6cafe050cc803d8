"""Scaling-law sweeps: declare (recipes/sweep/), plan, launch, collect, fit, plot, report.

config (the sweep schema) -> grid / isoflop + families (points from a registry flavour) -> plan
(validated training overrides per point) -> multirun (a Hydra multirun: the `scaling_law`
sweeper and `megatron_internvl` launcher plugins in hydra_plugins/, app.py its entry) -> launch
(local subprocesses or a Slurm array, one task per point, DONE markers) -> point (a point's
training run) -> collect (TensorBoard events -> results.csv / .parquet) -> fit -> plots ->
report. tools/sweep.py is the command line (commands.py).
"""

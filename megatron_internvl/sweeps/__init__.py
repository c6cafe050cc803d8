"""Scaling-law sweeps: declare (recipes/sweep/), plan, launch, collect, fit, plot, report.

config (the sweep schema) -> grid / isoflop + families (points from a registry flavour) -> plan
(validated training overrides per point) -> launch (local subprocesses or a Slurm array, one
task per point, DONE markers) -> point (a point's training run) -> collect (TensorBoard events ->
results.csv) -> fit -> plots -> report. tools/sweep.py is the command line (commands.py).
"""

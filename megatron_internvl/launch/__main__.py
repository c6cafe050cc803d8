"""`python -m megatron_internvl.launch recipe=<name> cluster=<name> [overrides] [--dry-run]`.

Composes the recipe (with the cluster group from recipes/cluster/), checks that the layout fits
the allocation (TP x PP x CP x DP = nodes x GPUs per node, batch, memory), renders the sbatch
script under <output_dir>/<name>/slurm/ and submits it; --dry-run prints it instead.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    from megatron_internvl.config.cli import report_user_errors

    return report_user_errors(lambda: _main(list(sys.argv[1:] if argv is None else argv)))


def _main(args: list[str]) -> int:
    dry_run = "--dry-run" in args
    argv = [a for a in args if a != "--dry-run"]

    from megatron_internvl.config import cli
    from megatron_internvl.config.validate import validate
    from megatron_internvl.launch import slurm
    from megatron_internvl.training.loop import resolved_spec, run_dir

    parsed = cli.parse_args(argv)  # Hydra's flags (--help, --cfg job, --info) and overrides
    overrides = parsed.overrides
    cfg = cli.compose_run_config(overrides)
    if cli.wants_hydra_report(parsed):
        cli.check_runnable(cfg)
        return cli.hydra_report(argv, "megatron_internvl.launch")
    cluster = slurm.cluster_config(dict(cfg.cluster))
    slurm.check_cluster(cluster)
    spec = resolved_spec(cfg)
    layout = validate(cfg, spec, cluster.tasks)
    dp = cluster.tasks // layout.model_parallel
    layout_text = (
        f"tp{layout.tensor} x pp{layout.pipeline} x cp{layout.context} x dp{dp} = "
        f"{cluster.tasks} ranks ({cluster.nodes} nodes x "
        f"{cluster.gpus_per_node or cluster.tasks_per_node} per node)"
    )
    out = run_dir(cfg).resolve()
    try:
        script = slurm.render(
            cfg.name, out, slurm.absolute_overrides(overrides, out), cluster, layout_text
        )
    except slurm.LaunchError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if dry_run:
        print(script)
        return 0
    path = out / "slurm" / f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}.sbatch"
    (out / "logs").mkdir(parents=True, exist_ok=True)  # Slurm opens --output before the script
    print(slurm.submit(script, Path(path)))
    print(f"script: {path}\nlogs: {out / 'logs'}\ntensorboard: {out / 'tensorboard'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

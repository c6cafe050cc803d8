"""Scaling-law sweeps: `python tools/sweep.py COMMAND SWEEP [hydra overrides] [options]`.

COMMAND: plan (print the points; with --write also plan.json and points/), launch (run the
points not done yet, as a Hydra multirun:
`python -m megatron_internvl.sweeps.app -m --config-name SWEEP ...`), collect (results.csv),
fit (fit.json), report (figures + report.md), run (launch, then report), status.
SWEEP: a recipe in recipes/sweep/ (e.g. cpu_mini); overrides as in Hydra, e.g.
`launch.jobs=2 output_dir=/tmp/sweeps budgets=[1e10,2e10]`.

  python tools/sweep.py run cpu_mini launch.jobs=2
  python tools/sweep.py launch isoflop launch.backend=slurm launch.cluster=h100_pyxis --dry-run
  python tools/sweep.py launch cpu_mini --only C1.5e10-vit2x32_llm4x64   # re-run one point
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

COMMANDS = ("plan", "launch", "collect", "fit", "report", "run", "status")


def main(argv: list[str] | None = None) -> int:
    from megatron_internvl.sweeps.config import SWEEP_RECIPES

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("command", choices=COMMANDS)
    recipes = ", ".join(sorted(p.stem for p in SWEEP_RECIPES.glob("*.yaml")))
    parser.add_argument("sweep", help=f"a recipe in recipes/sweep/: {recipes}")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of the sweep recipe")
    parser.add_argument("--only", action="append", help="run only this point (repeatable)")
    parser.add_argument("--force", action="store_true", help="re-run points already done")
    parser.add_argument("--dry-run", action="store_true", help="print what would run")
    parser.add_argument(
        "--write", action="store_true", help="plan: also write plan.json and points/<id>/"
    )
    args = parser.parse_args(argv)

    from megatron_internvl.config.validate import RecipeError
    from megatron_internvl.sweeps import commands
    from megatron_internvl.sweeps.config import SweepError, compose_sweep

    try:
        cfg = compose_sweep(args.sweep, args.overrides)
        if args.command == "plan":
            result = commands.plan(cfg, write=args.write)
            print(commands.describe(result))
            if args.write:
                print(f"plan -> {result.sweep_dir / 'plan.json'}")
            return 0
        code = 0
        if args.command in ("launch", "run"):
            code = commands.launch(args.sweep, args.overrides, args.only, args.force, args.dry_run)
            if args.command == "launch" or args.dry_run:
                return code
        if args.command == "status":
            print("\n".join(commands.status_lines(cfg)))
        elif args.command == "collect":
            rows = commands.collect(cfg)
            print(f"{len(rows)} points -> {Path(cfg.output_dir) / cfg.name / 'results.csv'}")
        elif args.command == "fit":
            commands.fit(cfg)
            print(f"fit -> {Path(cfg.output_dir) / cfg.name / commands.FIT_FILE}")
        else:  # report, run
            print(f"report -> {commands.report(cfg)}")
        return code
    except (SweepError, RecipeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

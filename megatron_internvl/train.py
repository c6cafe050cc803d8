"""Entry point: `python -m megatron_internvl.train recipe=<name> [overrides]` under torchrun/srun.

Hydra composes `recipes/config.yaml` + the named recipe + command-line overrides; the result is
validated into `RunConfig` and handed to the training loop. Hydra's own working-directory and
logging changes are off: the run directory is <output_dir>/<name>, the same on every rank.
Hydra's flags work as in any Hydra app: `--help`, `--cfg job` (the composed, validated config),
`--info`. Configuration, data and checkpoint mistakes end with one line on rank 0 and exit
code 2; a crash under torchrun records its traceback for torchrun's failure report.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager

from megatron_internvl.resources import RECIPES


@contextmanager
def _beside_a_running_hydra() -> Iterator[None]:
    """Hydra allows one initialised instance per process; a Hydra app that composes training
    configs (the sweep multirun plans its points) parks its own while `compose` runs."""
    from hydra.core.global_hydra import GlobalHydra

    running = GlobalHydra.instance()
    parked = running.hydra
    running.clear()
    try:
        yield
    finally:
        running.hydra = parked


def compose(overrides: list[str]):
    """The composed config for these overrides (also used by the launcher and tests)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.config_store import ConfigStore

    from megatron_internvl.config.schema import RunConfig

    # The schema is the base of every recipe: unknown keys and wrong types fail at compose.
    ConfigStore.instance().store(name="run_schema", node=RunConfig)
    with _beside_a_running_hydra(), initialize_config_dir(str(RECIPES), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=overrides)


def main(argv: list[str] | None = None) -> int:
    from megatron_internvl.config.cli import report_user_errors

    def entry() -> int:
        return report_user_errors(lambda: _main(list(sys.argv[1:] if argv is None else argv)))

    if "TORCHELASTIC_ERROR_FILE" in os.environ:  # under torchrun: a crash's traceback goes to
        from torch.distributed.elastic.multiprocessing.errors import record  # its report

        return record(entry)() or 0
    return entry()


def _main(argv: list[str]) -> int:
    from megatron_internvl.config import cli
    from megatron_internvl.training.run_dir import RunAlreadyComplete

    args = cli.parse_args(argv)
    if args.multirun:
        raise cli.ConfigError(
            "the training entry runs one configuration; sweeps run through tools/sweep.py"
        )
    cfg = cli.compose_run_config(args.overrides)
    if cli.wants_hydra_report(args):
        cli.check_runnable(cfg)
        return cli.hydra_report(argv, "megatron_internvl.train")
    from megatron_internvl.training.loop import train

    try:
        return train(cfg)
    except RunAlreadyComplete as done:
        if os.environ.get("RANK", "0") == "0":
            print(done, flush=True)
        return 0


if __name__ == "__main__":
    sys.exit(main())

"""Hydra's command-line conventions for the training and launch entries.

`--help`, `--hydra-help`, `--cfg job|hydra|all [--resolve] [--package]` and `--info` are answered
by Hydra itself, after the composed config has been validated (so `--cfg job` shows a config that
would run); a mistyped recipe, cluster or key is one line naming the closest matches. Mistakes a
user can fix (configuration and data errors) end the process with one line on rank 0 and exit
code 2; anything else keeps its traceback.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from collections.abc import Callable
from typing import Any

from megatron_internvl.config.errors import ConfigError, explain_composition_error, schema_keys

USER_ERROR_EXIT_CODE = 2
# Errors raised identically on every rank from the config and the files (never from one rank's
# state), so rank 0 alone can report them. Data and checkpoint errors are matched by name so that
# their packages' own classes (e.g. a `...DataError`, `UnsafeCheckpointError`, the agreed
# `CheckpointError` of a resume) need not import this module.
_USER_ERRORS = re.compile(r"(Config|Recipe|Launch|Conversion|Data|Dataset|Checkpoint)Error$")
# The other ranks leave this long after rank 0 has said what is wrong: a launcher that stops
# every rank when the first one exits then never stops rank 0 before its line is out.
_QUIET_RANKS_LINGER_S = 5.0


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Hydra's own argument parser (flags + overrides); bad flags exit 2 with its usage line."""
    from hydra._internal.utils import get_args_parser

    return get_args_parser().parse_args(argv)


def wants_hydra_report(args: argparse.Namespace) -> bool:
    """Help, config or info: Hydra prints it and nothing runs."""
    return bool(args.help or args.hydra_help or args.cfg or args.info or args.shell_completion)


def compose_run_config(overrides: list[str]) -> Any:
    """The validated-by-schema RunConfig for these overrides; ConfigError in one line if not."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from megatron_internvl.config.schema import RunConfig, load_run_config
    from megatron_internvl.train import compose

    try:
        return load_run_config(compose(overrides))
    except (HydraException, OmegaConfBaseException) as error:
        raise explain_composition_error(error, schema_keys(RunConfig)) from None
    except ValueError as error:  # Hydra's parser reads `stage=1` as the number 1, not a name
        if "Config group override" not in str(error):
            raise
        raise ConfigError(
            f"{error}: a config group option that reads as a number needs quotes, e.g. "
            "stage=\"'1'\" (or choose the stage by its recipe: recipe=<scale>_stage1)"
        ) from None


def check_runnable(cfg: Any, world_size: int | None = None) -> None:
    """Layout, batch and memory checks at `world_size` ranks (default: the recipe's own GPU count,
    or the launcher's WORLD_SIZE). Data paths a recipe leaves to the user (data.shards,
    data.tokenizer) are not required here: `--cfg job` shows them empty."""
    import dataclasses

    from megatron_internvl.config.validate import validate
    from megatron_internvl.training.loop import resolved_spec

    data = dataclasses.replace(
        cfg.data,
        shards=cfg.data.shards or ["<data.shards>"],
        tokenizer=cfg.data.tokenizer or "<data.tokenizer>",
    )
    cfg = dataclasses.replace(cfg, data=data)

    world = world_size or cfg.parallel.gpus or int(os.environ.get("WORLD_SIZE", "1"))
    try:
        spec = resolved_spec(cfg)
    except KeyError as error:  # unknown flavour: get_spec lists the known ones
        raise ConfigError(f"model.flavour: {error.args[0]}") from None
    except FileNotFoundError as error:
        raise ConfigError(f"model.spec_file: no such file {error.filename}") from None
    validate(cfg, spec, world)


def hydra_report(argv: list[str], app_name: str) -> int:
    """Let Hydra answer --help / --cfg / --info for `argv` (validated first by the caller)."""
    import hydra

    from megatron_internvl.resources import RECIPES

    def nothing_to_run(_: Any) -> None:
        return None

    saved = sys.argv
    sys.argv = [app_name, f"hydra.help.app_name={app_name}", *argv]
    try:
        hydra.main(version_base="1.3", config_path=str(RECIPES), config_name="config")(
            nothing_to_run
        )()
    finally:
        sys.argv = saved
    return 0


def is_user_error(error: BaseException) -> bool:
    return any(_USER_ERRORS.search(cls.__name__) for cls in type(error).__mro__)


def report_user_errors(run: Callable[[], int]) -> int:
    """Run the entry point; a user error becomes one line on rank 0 and exit code 2."""
    try:
        return run()
    except Exception as error:
        if not is_user_error(error):
            raise
        if os.environ.get("RANK", "0") == "0":
            print(f"error: {' '.join(str(error).split())}", file=sys.stderr, flush=True)
        else:
            time.sleep(_QUIET_RANKS_LINGER_S)
        return USER_ERROR_EXIT_CODE

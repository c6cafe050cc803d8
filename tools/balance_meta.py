"""Build the balancing side files of a run's shards ahead of training (`data.balance=true`).

Usage:
  python tools/balance_meta.py recipe=<name> data.shards=[...] data.tokenizer=... [overrides]
      [--part K/N]

`data.balance` deals each step's samples by their tiles and tokens, read from a side file per
shard (`<shard>.meta-<fingerprint>.json`, megatron_internvl/data/sample_meta.py). A training run
builds missing ones at start (each rank from its own shard on, so ranks share the work), but on
a large dataset that is start-up time on every GPU. This tool builds them beforehand with the
run's own settings (the same overrides as the training command, so the same fingerprint): one
line per shard with its samples and the unusable ones, then a summary. `--part K/N` builds only
shards K, K+N, K+2N, ... (K from 0): run N copies (e.g. a Slurm array) to split the work; side
files already there are read, not rebuilt. Exit status: 0 done, 2 could not run.
"""

from __future__ import annotations

import sys
import time
import warnings


def _part(argv: list[str]) -> tuple[tuple[int, int], list[str]]:
    """(K, N) from `--part K/N` (default 0/1) and the remaining arguments (the overrides)."""
    from megatron_internvl.config.errors import ConfigError

    rest, part = [], (0, 1)
    args = iter(argv)
    for arg in args:
        if arg == "--part" or arg.startswith("--part="):
            value = arg.split("=", 1)[1] if "=" in arg else next(args, "")
            k, _, n = value.partition("/")
            if not (k.isdigit() and n.isdigit() and 0 <= int(k) < int(n)):
                raise ConfigError(f"--part {value!r}: use K/N with 0 <= K < N, e.g. --part 0/8")
            part = (int(k), int(n))
        elif arg.startswith("--"):
            raise ConfigError(f"unknown option {arg}; options: --part K/N (the rest: overrides)")
        else:
            rest.append(arg)
    return part, rest


def build(argv: list[str]) -> int:
    from megatron_internvl.config import cli
    from megatron_internvl.data.balanced import meta_settings, shard_jobs
    from megatron_internvl.data.sample_meta import shard_meta
    from megatron_internvl.training.build_data import (
        fit_spec_to_tokenizer,
        load_tokenizer,
        loader_config,
        shard_datasets,
    )
    from megatron_internvl.training.build_model import resolved_spec

    (k, n), overrides = _part(argv)
    cfg = cli.compose_run_config(overrides)
    if cfg.data.source != "shards" or not cfg.data.shards:
        raise cli.ConfigError("balance_meta: set data.source=shards and data.shards=[...]")
    tokenizer = load_tokenizer(cfg)
    settings = loader_config(cfg, fit_spec_to_tokenizer(resolved_spec(cfg), tokenizer))
    datasets = shard_datasets(cfg)
    jobs = shard_jobs(datasets)[k::n]
    samples = unusable = 0
    start = time.perf_counter()
    for done, (d, _, shard) in enumerate(jobs, 1):
        measured = shard_meta(shard, meta_settings(settings, datasets[d]), tokenizer)
        bad = sum(isinstance(m, str) for m in measured)
        samples, unusable = samples + len(measured), unusable + bad
        print(f"balance_meta: [{done}/{len(jobs)}] {shard}: {len(measured)} samples, "
              f"{bad} unusable", flush=True)  # fmt: skip
    print(
        f"balance_meta: {len(jobs)} shards (part {k}/{n}), {samples} samples, {unusable} "
        f"unusable, {time.perf_counter() - start:.1f} s"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    warnings.filterwarnings("ignore")  # Megatron's "TE/apex not installed" notes at import
    from megatron_internvl.config.cli import report_user_errors

    if argv is None:
        argv = sys.argv[1:]
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    return report_user_errors(lambda: build(argv))


if __name__ == "__main__":
    sys.exit(main())

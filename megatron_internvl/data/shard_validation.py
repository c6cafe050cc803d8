"""Validating shards: every sample through the loader's parser (`samples.check_tar_sample`,
images fully decoded), every index against its tar; clean copies and index repair on request.

Writing is confined to what was asked: `clean_dir` must be a folder of its own (not holding an
input shard) and receives shards under the input names, so two inputs of the same name, or a
name already there, are refused before anything is written. `fix_index` rewrites an index only
for a tar that reads to its end and holds samples, and checks the result.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import webdataset as wds

from megatron_internvl.data.errors import BadSampleError, DataError
from megatron_internvl.data.samples import POLICY_REASONS, SampleConfig, check_tar_sample
from megatron_internvl.data.shard_builders import progress
from megatron_internvl.data.shard_index import (
    index_lines,
    index_path,
    read_index,
    split_member,
    write_index,
)
from megatron_internvl.data.shard_reader import iter_tar_samples


@dataclass
class ValidationReport:
    """Per-sample verdicts of `validate_shards`."""

    good: int = 0
    bad: dict[str, str] = field(default_factory=dict)
    """`<shard>:<key>` -> reason and detail."""
    reasons: Counter = field(default_factory=Counter)
    filtered: Counter = field(default_factory=Counter)
    """Samples the configuration leaves out (caption filters), by reason; not bad."""
    index_problems: dict[str, str] = field(default_factory=dict)
    """Shard path -> what is wrong with its index (missing, stale, unreadable, not fixable)."""
    written_indexes: list[Path] = field(default_factory=list)
    clean_shards: list[Path] = field(default_factory=list)

    def format(self) -> str:
        """A few lines for the console."""
        lines = [f"{self.good} good sample(s), {len(self.bad)} bad"]
        if self.reasons:
            lines[0] += " (" + ", ".join(f"{n} {r}" for r, n in sorted(self.reasons.items())) + ")"
        if self.filtered:
            lines.append(f"filtered: {dict(self.filtered)}")
        lines += [f"  {name}: {why}" for name, why in self.bad.items()]
        lines += [f"  {path}: index {why}" for path, why in self.index_problems.items()]
        if self.written_indexes:
            lines.append(f"wrote {len(self.written_indexes)} index file(s)")
        if self.clean_shards:
            lines.append(f"wrote {len(self.clean_shards)} clean shard(s)")
        return "\n".join(lines)


def check_clean_dir(paths: Sequence[str | os.PathLike], clean_dir: str | os.PathLike) -> Path:
    """`clean_dir`, resolved; `DataError` when writing there could touch an input or collide."""
    target = Path(clean_dir).resolve()
    inputs = [Path(p).resolve() for p in paths]
    if any(p.parent == target for p in inputs):
        raise DataError(
            f"validate: --clean-dir {clean_dir} holds input shards; give a new, separate folder"
        )
    names = Counter(p.name for p in inputs)
    twice = sorted(n for n, c in names.items() if c > 1)
    if twice:
        raise DataError(
            f"validate: several inputs are named {twice}; clean shards keep input names, so "
            "validate these folders one at a time into different --clean-dir folders"
        )
    present = sorted(n for n in names if (target / n).exists())
    if present:
        raise DataError(f"validate: {target} already holds {present}; give an empty folder")
    return target


def validate_shards(
    paths: Sequence[str | os.PathLike],
    clean_dir: str | os.PathLike | None = None,
    progress_bar: bool = False,
    on_bad: Callable[[str, str], None] | None = None,
    fix_index: bool = False,
    cfg: SampleConfig | None = None,
) -> ValidationReport:
    """Check every sample and index of `paths`; with `clean_dir`, write the good samples there.

    Clean shards keep the input names and the sample keys, with fresh indexes.
    """
    cfg = cfg or SampleConfig()
    target = check_clean_dir(paths, clean_dir) if clean_dir is not None else None
    report = ValidationReport()
    for path in progress(paths, len(paths), "validate", progress_bar, "shard"):
        good = _check_samples(Path(path), cfg, report, on_bad, keep=target is not None)
        _check_index(Path(path), fix_index, report)
        if target is not None and good:
            report.clean_shards.append(_write_clean(target / Path(path).name, good))
    return report


def _check_samples(
    path: Path,
    cfg: SampleConfig,
    report: ValidationReport,
    on_bad: Callable[[str, str], None] | None,
    keep: bool,
) -> list[tuple[str, dict[str, bytes]]]:
    good = []
    for key, members in iter_tar_samples(path, cfg.max_member_bytes):
        name = f"{path}:{key}"
        try:
            check_tar_sample(name, members, cfg)
        except BadSampleError as error:
            if error.reason in POLICY_REASONS:
                report.filtered[error.reason] += 1
                continue
            report.bad[name] = f"{error.reason}: {error.detail}"
            report.reasons[error.reason] += 1
            if on_bad is not None:
                on_bad(name, report.bad[name])
            continue
        report.good += 1
        if keep:
            good.append((key, members))
    return good


def _write_clean(target: Path, samples: list[tuple[str, dict[str, bytes]]]) -> Path:
    tmp = target.with_name(f".{target.name}.tmp")
    target.parent.mkdir(parents=True, exist_ok=True)
    with wds.TarWriter(str(tmp), mtime=0.0) as writer:
        for key, members in samples:
            writer.write({"__key__": key, **members})
    os.replace(tmp, target)
    write_index(target)
    return target


def index_problem(path: Path) -> str | None:
    """What is wrong with a shard's index, or None when it matches the tar exactly."""
    if not index_path(path).exists():
        return "missing"
    try:
        entries = read_index(path)
    except (DataError, OSError) as error:
        return f"unreadable ({error})"
    try:
        expected = index_lines(path)
    except ValueError:
        return None  # the tar itself is damaged; its samples are reported as bad
    listed = [(e.key, e.members) for e in entries]
    wanted = [(split_member(s[0][3])[0], {x: (o, n) for x, o, n, _ in s}) for s in expected]
    if listed != wanted:
        bad = sum(e.problem is not None for e in entries)
        return f"stale: lists {len(listed)} samples ({bad} unusable), the tar {len(wanted)}" + (
            "" if len(listed) != len(wanted) else " with other members or offsets"
        )
    return None


def _check_index(path: Path, fix: bool, report: ValidationReport) -> None:
    problem = index_problem(path)
    if problem is None:
        return
    if not fix:
        report.index_problems[str(path)] = problem
        return
    try:
        write_index(path)
    except (ValueError, OSError) as error:
        report.index_problems[str(path)] = f"{problem}; not rewritten: {error}"
        return
    after = index_problem(path)
    if after is not None:
        report.index_problems[str(path)] = f"{problem}; rewritten but still {after}"
        return
    report.written_indexes.append(index_path(path))

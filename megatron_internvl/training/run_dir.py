"""A run directory belongs to one run.

At first start rank 0 records the run's identity in `<run>/run.json`: the model shape (flavour
and the exact spec), the seed and the data, identified by content (each dataset's shard names
and sizes, not its path), so a moved shard folder still resumes and a changed one is refused
with what changed. `claim_run_dir` runs before anything is written (config.json, TensorBoard,
checkpoints) and refuses, in one line naming the directory and the ways out:
- a fresh start (`checkpoint.resume=false`) into a directory holding committed checkpoints;
- a run whose model, seed or data differ from the recorded ones (resume or not).
A run that already reached `train.steps` raises `RunAlreadyComplete` (exit 0, nothing written).
`checkpoint.overwrite=true` instead moves an existing run directory aside, to a sibling
`<name>.replaced-<UTC time>`, and starts afresh: nothing is ever deleted.
Rank 0 decides (and moves), then every rank acts on its decision.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

from megatron_internvl.config.errors import ConfigError
from megatron_internvl.config.schema import RunConfig
from megatron_internvl.models.registry import InternVLSpec, spec_to_dict

IDENTITY_FILE = "run.json"


class RunDirError(ConfigError):
    """This configuration cannot start or resume in this run directory."""


class RunAlreadyComplete(Exception):  # noqa: N818 (not an error: the run is done)
    """The run already reached train.steps: nothing to do."""


def shard_set_identity(path: str) -> dict[str, Any]:
    """A dataset by content: its shards' file names and sizes, and their fingerprint."""
    from megatron_internvl.data.loader import shard_list

    if not Path(path).exists():
        raise RunDirError(f"data.shards: no such directory {path}")
    if Path(path).is_dir() and not any(Path(path).glob("*.tar")):
        raise RunDirError(f"data.shards: no .tar shards in {path}")
    files = {Path(p).name: Path(p).stat().st_size for p in shard_list([path])}
    digest = hashlib.sha256(json.dumps(sorted(files.items())).encode()).hexdigest()[:16]
    return {"fingerprint": digest, "shards": files}


def shard_set_name(path: str) -> str:
    """A dataset's name for the loader's resume state: the same wherever the folder lives."""
    identity = shard_set_identity(path)
    return f"{len(identity['shards'])} shards {identity['fingerprint']}"


def run_identity(cfg: RunConfig, spec: InternVLSpec) -> dict[str, Any]:
    """What makes two configurations the same run."""
    if cfg.data.source == "shards":
        data: Any = [shard_set_identity(path) for path in cfg.data.shards]
    else:
        data = {"source": cfg.data.source, "text_vocab": cfg.data.synthetic_text_vocab}
    return {"flavour": spec.name, "spec": spec_to_dict(spec), "seed": cfg.train.seed, "data": data}


def _data_changes(recorded: Any, current: Any) -> str:
    if recorded == current:
        return ""
    if not (isinstance(recorded, list) and isinstance(current, list)):
        return f"data {recorded} -> {current}"
    if len(recorded) != len(current):
        return f"{len(recorded)} datasets -> {len(current)}"
    for i, (old, new) in enumerate(zip(recorded, current, strict=True)):
        before, after = old["shards"], new["shards"]
        removed = sorted(set(before) - set(after))
        added = sorted(set(after) - set(before))
        resized = sorted(n for n in set(before) & set(after) if before[n] != after[n])
        parts = [
            f"{label} {names[:3]}{'...' if len(names) > 3 else ''}"
            for label, names in (("missing", removed), ("new", added), ("resized", resized))
            if names
        ]
        if parts:
            return f"data.shards[{i}] changed since the run started: " + ", ".join(parts)
    return ""


def _difference(recorded: dict[str, Any], current: dict[str, Any]) -> str:
    """The first difference between two identities, said for a user ('' if the same run)."""
    if recorded["spec"] != current["spec"]:
        what = (
            f"model {recorded['flavour']}, this config builds {current['flavour']}"
            if recorded["flavour"] != current["flavour"]
            else f"model {recorded['flavour']} of another shape than this config's"
        )
        return f"it holds a run of {what}"
    if recorded["seed"] != current["seed"]:
        return f"it holds a run with train.seed={recorded['seed']}, this one has {current['seed']}"
    return _data_changes(recorded["data"], current["data"])


def _decide(cfg: RunConfig, spec: InternVLSpec) -> tuple[str, str, dict[str, Any] | None]:
    """('ok' | 'complete' | 'refuse', message, identity to record or None)."""
    from megatron_internvl.checkpoint.distributed import committed_steps

    out = Path(cfg.output_dir) / cfg.name
    steps = committed_steps(out / "checkpoints")
    ways_out = (
        "use another output_dir= or name= for a new run, or checkpoint.overwrite=true to move "
        f"{out} aside"
    )
    if steps and not cfg.checkpoint.resume:
        return (
            "refuse",
            f"{out} holds another run's checkpoints (latest step {steps[-1]}) and "
            f"checkpoint.resume=false would mix them with this run: resume it "
            f"(checkpoint.resume=true), or {ways_out}",
            None,
        )
    current = run_identity(cfg, spec)
    record = out / IDENTITY_FILE
    if record.is_file():
        difference = _difference(json.loads(record.read_text()), current)
        if difference:
            message = f"{out}: {difference}; resume it with its own settings, or {ways_out}"
            return "refuse", message, None
    if steps and steps[-1] >= cfg.train.steps:
        return (
            "complete",
            f"{out} already reached step {steps[-1]} (train.steps={cfg.train.steps}): nothing "
            "to do; raise train.steps to train further",
            None,
        )
    return "ok", "", None if record.is_file() else current


def _move_aside(out: Path) -> Path:
    """Rename a run directory to an unused sibling `<name>.replaced-<UTC time>[-N]`."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    aside = out.with_name(f"{out.name}.replaced-{stamp}")
    count = 1
    while aside.exists():
        aside, count = out.with_name(f"{out.name}.replaced-{stamp}-{count}"), count + 1
    out.rename(aside)
    return aside


def _replace(cfg: RunConfig, spec: InternVLSpec) -> tuple[str, str, dict[str, Any] | None]:
    """Rank 0, `checkpoint.overwrite=true`: move a non-empty run directory aside, start anew."""
    out = Path(cfg.output_dir) / cfg.name
    current = run_identity(cfg, spec)  # a bad data path is refused before anything moves
    if out.is_dir() and any(out.iterdir()):
        try:
            aside = _move_aside(out)
        except OSError as error:
            return "refuse", f"checkpoint.overwrite=true: cannot move {out} aside ({error})", None
        print(f"checkpoint.overwrite: moved the previous run {out} to {aside}", flush=True)
    return "ok", "", current


def _refusal_or(decide: Any, cfg: RunConfig, spec: InternVLSpec) -> tuple[str, str, Any]:
    """Rank 0's decision; its own RunDirError (e.g. a missing shard folder) goes to every rank."""
    try:
        return decide(cfg, spec)
    except RunDirError as error:
        return "refuse", str(error), None


def claim_run_dir(cfg: RunConfig, spec: InternVLSpec) -> None:
    """Collective: check the run directory before anything is written (see the module doc);
    rank 0 records the identity of a new run. Raises RunDirError or RunAlreadyComplete."""
    import torch.distributed as dist

    rank = dist.get_rank() if dist.is_initialized() else 0
    decide = _replace if cfg.checkpoint.overwrite else _decide
    # Rank 0 moves before it broadcasts: no rank looks at the directory before the move.
    decision: list[Any] = [_refusal_or(decide, cfg, spec) if rank == 0 else None]
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(decision, src=0)
    verdict, message, record = decision[0]
    if verdict == "refuse":
        raise RunDirError(message)
    if verdict == "complete":
        raise RunAlreadyComplete(message)
    if rank == 0 and record is not None:
        out = Path(cfg.output_dir) / cfg.name
        out.mkdir(parents=True, exist_ok=True)
        (out / IDENTITY_FILE).write_text(json.dumps(record, indent=1))

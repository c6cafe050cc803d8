"""Collect a sweep into one table: each point's parameters, FLOPs, tokens, parameter counts,
final / smoothed / minimum training loss, validation loss (the last `valid/loss` the run logged,
when it evaluates a held-out set) and status, read from the run's own TensorBoard event files
(with TensorBoard's reader) and saved config.json."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

from megatron_internvl.sweeps.launch import point_status
from megatron_internvl.sweeps.plan import read_points
from megatron_internvl.sweeps.point import DONE

LOSS_TAG = "train/loss"
VALID_TAG = "valid/loss"
RESULTS_FILE = "results.csv"
PARQUET_FILE = "results.parquet"

COLUMNS = [
    "id", "status", "model", "budget", "lr", "steps", "tokens", "flops",
    "vit_layers", "vit_hidden", "llm_layers", "llm_hidden",
    "vit_depth", "vit_width", "llm_depth", "llm_width",
    "n_vision", "n_language", "n_embedding", "N", "params_total",
    "seq_length", "global_batch", "last_step", "final_loss", "smoothed_loss", "min_loss",
    "valid_loss", "valid_step", "wall_s",
]  # fmt: skip
"""N = non-embedding parameters = n_vision (ViT + projector) + n_language (LLM without its
input embedding and output layer)."""
TEXT_COLUMNS = {"id", "status", "model"}
INTEGER_COLUMNS = {
    "steps", "tokens", "vit_layers", "vit_hidden", "llm_layers", "llm_hidden",
    "n_vision", "n_language", "n_embedding", "N", "params_total",
    "seq_length", "global_batch", "last_step", "valid_step",
}  # fmt: skip


def read_losses(tensorboard_dir: Path, tag: str = LOSS_TAG) -> dict[int, float]:
    """step -> value of `tag` from a run's event files; a step logged twice (a resumed run
    re-logs the steps after its checkpoint) keeps its latest value."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    if not tensorboard_dir.is_dir():
        return {}
    events = EventAccumulator(str(tensorboard_dir), size_guidance={"scalars": 0})  # keep all
    events.Reload()
    if tag not in events.Tags()["scalars"]:
        return {}
    return {e.step: e.value for e in events.Scalars(tag)}


def smoothed(values: list[float], weight: float) -> float:
    """The last value of TensorBoard's smoothing curve (debiased exponential moving average)."""
    average, debias = 0.0, 1.0
    for value in values:
        average = average * weight + (1 - weight) * value
        debias *= weight
    return average / (1 - debias)


def collect_point(point_dir: Path, point: dict[str, Any], smoothing: float) -> dict[str, Any]:
    params = point["params"]
    row: dict[str, Any] = {
        key: point[key]
        for key in (
            "id", "model", "budget", "lr", "steps", "tokens", "flops",
            "vit_layers", "vit_hidden", "llm_layers", "llm_hidden",
            "vit_depth", "vit_width", "llm_depth", "llm_width",
        )
    }  # fmt: skip
    row.update(
        status=point_status(point_dir),
        n_vision=params["vision"] + params["projector"],
        n_language=params["language"],
        n_embedding=params["language_embedding"],
        N=params["non_embedding"],
        params_total=params["total"],
    )
    config_path = point_dir / "config.json"
    if config_path.is_file():
        config = json.loads(config_path.read_text())
        row["seq_length"] = config["data"]["seq_length"]
        row["global_batch"] = config["train"]["global_batch"]
        if config["train"]["steps"] != point["steps"] or config["train"]["lr"] != point["lr"]:
            row["status"] = "mismatch"  # the run on disk is not this point's
    losses = read_losses(point_dir / "tensorboard")
    if losses:
        ordered = [losses[s] for s in sorted(losses)]
        finite = [v for v in ordered if math.isfinite(v)]
        row.update(
            last_step=max(losses),
            final_loss=ordered[-1],
            smoothed_loss=smoothed(finite, smoothing) if finite else math.nan,
            min_loss=min(finite) if finite else math.nan,
        )
    valid = read_losses(point_dir / "tensorboard", VALID_TAG)
    if valid:  # the last evaluation: after the final step when the run finished
        row.update(valid_step=max(valid), valid_loss=valid[max(valid)])
    if (point_dir / DONE).is_file():
        row["wall_s"] = json.loads((point_dir / DONE).read_text()).get("wall_s")
    return row


def collect(sweep: Path, smoothing: float = 0.6) -> list[dict[str, Any]]:
    """One row per planned point (in plan order), written to <sweep>/results.csv and
    <sweep>/results.parquet."""
    rows = [collect_point(sweep / "points" / p["id"], p, smoothing) for p in read_points(sweep)]
    write_table(rows, sweep / RESULTS_FILE)
    write_parquet(rows, sweep / PARQUET_FILE)
    return rows


def write_parquet(rows: list[dict[str, Any]], path: Path) -> None:
    """The same table as Parquet, typed per column (missing values are nulls)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    def kind(column: str) -> pa.DataType:
        if column in TEXT_COLUMNS:
            return pa.string()
        return pa.int64() if column in INTEGER_COLUMNS else pa.float64()

    schema = pa.schema([(column, kind(column)) for column in COLUMNS])
    table = pa.Table.from_pylist([{k: row.get(k) for k in COLUMNS} for row in rows], schema)
    pq.write_table(table, path)


def write_table(rows: list[dict[str, Any]], path: Path) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: "" if row.get(k) is None else row.get(k) for k in COLUMNS})


def read_table(path: Path) -> list[dict[str, Any]]:
    """results.csv back as dicts with numbers parsed (empty cells are None)."""

    def parse(text: str) -> Any:
        if text == "":
            return None
        try:
            number = float(text)
        except ValueError:
            return text
        return (
            int(number) if number.is_integer() and "." not in text and "e" not in text else number
        )

    with path.open(newline="") as handle:
        return [{k: parse(v) for k, v in row.items()} for row in csv.DictReader(handle)]

"""The resume message's lost-step count comes from the newest TensorBoard event file with
scalars (the attempt that was cut short), as TensorBoard's own writer names and writes them."""

from __future__ import annotations

from pathlib import Path

from torch.utils.tensorboard import SummaryWriter

from megatron_internvl.training.lost_steps import last_logged_step, lost_steps_note


def _attempt(log_dir: Path, opened_at: int, steps: range) -> None:
    """One attempt's event file, renamed as if its writer had opened it at `opened_at`."""
    before = set(log_dir.glob("events.out.tfevents.*"))
    with SummaryWriter(str(log_dir)) as writer:
        for step in steps:
            writer.add_scalar("train/loss", 1.0 / step, step)
    (path,) = set(log_dir.glob("events.out.tfevents.*")) - before
    parts = path.name.split(".")
    parts[3] = str(opened_at)
    path.rename(path.with_name(".".join(parts)))


def test_the_newest_attempt_with_steps_says_how_far_the_run_got(tmp_path):
    log_dir = tmp_path / "tensorboard"
    assert last_logged_step(log_dir) is None
    assert lost_steps_note(log_dir, 3) == ""  # a first start: nothing to report
    _attempt(log_dir, 1_700_000_000, range(1, 11))  # reached 10, resumed from 6 ...
    _attempt(log_dir, 1_700_000_300, range(7, 9))  # ... then lost after step 8
    _attempt(log_dir, 1_700_000_600, range(0))  # an attempt that died before its first step
    assert last_logged_step(log_dir) == 8
    assert lost_steps_note(log_dir, 6) == "; steps lost: 2 (the previous attempt logged step 8)"
    assert lost_steps_note(log_dir, 8) == "; steps lost: 0 (the previous attempt logged step 8)"

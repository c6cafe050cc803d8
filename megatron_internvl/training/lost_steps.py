"""The steps a restart loses: how far the attempt before a resume got, from its TensorBoard log.

A node failure kills the job between checkpoints; the next attempt resumes from the last
committed one and redoes the steps after it. Printed once at resume, so a lab sees what each
failure cost. Precise to `logging.log_every` (only logged steps are known).
"""

from __future__ import annotations

from pathlib import Path

from tensorboard.backend.event_processing.event_file_loader import EventFileLoader


def _created(path: Path) -> tuple[int, float]:
    """events.out.tfevents.<unix time>.<host>...: when the writer opened it (to the second;
    the last write breaks ties)."""
    return int(path.name.split(".")[3]), path.stat().st_mtime


def last_logged_step(tensorboard_dir: Path) -> int | None:
    """The last step the newest event file with scalars holds (the previous attempt's), or None."""
    files = sorted(tensorboard_dir.glob("events.out.tfevents.*"), key=_created, reverse=True)
    for path in files:
        steps = [event.step for event in EventFileLoader(str(path)).Load() if event.summary.value]
        if steps:
            return max(steps)
    return None


def lost_steps_note(tensorboard_dir: Path, resumed_step: int) -> str:
    """ "; steps lost: N (...)" for the resume message, or "" when no earlier attempt logged."""
    reached = last_logged_step(tensorboard_dir)
    if reached is None:
        return ""
    return (
        f"; steps lost: {max(reached - resumed_step, 0)} (the previous attempt logged step "
        f"{reached})"
    )

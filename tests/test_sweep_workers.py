"""The local sweep launcher's workers: a worker that exits settles only the points it claimed.

Found in CI: with two workers, the first to finish marked the other's running point FAILED
("exited 0 without a DONE marker"), and that point later finished with DONE beside FAILED."""

from __future__ import annotations

import json

from megatron_internvl.sweeps.launch import _settle_worker, point_status
from megatron_internvl.sweeps.point import WORKER_ENV, _claim


def _started(tmp_path, name):
    point = tmp_path / "points" / name
    (point / "tensorboard").mkdir(parents=True)  # training under way, no marker yet
    return point


def test_an_exiting_worker_leaves_the_other_workers_running_point_alone(tmp_path, monkeypatch):
    claims = tmp_path / "claims"
    claims.mkdir()
    mine, theirs = _started(tmp_path, "a"), _started(tmp_path, "b")
    monkeypatch.setenv(WORKER_ENV, "1")
    assert _claim(claims, mine) and not _claim(claims, mine)
    monkeypatch.setenv(WORKER_ENV, "2")
    assert _claim(claims, theirs)
    dirs, codes = {"a": mine, "b": theirs}, {}

    assert _settle_worker(dirs, claims, codes, 0, "1") is False
    assert point_status(mine) == "failed"  # worker 1 exited 0 without finishing its point
    assert json.loads((mine / "FAILED").read_text())["error"].startswith("exited 0")
    assert point_status(theirs) == "started"  # worker 2 is still training it

    _settle_worker(dirs, claims, codes, 1, "2")  # worker 2 crashes in its point
    assert json.loads((theirs / "FAILED").read_text())["exit_code"] == 1

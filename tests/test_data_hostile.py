"""Hostile and damaged data (issue 17) costs one skipped, counted, named sample, never a crash,
a hang or unbounded memory: the validator and the loader refuse each case for the same reason,
the loader stops with an error when every sample is dropped, and the tools write only into
their output."""

from __future__ import annotations

import json
import logging
import signal
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from megatron_internvl.data.errors import DataError
from megatron_internvl.data.loader import (
    DatasetSpec,
    InternVLLoader,
    LoaderConfig,
    TooManyBadSamplesError,
)
from megatron_internvl.data.shard_index import index_path, read_index
from megatron_internvl.data.shard_validation import validate_shards
from megatron_internvl.data.shard_writer import ShardWriter
from megatron_internvl.data.tiler import TilerConfig
from tests.hostile_shards import CASES, GOOD, conversation, jpeg, write_case

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(ROOT / "demo" / "tokenizer")


def config(**overrides) -> LoaderConfig:
    base = dict(
        seq_length=256, max_tiles_per_row=8, max_tiles_per_sample=8, tokens_per_tile=4,
        system_prompt=None, shuffle=False, read_ahead=4, skip_check_after=10**6,
        tiler=TilerConfig(image_size=56, max_num=4, batch_size=4),
    )  # fmt: skip
    return LoaderConfig(**{**base, **overrides})


class NoHang:
    """Fail instead of hanging: SIGALRM after `seconds`."""

    def __init__(self, seconds: int) -> None:
        self.seconds = seconds

    def __enter__(self) -> None:
        def fail(*_):
            raise AssertionError(f"no result within {self.seconds} s: the loader hangs")

        signal.signal(signal.SIGALRM, fail)
        signal.alarm(self.seconds)

    def __exit__(self, *exc) -> None:
        signal.alarm(0)


@pytest.mark.parametrize("name", list(CASES))
def test_each_hostile_shard_is_one_named_bad_sample_in_both_paths(
    tmp_path, tokenizer, caplog, name
):
    shard, keys = write_case(tmp_path, name)
    hostile = f"{shard}:{keys[1]}"
    reason = CASES[name].reason
    report = validate_shards([shard])
    if CASES[name].damage_index is None:
        assert report.bad == {hostile: report.bad[hostile]} and report.good == 3
        assert report.bad[hostile].startswith(reason)
    else:  # the tar is fine; its index is not
        assert report.good == 4 and report.index_problems[shard].startswith("stale")
    loader = InternVLLoader([DatasetSpec("h", (shard,))], tokenizer, config())
    with caplog.at_level(logging.WARNING, logger="megatron_internvl.data.loader"), NoHang(60):
        loader._fill()  # one read-ahead: the four samples
    assert loader.seen == 4 and dict(loader.skips) == {reason: 1}
    named = [r.getMessage() for r in caplog.records if reason in r.getMessage()]
    assert len(named) == 1 and (hostile in named[0] or shard in named[0])
    rows = [p.name for row in loader.ready + loader.packer.flush() for p in row.payloads]
    assert sorted(rows) == sorted(f"{shard}:{k}" for k in keys if f"{shard}:{k}" != hostile)


def test_validator_cli_reports_every_bad_sample_with_distinct_exit_codes(tmp_path, capsys):
    from tools.validate_shards import main as validate_main

    shards = [write_case(tmp_path, name)[0] for name in CASES if not CASES[name].damage_index]
    assert validate_main([str(tmp_path), "--no-progress"]) == 1
    out = capsys.readouterr().out
    assert out.startswith(f"{3 * len(shards)} good sample(s), {len(shards)} bad")
    for shard in shards:
        assert f"{shard}:" in out
    assert validate_main([str(tmp_path / "typo"), "--no-progress"]) == 2
    assert "no such directory or file" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert validate_main([str(tmp_path / "empty"), "--no-progress"]) == 2
    assert "no .tar shards in" in capsys.readouterr().err


@pytest.mark.parametrize("cause", ["over seq_length", "too many tiles", "over max_tiles_per_row"])
def test_loader_stops_with_reasons_when_every_sample_is_dropped(tmp_path, tokenizer, cause):
    long_answer = {"jpg": jpeg(), "json": conversation("<image>\n" + "why? " * 400)}
    big_image = {"jpg": jpeg((400, 60)), "json": conversation()}
    sample = long_answer if cause == "over seq_length" else big_image
    with ShardWriter(tmp_path, "dropped", max_samples=None) as writer:
        for _ in range(6):
            writer.write(sample)
    tiles = {"too many tiles": {"max_tiles_per_sample": 2}, "over max_tiles_per_row": {
        "max_tiles_per_row": 2}}.get(cause, {})  # fmt: skip
    cfg = config(max_consecutive_drops=10, **tiles)
    loader = InternVLLoader([DatasetSpec("d", (str(writer.paths[0]),))], tokenizer, cfg)
    with NoHang(120), pytest.raises(TooManyBadSamplesError) as stop:
        next(loader)
    message = str(stop.value)
    assert "the last 10 samples were all dropped" in message and cause in message
    assert str(writer.paths[0]) in message  # names the last ones


def test_clean_dir_never_touches_inputs_or_overwrites(tmp_path):
    one, _ = write_case(tmp_path / "a", "from_is_a_list")
    other = tmp_path / "b" / Path(one).name
    other.parent.mkdir()
    other.write_bytes(Path(one).read_bytes())
    before = Path(one).read_bytes()
    with pytest.raises(DataError, match="holds input shards"):
        validate_shards([one], clean_dir=tmp_path / "a")
    with pytest.raises(DataError, match="several inputs are named"):
        validate_shards([one, str(other)], clean_dir=tmp_path / "clean")
    assert Path(one).read_bytes() == before and not (tmp_path / "clean").exists()
    report = validate_shards([one], clean_dir=tmp_path / "clean")
    assert [p.name for p in report.clean_shards] == [Path(one).name]
    assert len(read_index(report.clean_shards[0])) == 3
    with pytest.raises(DataError, match="already holds"):
        validate_shards([str(other)], clean_dir=tmp_path / "clean")


def test_fix_index_rebuilds_stale_or_unreadable_and_refuses_empty_tars(tmp_path):
    shard, _ = write_case(tmp_path, "index_negative_offset")
    fixed = validate_shards([shard], fix_index=True)
    assert fixed.written_indexes == [index_path(shard)] and not fixed.index_problems
    assert all(e.problem is None for e in read_index(shard))
    index_path(shard).write_bytes(b"\xff\xfe garbage\n")
    assert validate_shards([shard]).index_problems[shard].startswith("unreadable")
    assert validate_shards([shard], fix_index=True).written_indexes == [index_path(shard)]
    assert validate_shards([shard]).index_problems == {}
    empty = tmp_path / "empty.tar"
    empty.write_bytes(b"\0" * 10240)  # what tar writes for no members
    report = validate_shards([str(empty)], fix_index=True)
    assert report.index_problems[str(empty)] == "missing; not rewritten: " + (
        f"{empty}: the tar holds no sample"
    )
    assert not index_path(empty).exists()


def test_stale_index_with_the_same_count_is_caught(tmp_path):
    shard, _ = write_case(tmp_path, "from_is_a_list")
    idx = index_path(shard)
    lines = idx.read_text().splitlines()
    lines[1], lines[3] = lines[3], lines[1]  # same samples, wrong order
    idx.write_text("\n".join(lines) + "\n")
    assert validate_shards([shard]).index_problems[shard].startswith("stale")


def test_builder_never_writes_outside_its_output(tmp_path, capsys):
    from tools.build_shards import main as build_main

    root, out = tmp_path / "images", tmp_path / "deep" / "out"
    root.mkdir()
    (root / "cat.jpg").write_bytes(GOOD["jpg"])
    (tmp_path / "secret.jpg").write_bytes(GOOD["jpg"])
    turns = json.loads(GOOD["json"])["conversations"]
    records = [
        {"id": "ok", "image": "cat.jpg", "conversations": turns},
        {"id": "up", "image": "../secret.jpg", "conversations": [{"from": "human", "value": "?"}]},
        {"id": "abs", "image": str(tmp_path / "secret.jpg"), "conversations": [
            {"from": "human", "value": "?"}]},
        {"id": "typed", "image": 5, "conversations": [{"from": "human", "value": "?"}]},
    ]  # fmt: skip
    data = tmp_path / "records.json"
    data.write_text(json.dumps(records))
    args = ["--json", str(data), "--image-root", str(root), "--no-progress"]
    assert build_main([*args, "--out", str(out), "--prefix", "../../X"]) == 2
    assert "not a plain name" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.rglob("*.tar")) == []
    assert build_main([*args, "--out", str(out)]) == 1
    printed = capsys.readouterr().out
    assert "wrote 1 samples" in printed and "skipped 3 record(s): 2 image outside root" in printed
    assert "(id typed): malformed record" in printed
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*.tar")) == [
        Path("deep/out/shard-000000.tar")
    ]

"""Indexes are built once, atomically, by the first process that needs one while the others
wait; data paths that cannot work fail with one line that says what to do."""

from __future__ import annotations

import multiprocessing
import threading
import time

import pytest

from megatron_internvl.data.errors import DataError
from megatron_internvl.data.shard_index import (
    ensure_index,
    index_path,
    read_index,
    shard_list,
    write_index,
)
from megatron_internvl.data.shard_writer import ShardWriter
from tests.hostile_shards import GOOD


def a_shard(tmp_path, n=5):
    with ShardWriter(tmp_path, "s", max_samples=None) as writer:
        for _ in range(n):
            writer.write(GOOD)
    shard = writer.paths[0]
    expected = index_path(shard).read_text()
    index_path(shard).unlink()
    return str(shard), expected


def test_concurrent_processes_build_one_index(tmp_path):
    shard, expected = a_shard(tmp_path)
    with multiprocessing.get_context("spawn").Pool(3) as pool:
        paths = pool.map(ensure_index, [shard] * 3)
    assert {str(p) for p in paths} == {str(index_path(shard))}
    assert index_path(shard).read_text() == expected
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s-000000.idx", "s-000000.tar"]


def test_a_waiting_process_uses_the_index_another_one_wrote(tmp_path):
    shard, expected = a_shard(tmp_path)
    lock = index_path(shard).with_name(f".{index_path(shard).name}.lock")
    lock.touch()  # another process is building it
    done = []
    waiter = threading.Thread(target=lambda: done.append(ensure_index(shard, wait_s=30)))
    waiter.start()
    time.sleep(0.5)
    assert not done  # it waits rather than building a second copy
    write_index(shard)
    lock.unlink()
    waiter.join(10)
    assert done == [index_path(shard)] and index_path(shard).read_text() == expected
    index_path(shard).unlink()
    lock.touch()
    with pytest.raises(DataError, match=r"delete .*lock"):
        ensure_index(shard, wait_s=0.3)


def test_data_paths_fail_with_one_line_that_says_what_to_do(tmp_path):
    with pytest.raises(DataError, match=r"no such directory or file: .*/typo$"):
        shard_list([tmp_path / "typo"])
    with pytest.raises(DataError, match=r"no .tar shards in .*build_shards.py"):
        shard_list([tmp_path])
    shard, _ = a_shard(tmp_path)
    with pytest.raises(DataError, match=r"no index .*validate_shards.py --fix-index"):
        read_index(shard)
    bad = tmp_path / "empty.tar"
    bad.write_bytes(b"\0" * 1024)
    with pytest.raises(DataError, match=r"cannot index .*holds no sample"):
        ensure_index(bad)


def test_building_a_missing_index_says_so_once(tmp_path, capsys):
    shard, expected = a_shard(tmp_path)
    ensure_index(shard)
    ensure_index(shard)  # present now: nothing to say
    out = capsys.readouterr().out
    assert out.count("data: indexing") == 1 and shard in out, out
    assert index_path(shard).read_text() == expected

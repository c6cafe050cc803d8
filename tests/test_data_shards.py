"""build_shards writes the standard layouts (which our reader and DALI's webdataset reader read
back byte for byte), and validate_shards names every bad sample, writes clean shards only where
it may, and repairs or refuses indexes."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import skimage.data
from PIL import Image

from megatron_internvl.data.samples import SampleConfig, read_sample
from megatron_internvl.data.shard_builders import ShardOutput, build_shards, load_records
from megatron_internvl.data.shard_index import read_index
from megatron_internvl.data.shard_reader import ShardReader
from megatron_internvl.data.shard_validation import validate_shards
from megatron_internvl.data.shard_writer import ShardWriter

ROOT = Path(__file__).resolve().parents[1]


def encode(array_hwc, fmt="JPEG", size=(96, 64)):
    buffer = io.BytesIO()
    Image.fromarray(array_hwc).resize(size).save(buffer, format=fmt)
    return buffer.getvalue()


def turn(who, text):
    return {"from": who, "value": text}


@pytest.fixture
def image_root(tmp_path):
    root = tmp_path / "images"
    root.mkdir()
    (root / "cat.jpg").write_bytes(encode(skimage.data.chelsea()))
    (root / "coffee.png").write_bytes(encode(skimage.data.coffee(), "PNG"))
    (root / "rocket.webp").write_bytes(encode(skimage.data.rocket(), "WEBP"))
    (root / "broken.jpg").write_bytes(encode(skimage.data.astronaut())[:300])
    return root


def good_records():
    return [
        {"id": "one", "image": "cat.jpg", "conversations": [turn("human", "<image>\nwhat?"),
                                                            turn("gpt", "a cat")]},
        {"id": "none_placed", "image": "coffee.png",
         "conversations": [turn("human", "what?"), turn("gpt", "coffee")], "source": "x"},
        {"id": "two", "image": ["rocket.webp", "cat.jpg"],
         "conversations": [turn("human", "<image> and <image>?"), turn("gpt", "both")]},
        {"id": "text", "conversations": [turn("human", "hi"), turn("gpt", "hello")]},
    ]  # fmt: skip


def members_of(tar_path):
    with tarfile.open(tar_path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def test_builder_writes_documented_members_and_index(tmp_path, image_root):
    jsonl = tmp_path / "data.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in good_records()))
    summary = build_shards(
        load_records(jsonl), image_root, ShardOutput(tmp_path / "out", progress_bar=False)
    )
    assert summary.written == 4 and summary.images == 4 and summary.text_only == 1
    assert not summary.skipped
    (shard,) = summary.shards
    assert shard.name == "shard-000000.tar"
    members = members_of(shard)
    assert sorted(members) == sorted(
        ["000000000.json", "000000000.jpg", "000000001.json", "000000001.png",
         "000000002.json", "000000002.0.webp", "000000002.1.jpg", "000000003.json"]
    )  # fmt: skip
    # Image bytes are copied, not re-encoded.
    assert members["000000002.0.webp"] == (image_root / "rocket.webp").read_bytes()
    meta = json.loads(members["000000001.json"])
    assert meta["id"] == "none_placed" and meta["source"] == "x"
    # No placeholder in the record: inserted InternVL's way.
    assert meta["conversations"][0]["value"] == "<image>\nwhat?"
    # The index finds every member, and the reader returns the stored bytes.
    entries = read_index(shard)
    assert [e.key for e in entries] == [f"{n:09d}" for n in range(4)]
    reader, cfg = ShardReader(), SampleConfig()
    raw = read_sample(reader, entries[2], cfg)
    assert raw.meta["id"] == "two" and raw.layout == "conversation"
    assert raw.images == [
        (image_root / "rocket.webp").read_bytes(),
        (image_root / "cat.jpg").read_bytes(),
    ]
    text = read_sample(reader, entries[3], cfg)
    assert text.images == [] and text.layout == "text"


def test_shard_size_by_count_and_by_bytes(tmp_path, image_root):
    records = good_records() * 3  # 12 samples
    by_count = build_shards(
        records, image_root, ShardOutput(tmp_path / "c", max_samples=5, progress_bar=False)
    )
    assert [len(read_index(p)) for p in by_count.shards] == [5, 5, 2]
    assert [p.name for p in by_count.shards] == [f"shard-{n:06d}.tar" for n in range(3)]
    limit = 40_000
    by_bytes = build_shards(
        records,
        image_root,
        ShardOutput(tmp_path / "b", max_samples=None, max_bytes=limit, progress_bar=False),
    )
    assert len(by_bytes.shards) > 1
    # webdataset closes a shard once its member bytes reach max_bytes (tar headers not counted).
    for shard in by_bytes.shards[:-1]:
        payload = [sum(size for _, size in e.members.values()) for e in read_index(shard)]
        assert sum(payload[:-1]) < limit <= sum(payload)
    assert sum(len(read_index(p)) for p in by_bytes.shards) == 12
    assert all(p.with_suffix(".idx").exists() for p in by_bytes.shards)


def test_builder_skips_and_reports_bad_records(tmp_path, image_root):
    records = [
        *good_records()[:1],
        {"id": "gone", "image": "nope.jpg", "conversations": [turn("human", "x"),
                                                              turn("gpt", "y")]},
        {"id": "broken", "image": "broken.jpg", "conversations": [turn("human", "x"),
                                                                  turn("gpt", "y")]},
        {"id": "count", "image": "cat.jpg",
         "conversations": [turn("human", "<image> <image>"), turn("gpt", "y")]},
        {"id": "empty", "image": "cat.jpg"},
    ]  # fmt: skip
    summary = build_shards(records, image_root, ShardOutput(tmp_path / "out", progress_bar=False))
    assert summary.written == 1
    assert summary.skipped == {
        "missing image": 1,
        "corrupt image": 1,
        "placeholder mismatch": 1,
        "malformed record": 1,
    }
    text = summary.format()
    for record_id in ("gone", "broken", "count", "empty"):
        assert f"(id {record_id})" in text


def test_dali_webdataset_reader_reads_the_shards(tmp_path, image_root):
    from tests.dali_reader import TiledImageLoader, TilingPipelineConfig

    records = [good_records()[0]] * 3
    summary = build_shards(records, image_root, ShardOutput(tmp_path / "out", progress_bar=False))
    shard = str(summary.shards[0])
    cfg = TilingPipelineConfig(image_ext="jpg", batch_size=2, max_num=2)
    loader = TiledImageLoader([shard], [str(Path(shard).with_suffix(".idx"))], cfg)
    samples = [s for batch in loader for s in batch]
    assert [s.key for s in samples] == [f"{shard}:{e.key}" for e in read_index(shard)]
    assert all(json.loads(s.meta)["id"] == "one" for s in samples)


def write_raw(path, samples):
    """samples: [{ext: bytes}] written as is (no checks), with an index."""
    with ShardWriter(path.parent, path.stem, max_samples=None, max_bytes=1 << 40) as writer:
        keys = [writer.write(members) for members in samples]
    return writer.paths[0], keys


def meta(n_images, placeholders=None):
    placeholders = n_images if placeholders is None else placeholders
    images = [f"{i}.jpg" for i in range(n_images)]
    conversation = [turn("human", "<image>" * placeholders + "q"), turn("gpt", "a")]
    return json.dumps({"images": images, "conversations": conversation}).encode()


def bad_samples():
    """One good sample between each kind of bad one; returns [(members, reason or None)]."""
    good = encode(skimage.data.coffee())
    ok = {"json": meta(1), "0.jpg": good}
    return [
        (ok, None),
        ({"json": meta(1), "0.jpg": good[: len(good) // 2]}, "corrupt image"),
        (ok, None),
        ({"json": b'{"images": ["0.jpg"], "conversations": [', "0.jpg": good}, "malformed json"),
        ({"json": meta(2), "0.jpg": good}, "missing image"),
        ({"json": meta(1, placeholders=2), "0.jpg": good}, "placeholder mismatch"),
        ({"json": meta(0)}, None),
        (ok, None),
    ]


def test_validator_names_each_bad_sample_and_writes_clean_shards(tmp_path):
    cases = bad_samples()
    shard, keys = write_raw(tmp_path / "raw" / "mix.tar", [members for members, _ in cases])
    # A second shard, cut in the middle of its second sample's image.
    cut, cut_keys = write_raw(tmp_path / "raw" / "cut.tar", [cases[0][0], cases[0][0]])
    size = read_index(cut)[1].members["0.jpg"]
    with open(cut, "r+b") as handle:
        handle.truncate(size[0] + size[1] // 2)
    report = validate_shards([shard, cut], clean_dir=tmp_path / "clean")
    expected = {f"{shard}:{k}": why for k, (_, why) in zip(keys, cases, strict=True) if why}
    expected[f"{cut}:{cut_keys[1]}"] = "truncated tar"
    assert {name: why.split(":")[0] for name, why in report.bad.items()} == expected
    assert report.good == 4 + 1
    clean = sorted(report.clean_shards)
    assert [p.name for p in clean] == [cut.name, shard.name]  # input names kept
    assert [len(read_index(p)) for p in clean] == [1, 4]
    again = validate_shards(clean)
    assert again.good == 5 and not again.bad


def test_cli_builds_and_validates_the_demo_data(tmp_path, capsys):
    from tools.build_shards import main as build_main
    from tools.validate_shards import main as validate_main

    assert build_main(["--demo", "--out", str(tmp_path), "--max-samples", "8"]) == 0
    assert "wrote 31 samples (31 images, 1 videos, 3 text-only" in capsys.readouterr().out
    assert validate_main([str(tmp_path), "--no-progress"]) == 0
    assert "31 good sample(s), 0 bad" in capsys.readouterr().out


def test_demo_data_is_small_and_complete():
    demo = ROOT / "demo"
    total = sum(p.stat().st_size for p in demo.rglob("*") if p.is_file())
    assert total < 2_000_000, total
    records = load_records(demo / "data" / "demo.json")
    images = {i for r in records for i in ([r["image"]] if isinstance(r.get("image"), str)
                                           else r.get("image", []))}  # fmt: skip
    assert all((demo / "data" / i).exists() for i in images)
    assert any(isinstance(r.get("image"), list) for r in records)
    assert any("image" not in r for r in records)
    shapes = [np.asarray(Image.open(demo / "data" / i)).shape for i in sorted(images)]
    assert all(max(s[:2]) <= 320 and s[2] == 3 for s in shapes)
    (clip,) = [r["video"] for r in records if "video" in r]
    import av

    with av.open(str(demo / "data" / clip)) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(frames) >= 32 and frames[0].shape == (96, 128, 3)
    assert np.abs(frames[0].astype(int) - frames[-1]).mean() > 10  # it moves


def test_validator_reports_and_fixes_missing_or_stale_indexes(tmp_path, capsys):
    from tools.validate_shards import main as validate_main

    ok = {"json": meta(0)}
    shard, _ = write_raw(tmp_path / "one.tar", [ok, ok, ok])
    index = shard.with_suffix(".idx")
    stale = index.read_text().splitlines()
    index.write_text("\n".join([f"v1.2 {len(stale) - 2}", *stale[1:-1]]) + "\n")
    problem = validate_shards([shard]).index_problems[str(shard)]
    assert problem.startswith("stale: lists 2 samples (0 unusable), the tar 3")
    index.unlink()
    assert validate_main([str(shard), "--no-progress"]) == 1
    assert "index missing" in capsys.readouterr().out
    fixed = validate_shards([shard], fix_index=True)
    assert fixed.written_indexes == [index] and not fixed.index_problems
    assert len(read_index(shard)) == 3

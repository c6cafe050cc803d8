"""Video samples (an .mp4 or pre-extracted frames) become InternVL 2.5's video input: frames from
equal segments, as many as drawn from the configured range (the same on every read), decoded
frames equal to what FFmpeg decodes, one tile each with `Frame-i: <image>` lines; a damaged video
is one skipped sample in both the validator and the loader."""

from __future__ import annotations

import dataclasses
import io
import json
import logging
from pathlib import Path

import av
import numpy as np
import pytest
import skimage.data
import torch
import webdataset as wds
from PIL import Image
from transformers import AutoTokenizer

from megatron_internvl.data.loader import DatasetSpec, InternVLLoader, LoaderConfig
from megatron_internvl.data.samples import SampleConfig, read_sample
from megatron_internvl.data.shard_index import ensure_index, read_index
from megatron_internvl.data.shard_reader import ShardReader
from megatron_internvl.data.shard_validation import validate_shards
from megatron_internvl.data.tiler import ImageJob, ImageTiler, TilerConfig
from megatron_internvl.data.video import choose_frames

ROOT = Path(__file__).resolve().parents[1]


def pan_frames(count=40, size=(96, 64)):
    """A camera pan across a photograph: `count` RGB frames."""
    photo = skimage.data.astronaut()
    width, height = size
    return [photo[40 : 40 + height * 3 : 3, 4 * i : 4 * i + width * 3 : 3] for i in range(count)]


def mp4(frames) -> bytes:
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="mp4") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.height, stream.width = frames[0].shape[:2]
        stream.pix_fmt = "yuv420p"
        for array in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buffer.getvalue()


def jpeg(array, quality: int = 75) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


QUESTION = {"conversations": [{"from": "human", "value": "<video>\nWhat moves?"},
                              {"from": "gpt", "value": "The camera pans right."}]}  # fmt: skip


@pytest.mark.parametrize("vlen", [5, 40, 333])
def test_frames_come_one_per_equal_segment_in_the_drawn_count(vlen):
    counts = set()
    for key in (f"sample{n}" for n in range(30)):
        picks = choose_frames(key, vlen, (8, 32))
        assert picks == choose_frames(key, vlen, (8, 32))  # a function of the key
        if vlen <= 8:
            assert picks == list(range(vlen))  # a short video keeps every frame
            continue
        counts.add(len(picks))
        assert 8 <= len(picks) <= 32 and picks == sorted(picks) and len(set(picks)) == len(picks)
        assert 0 <= picks[0] and picks[-1] < vlen
        edges = np.linspace(0, vlen, len(picks) + 1).astype(int)
        if (np.diff(edges) >= 2).all():
            # InternVL draws from range(start, end - 1) of each segment (else a random subset)
            ends = edges[1:] - 1
            assert all(lo <= p < hi for p, lo, hi in zip(picks, edges[:-1], ends, strict=True))
    if vlen == 333:
        assert len(counts) > 5  # the count is drawn, not fixed


FRAME_SHAPES = [(240, 320), (600, 40), (60, 900), (6, 8), (720, 1280)]
"""(height, width) of decoded frames: camera-like (upscaled), tall and narrow (width up, height
down: the class where the resize pass order matters), a panorama, tiny, HD (downscaled)."""


def png(array) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def test_decoded_frames_tile_as_their_lossless_encodings_and_as_internvl_does():
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in FRAME_SHAPES]
    for jpeg_quality in (None, (75, 100)):
        tiler = ImageTiler(TilerConfig(jpeg_quality=jpeg_quality, batch_size=4))
        qualities = [int(q) for q in rng.integers(75, 101, len(frames))]
        jobs = [ImageJob(f, 1, q, video_frame=True) for f, q in zip(frames, qualities, strict=True)]
        direct = tiler.tile(jobs)
        # The same frames as members (PNG, lossless), decoded by DALI (host resize) or, where
        # DALI's graph resizes (the GPU path), by PIL: the same tiles.
        members = [dataclasses.replace(j, data=png(j.data)) for j in jobs]
        graph = ImageTiler(TilerConfig(jpeg_quality=jpeg_quality, batch_size=4, resize="dali"))
        for encoded in (tiler.tile(members), graph.tile(members)):
            for ours, via_png in zip(direct, encoded, strict=True):
                assert ours.shape == (1, 448, 448, 3) and torch.equal(ours, via_png)
    # InternVL's video_get_item: its training transform per frame, JPEG at the frame's own size
    # then Resize((448, 448), BICUBIC): no dynamic_preprocess, no thumbnail. Noise frames of
    # every aspect class without re-compression; camera frames (a pan over a photograph) at
    # fixed qualities (DALI's JPEG codec against PIL's).
    plain = ImageTiler(TilerConfig(batch_size=4)).tile([ImageJob(f, 1) for f in frames])
    cases = [(frame, tiles, None) for frame, tiles in zip(frames, plain, strict=True)]
    camera = [np.ascontiguousarray(f) for f in pan_frames(3, (320, 240))]
    for quality in (75, 90, 100):
        tiler = ImageTiler(TilerConfig(jpeg_quality=(quality, quality)))
        tiled = tiler.tile([ImageJob(f, 1, quality, video_frame=True) for f in camera])
        cases += [(frame, tiles, quality) for frame, tiles in zip(camera, tiled, strict=True)]
    for frame, tiles, quality in cases:
        image = Image.fromarray(frame)
        if quality is not None:  # InternVL's simulate_jpeg_degradation
            image = Image.open(io.BytesIO(jpeg(frame, quality))).convert("RGB")
        pil = np.asarray(image.resize((448, 448), Image.Resampling.BICUBIC))
        assert np.abs(tiles[0].numpy().astype(int) - pil.astype(int)).max() <= 2


@pytest.fixture(scope="module")
def video_shard(tmp_path_factory):
    frames = pan_frames()
    clip = mp4(frames)
    path = tmp_path_factory.mktemp("video") / "video.tar"
    with wds.TarWriter(str(path)) as writer:
        writer.write({"__key__": "clip", "mp4": clip, "json": json.dumps(QUESTION)})
        stills = {f"frame{i:03d}.jpg": jpeg(f) for i, f in enumerate(frames[:12])}
        writer.write({"__key__": "stills", **stills, "json": json.dumps(QUESTION)})
        writer.write(
            {"__key__": "broken", "mp4": clip[: len(clip) // 3], "json": json.dumps(QUESTION)}
        )
        writer.write(
            {
                "__key__": "text",
                "json": json.dumps({"conversations": QUESTION["conversations"][1:]}),
            }
        )
    ensure_index(path)
    return str(path), clip, stills


def test_video_and_frame_samples_parse_into_frame_prompts(video_shard):
    shard, clip, stills = video_shard
    cfg = SampleConfig(video_frames=(4, 6))
    entries = {e.key: e for e in read_index(shard)}
    sample = read_sample(ShardReader(), entries["clip"], cfg)
    picks = choose_frames("clip", 40, (4, 6))
    assert sample.layout == "video" and len(sample.images) == len(picks)
    with av.open(io.BytesIO(clip)) as container:  # FFmpeg's frames, through PyAV's image API
        decoded = [np.asarray(f.to_image()) for f in container.decode(video=0)]
    for frame, index in zip(sample.images, picks, strict=True):  # decoded frames, not re-encoded
        assert frame.dtype == np.uint8 and np.array_equal(frame, decoded[index])
    lines = "\n".join(f"Frame-{i + 1}: <image>" for i in range(len(picks)))
    assert sample.conversations[0]["value"] == f"{lines}\nWhat moves?"
    stills_sample = read_sample(ShardReader(), entries["stills"], cfg)
    chosen = choose_frames("stills", 12, (4, 6))
    assert stills_sample.images == [stills[f"frame{i:03d}.jpg"] for i in chosen]


def test_validator_and_loader_take_videos_one_tile_per_frame(video_shard, caplog):
    shard, _, _ = video_shard
    report = validate_shards([shard])
    assert report.good == 3 and set(report.bad) == {f"{shard}:broken"}
    assert report.bad[f"{shard}:broken"].startswith("corrupt video")
    tokenizer = AutoTokenizer.from_pretrained(ROOT / "demo" / "tokenizer")
    cfg = LoaderConfig(
        seq_length=1024, max_tiles_per_row=32, max_tiles_per_sample=32, tokens_per_tile=4,
        system_prompt=None, shuffle=False, read_ahead=4, skip_check_after=10**6,
        tiler=TilerConfig(image_size=56, max_num=12, batch_size=8),
        sample=SampleConfig(video_frames=(4, 6)),
    )  # fmt: skip
    loader = InternVLLoader([DatasetSpec("v", (shard,))], tokenizer, cfg)
    with caplog.at_level(logging.WARNING, logger="megatron_internvl.data.loader"):
        loader._fill()
    assert dict(loader.skips) == {"corrupt video": 1}
    payloads = {p.name: p for row in loader.ready + loader.packer.flush() for p in row.payloads}
    for key, vlen in (("clip", 40), ("stills", 12)):
        tiles = payloads[f"{shard}:{key}"].tiles
        assert len(tiles) == len(choose_frames(key, vlen, (4, 6)))
        assert all(t.shape[0] == 1 for t in tiles)  # one tile per frame, no thumbnail


def test_the_demo_clip_trains_as_frames_from_the_demo_shards(tmp_path):
    from tools.build_shards import main as build_main

    assert build_main(["--demo", "--out", str(tmp_path), "--no-progress"]) == 0
    (shard,) = map(str, tmp_path.glob("*.tar"))
    tokenizer = AutoTokenizer.from_pretrained(ROOT / "demo" / "tokenizer")
    cfg = LoaderConfig(
        seq_length=512, max_tiles_per_row=12, tokens_per_tile=4, shuffle=False, read_ahead=31,
        tiler=TilerConfig(image_size=56, max_num=4, batch_size=8),
        sample=SampleConfig(video_frames=(4, 8)),  # as recipes/recipe/demo_cpu_shards.yaml
    )  # fmt: skip
    loader = InternVLLoader([DatasetSpec("demo", (shard,))], tokenizer, cfg)
    loader._fill()  # the 31 demo samples
    assert not loader.skips and loader.packer.stats.samples_packed == 31
    rows = loader.ready + loader.packer.flush()
    (clip,) = [p for row in rows for p in row.payloads if p.name.endswith(":000000030")]
    assert 4 <= len(clip.tiles) <= 8 and all(t.shape == (1, 56, 56, 3) for t in clip.tiles)


def _demo_run_config(shards, video_frames):
    from megatron_internvl.config.cli import compose_run_config

    return compose_run_config(
        ["recipe=demo_cpu_shards", f"data.shards=[{','.join(map(str, shards))}]",
         f"data.video_frames={video_frames}", f"data.tokenizer={ROOT / 'demo' / 'tokenizer'}"]
    )  # fmt: skip


def test_each_dataset_samples_the_demo_clip_in_its_own_frame_range(tmp_path):
    import shutil

    from megatron_internvl.config.cli import check_runnable
    from megatron_internvl.config.validate import RecipeError
    from megatron_internvl.training.build_data import data_source, fit_spec_to_tokenizer
    from megatron_internvl.training.build_model import resolved_spec
    from tools.build_shards import main as build_main

    sets = [tmp_path / "short", tmp_path / "long"]
    assert build_main(["--demo", "--out", str(sets[0]), "--no-progress"]) == 0
    shutil.copytree(sets[0], sets[1])
    with av.open(ROOT / "demo" / "data" / "videos" / "astronaut_pan.mp4") as container:
        vlen = sum(1 for _ in container.decode(video=0))  # FFmpeg's count of the clip's frames
    for wrong in ("[[2,3]]", "[[2,3],[7,6]]", "[2,3,4]"):  # one line naming the field
        with pytest.raises(RecipeError, match=r"data\.video_frames=.*one such pair per entry"):
            check_runnable(_demo_run_config(sets, wrong))
    cfg = _demo_run_config(sets, "[[2,3],[6,7]]")
    check_runnable(cfg)
    tokenizer = AutoTokenizer.from_pretrained(cfg.data.tokenizer)
    spec = fit_spec_to_tokenizer(resolved_spec(cfg), tokenizer)
    source = data_source(cfg, spec, dp_rank=0, dp_size=1, tokenizer=tokenizer)
    clips: dict[str, int] = {}
    try:
        for _ in range(200):
            (batch,) = source.next_microbatches(1)
            for key, tiles in zip(batch["sample_keys"], batch["tile_counts"], strict=True):
                if key.endswith(":000000030"):  # the clip: one tile per frame
                    clips[Path(key.split(":")[0]).parent.name] = tiles
            if len(clips) == 2:
                break
    finally:
        source.close()
    assert 2 <= clips["short"] <= 3 and 6 <= clips["long"] <= 7
    assert clips["short"] == len(choose_frames("000000030", vlen, (2, 3)))
    assert clips["long"] == len(choose_frames("000000030", vlen, (6, 7)))

"""The loader yields the micro-batches the forward step consumes (image tokens match the tiles,
in order), gives ranks disjoint shares, mixes datasets by weight from a seed, resumes exactly,
refuses a different dp size, and skips, counts and names each kind of bad sample."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image
from transformers import AutoTokenizer

from megatron_internvl.data.chat import IGNORE_INDEX, IMG_CONTEXT, tokenize_conversation
from megatron_internvl.data.loader import (
    DatasetSpec,
    InternVLLoader,
    LoaderConfig,
    TooManyBadSamplesError,
)
from megatron_internvl.data.pixels import normalize_tiles
from megatron_internvl.data.samples import SampleConfig, read_sample
from megatron_internvl.data.shard_index import read_index
from megatron_internvl.data.shard_reader import ShardReader
from megatron_internvl.data.shard_writer import ShardWriter
from megatron_internvl.data.tiler import ImageJob, ImageTiler, TilerConfig
from megatron_internvl.data.tiling import choose_grid

ROOT = Path(__file__).resolve().parents[1]
S = 56  # small tiles keep DALI fast on two cores; the tiling logic does not depend on S
TPT = 4  # tokens per tile


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(ROOT / "demo" / "tokenizer")


def encode(array_hwc, size, quality=90):
    buffer = io.BytesIO()
    Image.fromarray(array_hwc).resize(size).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


PHOTOS = [skimage.data.astronaut(), skimage.data.chelsea(), skimage.data.coffee()]


def sample_members(k, n_images, rng):
    """A sample with `n_images` photos of varied aspect ratios and a short conversation."""
    images = []
    for i in range(n_images):
        width, height = int(rng.integers(20, 200)), int(rng.integers(20, 200))
        images.append(encode(PHOTOS[(k + i) % 3], (width, height)))
    question = "".join(f"Image-{i + 1}: <image>\n" for i in range(n_images)) + f"what is {k}?"
    meta = {
        "id": k,
        "images": [f"{i}.jpg" for i in range(n_images)],
        "conversations": [
            {"from": "human", "value": question},
            {"from": "gpt", "value": "a cat " * int(rng.integers(1, 20))},
        ],
    }
    return {"json": json.dumps(meta).encode(), **{f"{i}.jpg": d for i, d in enumerate(images)}}


def make_dataset(root, name, n, seed=0, per_shard=7):
    """n samples (0..3 images each) in shards of `per_shard`; returns the shard paths."""
    rng = np.random.default_rng(seed)
    with ShardWriter(root / name, name, max_samples=per_shard) as writer:
        for k in range(n):
            writer.write(sample_members(k, int(rng.integers(0, 4)), rng))
    return tuple(str(p) for p in writer.paths)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("loader")
    return {"a": make_dataset(root, "a", 30, seed=1), "b": make_dataset(root, "b", 20, seed=2)}


def config(**overrides):
    tiler = TilerConfig(image_size=S, max_num=6, batch_size=8, **overrides.pop("tiler", {}))
    base = {
        "seq_length": 160,
        "max_tiles_per_row": 16,
        "max_tiles_per_sample": 16,
        "open_rows": 4,
        "tokens_per_tile": TPT,
        "system_prompt": None,
        "read_ahead": 5,
        "tiler": tiler,
    }
    return LoaderConfig(**{**base, **overrides})


def take(loader, n):
    return [next(loader) for _ in range(n)]


def test_micro_batch_matches_forward_step_contract(data, tokenizer):
    cfg = config(micro_batch_size=2)
    loader = InternVLLoader([DatasetSpec("a", data["a"])], tokenizer, cfg)
    context_id = tokenizer.convert_tokens_to_ids(IMG_CONTEXT)
    reference = ImageTiler(cfg.tiler)
    names = {e.name: e for e in (e for p in data["a"] for e in read_index(p))}
    reader = ShardReader()
    saw_multi = saw_text = False
    for batch in take(loader, 6):
        b, s = batch["tokens"].shape
        assert (b, s) == (2, cfg.seq_length)
        for key in ("tokens", "labels", "position_ids"):
            assert batch[key].dtype == torch.int64 and batch[key].shape == (b, s)
        assert batch["loss_mask"].dtype == torch.float32
        assert batch["cu_seqlens"].dtype == torch.int32 and batch["cu_seqlens"][-1] == b * s
        assert ((batch["loss_mask"] > 0) == (batch["labels"] != IGNORE_INDEX)).all()
        # Position ids restart at every sub-sample boundary.
        flat_pos = batch["position_ids"].reshape(-1)
        assert (flat_pos[batch["cu_seqlens"][:-1].long()] == 0).all()
        # Tiles: one <IMG_CONTEXT> run of TPT * tiles per image, tiles in the runs' order.
        slots = int((batch["tokens"] == context_id).sum())
        tiles = 0 if batch["images"] is None else batch["images"].shape[0]
        assert slots == TPT * tiles == TPT * int(batch["tile_counts"].sum())
        expected, expected_ids = [], []
        for name in batch["sample_keys"]:
            raw = read_sample(reader, names[name], SampleConfig())
            cap = max(1, 6 // max(1, len(raw.images)))
            per_image = reference.tile([ImageJob(d, cap) for d in raw.images])
            expected += per_image
            ids, _ = tokenize_conversation(
                raw.conversations, [t.shape[0] for t in per_image], tokenizer, TPT, None
            )
            expected_ids += ids
            saw_multi |= len(raw.images) > 1
            saw_text |= not raw.images
        if expected:
            assert torch.equal(batch["images"], normalize_tiles(expected))
        else:
            assert batch["images"] is None
        # Sub-samples in key order, then padding (pad id 0 never occurs in a sample).
        flat = batch["tokens"].reshape(-1)
        assert flat[flat != tokenizer.pad_token_id].tolist() == expected_ids
    assert saw_multi and saw_text


def test_multi_image_cap_splits_the_tile_budget(tmp_path, tokenizer):
    # A 6:1 image: 6 x 1 tiles + thumbnail alone; 3 x 1 + thumbnail with a cap of 6 // 2.
    strip = encode(skimage.data.coffee(), (600, 100))
    one = {"json": json.dumps({"images": ["0.jpg"], "conversations": [
        {"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "a"}]}).encode(),
        "0.jpg": strip}  # fmt: skip
    two = {"json": json.dumps({"images": ["0.jpg", "1.jpg"], "conversations": [
        {"from": "human", "value": "<image><image>\nq"}, {"from": "gpt", "value": "a"}]}).encode(),
        "0.jpg": strip, "1.jpg": strip}  # fmt: skip
    with ShardWriter(tmp_path, "cap", max_samples=None, max_bytes=1 << 30) as writer:
        writer.write(one)
        writer.write(two)
    cfg = config(shuffle=False, read_ahead=2, seq_length=400, micro_batch_size=1, open_rows=1)
    loader = InternVLLoader([DatasetSpec("cap", (str(writer.paths[0]),))], tokenizer, cfg)
    assert choose_grid(600, 100, max_num=6) == (6, 1) and choose_grid(600, 100, max_num=3) == (3, 1)
    batch = next(loader)
    # tile_counts are per sub-sample: 7 for the single image, 4 + 4 for the pair.
    assert batch["tile_counts"].tolist() == [7, 8]
    images = batch["images"]
    assert torch.equal(images[7:11], images[11:15])
    assert not torch.equal(images[7:10], images[0:3])  # a 3-tile grid is not a 6-tile one


def test_ranks_read_disjoint_shares_that_cover_each_epoch(data, tokenizer):
    everything = sorted(e.name for p in data["a"] for e in read_index(p))
    for dp_size in (1, 2, 3):
        loaders = [
            InternVLLoader([DatasetSpec("a", data["a"])], tokenizer, config(), r, dp_size)
            for r in range(dp_size)
        ]
        for epoch in (0, 1):
            shares = [ld.epoch_order(0, epoch) for ld in loaders]
            union = [name for share in shares for name in share]
            assert sorted(union) == everything and len(set(union)) == len(union)
        assert loaders[0].epoch_order(0, 0) != loaders[0].epoch_order(0, 1)  # reshuffled
    # The micro-batches of two ranks hold different samples.
    keys = [
        {k for batch in take(InternVLLoader([DatasetSpec("a", data["a"])], tokenizer, config(),
                                            r, 2), 2) for k in batch["sample_keys"]}
        for r in range(2)
    ]  # fmt: skip
    assert keys[0] and keys[1] and not keys[0] & keys[1]


def test_mixture_follows_weights_and_is_seeded(data, tokenizer):
    specs = [DatasetSpec("a", data["a"], weight=3.0), DatasetSpec("b", data["b"], weight=1.0)]
    loader = InternVLLoader(specs, tokenizer, config(seed=5))
    drawn = [loader._next_ref()[0] for _ in range(2000)]
    assert abs(drawn.count(0) / 2000 - 0.75) < 0.03

    def stream(seed):
        ld = InternVLLoader(specs, tokenizer, config(seed=seed))
        return [k for batch in take(ld, 3) for k in batch["sample_keys"]]

    first = stream(5)
    assert first == stream(5) and first != stream(6)
    assert {k.split(":")[0].split("/")[-2] for k in first} == {"a", "b"}


def assert_same_batches(left, right):
    assert len(left) == len(right)
    for x, y in zip(left, right, strict=True):
        assert x.keys() == y.keys()
        for key in x:
            if isinstance(x[key], torch.Tensor):
                assert torch.equal(x[key], y[key]), key
            else:
                assert x[key] == y[key], key


def test_stream_does_not_depend_on_read_ahead(data, tokenizer):
    specs = [DatasetSpec("a", data["a"], 2.0), DatasetSpec("b", data["b"], 1.0)]
    batches = [
        take(InternVLLoader(specs, tokenizer, config(read_ahead=n, seed=3)), 6) for n in (3, 11)
    ]
    assert_same_batches(*batches)


@pytest.mark.parametrize("stop", [1, 4])
def test_resumed_loader_yields_the_uninterrupted_stream(data, tokenizer, stop):
    specs = [DatasetSpec("a", data["a"], 2.0), DatasetSpec("b", data["b"], 1.0)]
    cfg = config(tiler={"jpeg_quality": (75, 100)}, seed=9)
    total = 14  # enough that the resumed loader reads new samples after its saved rows
    uninterrupted = take(InternVLLoader(specs, tokenizer, cfg, dp_rank=1, dp_size=2), total)
    first = InternVLLoader(specs, tokenizer, cfg, dp_rank=1, dp_size=2)
    head = take(first, stop)
    state = json.loads(json.dumps(first.state_dict()))  # survives a round trip through JSON
    # Rows still open in the packer and closed rows not yet consumed: both must come back.
    assert state["open_rows"] and state["ready_rows"]
    resumed = InternVLLoader(specs, tokenizer, cfg, dp_rank=1, dp_size=2)
    resumed.load_state_dict(state)
    assert_same_batches(head + take(resumed, total - stop), uninterrupted)


def test_state_from_another_dp_size_is_refused(data, tokenizer):
    specs = [DatasetSpec("a", data["a"])]
    state = InternVLLoader(specs, tokenizer, config(), 1, 2).state_dict()
    other = InternVLLoader(specs, tokenizer, config(), 1, 4)
    with pytest.raises(ValueError, match=r"rank 1 of 2, this loader is rank 1 of 4.*dp_size=2"):
        other.load_state_dict(state)
    with pytest.raises(ValueError, match="same data mixture"):
        InternVLLoader(specs, tokenizer, config(seed=3), 1, 2).load_state_dict(state)


def meta(n_images, placeholders=None):
    placeholders = n_images if placeholders is None else placeholders
    return json.dumps({
        "images": [f"{i}.jpg" for i in range(n_images)],
        "conversations": [{"from": "human", "value": "<image>" * placeholders + "q"},
                          {"from": "gpt", "value": "a"}],
    }).encode()  # fmt: skip


GOOD = encode(skimage.data.coffee(), (120, 80))
BAD_CASES = {
    "corrupt image": {"json": meta(1), "0.jpg": GOOD[: len(GOOD) // 2]},
    "malformed json": {"json": b'{"images": [', "0.jpg": GOOD},
    "missing image": {"json": meta(2), "0.jpg": GOOD},
    "placeholder mismatch": {"json": meta(1, placeholders=2), "0.jpg": GOOD},
    "truncated tar": None,  # the shard is cut inside its last sample
}


@pytest.mark.parametrize("reason", list(BAD_CASES))
def test_each_kind_of_bad_sample_is_skipped_counted_and_logged(tmp_path, tokenizer, caplog, reason):
    good = {"json": meta(1), "0.jpg": GOOD}
    samples = [good, good, good, BAD_CASES[reason] or good, good, good]
    with ShardWriter(tmp_path, "bad", max_samples=None, max_bytes=1 << 30) as writer:
        keys = [writer.write(s) for s in samples]
    shard = str(writer.paths[0])
    if reason == "truncated tar":
        keys = keys[:4]  # cut inside sample 3's image: samples 4 and 5 are gone too
        offset, size = read_index(shard)[3].members["0.jpg"]
        with open(shard, "r+b") as handle:
            handle.truncate(offset + size // 2)
    # One read-ahead of 6 puts the bad image in a DALI batch with good ones.
    cfg = config(shuffle=False, read_ahead=6, open_rows=1, skip_check_after=10**6)
    loader = InternVLLoader([DatasetSpec("bad", (shard,))], tokenizer, cfg)
    with caplog.at_level(logging.WARNING, logger="megatron_internvl.data.loader"):
        batches = take(loader, 3)
    seen = {k for batch in batches for k in batch["sample_keys"]}
    bad_name = f"{shard}:{keys[3]}"
    assert bad_name not in seen
    # Only the bad sample is lost, not its DALI batch.
    assert {f"{shard}:{k}" for k in keys[:3]} <= seen
    if reason != "truncated tar":
        assert {f"{shard}:{k}" for k in keys[4:]} <= seen
    assert loader.skips[reason] >= 1 and set(loader.skips) == {reason}
    assert any(bad_name in r.getMessage() and reason in r.getMessage() for r in caplog.records)


def test_too_many_skips_stop_the_run(tmp_path, tokenizer):
    good = {"json": meta(1), "0.jpg": GOOD}
    bad = {"json": meta(1, placeholders=2), "0.jpg": GOOD}
    with ShardWriter(tmp_path, "half", max_samples=None, max_bytes=1 << 30) as writer:
        for k in range(20):
            writer.write(bad if k % 2 else good)
    cfg = config(shuffle=False, max_skip_fraction=0.2, skip_check_after=8)
    loader = InternVLLoader([DatasetSpec("half", (str(writer.paths[0]),))], tokenizer, cfg)
    with pytest.raises(
        TooManyBadSamplesError, match=r"skipped \d+ of \d+ samples.*validate_shards"
    ):
        take(loader, 10)
    assert loader.skips["placeholder mismatch"] >= 2


def test_text_only_rows_carry_no_images(tmp_path, tokenizer):
    with ShardWriter(tmp_path, "text", max_samples=None, max_bytes=1 << 30) as writer:
        for _ in range(4):
            writer.write({"json": meta(0)})
    cfg = config(shuffle=False, read_ahead=4)
    batch = next(InternVLLoader([DatasetSpec("t", (str(writer.paths[0]),))], tokenizer, cfg))
    assert batch["images"] is None
    assert batch["tile_counts"].tolist() == [0] * len(batch["sample_keys"])
    context_id = tokenizer.convert_tokens_to_ids(IMG_CONTEXT)
    assert not (batch["tokens"] == context_id).any()


@pytest.mark.gpu
@pytest.mark.parametrize("quality", [None, 95])
def test_gpu_tiler_matches_the_cpu_one(data, quality):
    """device_id=0 runs `image_graph` ("mixed" decoding, DALI's GPU resize, nvJPEG
    re-compression of whole images): same tile counts, uint8 tiles on the GPU, within the
    resizers', IDCTs' and encoders' difference of the CPU tiles (host resize, PIL per tile),
    and a float batch on the GPU. Ran on an H200 (2026-11-26)."""
    reader = ShardReader()
    raws = [read_sample(reader, e, SampleConfig()) for e in read_index(data["a"][0])]
    jobs = [ImageJob(d, 6, 90) for raw in raws for d in raw.images]
    q = None if quality is None else (quality, quality)
    cpu = ImageTiler(TilerConfig(image_size=S, jpeg_quality=q)).tile(jobs)
    gpu = ImageTiler(TilerConfig(image_size=S, jpeg_quality=q, device_id=0)).tile(jobs)
    for a, b in zip(cpu, gpu, strict=True):
        assert b.is_cuda and b.dtype == torch.uint8 and a.shape == b.shape
        # uint8 levels. With JPEG, the GPU compresses the whole grid image and the CPU each
        # tile (other 8x8 block alignment): 3.13 levels seen at q=95 on an H200.
        limit = 3.0 if quality is None else 4.0
        assert (a.float() - b.cpu().float()).abs().mean() < limit
    batch = normalize_tiles(gpu)
    assert batch.is_cuda and batch.dtype == torch.float32
    assert torch.allclose(batch.cpu(), normalize_tiles([t.cpu() for t in gpu]), atol=1e-6)


def test_demo_data_loads_end_to_end_at_internvl_sizes(tmp_path):
    from megatron_internvl.data.demo_data import build_demo_shards, demo_tokenizer

    summary = build_demo_shards(tmp_path)
    assert summary.written == 31 and not summary.skipped  # 30 records and the clip
    tokenizer = demo_tokenizer()
    shards = tuple(str(p) for p in summary.shards)
    loader = InternVLLoader([DatasetSpec("demo", shards)], tokenizer, LoaderConfig(seq_length=8192))
    batch = next(loader)
    context_id = tokenizer.convert_tokens_to_ids(IMG_CONTEXT)
    assert batch["images"].shape[1:] == (3, 448, 448)
    assert int((batch["tokens"] == context_id).sum()) == 256 * batch["images"].shape[0]
    assert loader.packing_stats.fill_rate > 0.9


def test_prefetcher_keeps_the_stream_and_resumes_exactly(data, tokenizer):
    from megatron_internvl.data.prefetch import Prefetcher

    specs = [DatasetSpec("a", data["a"], 2.0), DatasetSpec("b", data["b"], 1.0)]
    cfg = config(seed=4)
    plain = take(InternVLLoader(specs, tokenizer, cfg), 8)
    ahead = Prefetcher(InternVLLoader(specs, tokenizer, cfg), depth=3)
    head = take(ahead, 3)
    state = ahead.state_dict()  # what was consumed, not what the thread ran ahead to
    ahead.close()
    resumed = Prefetcher(InternVLLoader(specs, tokenizer, cfg), depth=2)
    resumed.load_state_dict(state)
    assert_same_batches(head + take(resumed, 5), plain)
    resumed.close()


def test_prefetcher_raises_the_loaders_error(tmp_path, tokenizer):
    from megatron_internvl.data.prefetch import Prefetcher

    bad = {"json": meta(1, placeholders=2), "0.jpg": GOOD}
    with ShardWriter(tmp_path, "allbad", max_samples=None, max_bytes=1 << 30) as writer:
        for _ in range(4):
            writer.write(bad)
    cfg = config(shuffle=False, skip_check_after=4)
    loader = InternVLLoader([DatasetSpec("x", (str(writer.paths[0]),))], tokenizer, cfg)
    with pytest.raises(TooManyBadSamplesError):
        next(Prefetcher(loader))


class Counter:
    """A stateful stand-in loader; with `split`, next_rows/collate as InternVLLoader has them."""

    def __init__(self, fail_at: int | None = None) -> None:
        self.n, self.fail_at = 0, fail_at

    def __next__(self) -> int:
        return self.collate(self.next_rows())

    def next_rows(self) -> int:
        self.n += 1
        return self.n

    def collate(self, n: int) -> int:
        if n == self.fail_at:
            raise KeyError(f"bad {n}")
        return 10 * n

    def state_dict(self) -> dict:
        return {"n": self.n}

    def load_state_dict(self, state: dict) -> None:
        self.n = state["n"]


class PlainCounter:
    """The same without next_rows/collate: the Prefetcher runs one thread."""

    def __init__(self) -> None:
        self.inner = Counter()

    def __next__(self) -> int:
        return next(self.inner)

    def state_dict(self) -> dict:
        return self.inner.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.inner.load_state_dict(state)


@pytest.mark.parametrize("kind", [Counter, PlainCounter])
def test_prefetcher_states_follow_consumed_batches_with_and_without_collate_thread(kind):
    from megatron_internvl.data.prefetch import Prefetcher

    ahead = Prefetcher(kind(), depth=2)
    assert [next(ahead) for _ in range(3)] == [10, 20, 30]
    assert ahead.state_dict() == {"n": 3}
    assert len(ahead._threads) == (2 if kind is Counter else 1)
    ahead.close()


def test_prefetcher_raises_a_collate_error():
    from megatron_internvl.data.prefetch import Prefetcher

    ahead = Prefetcher(Counter(fail_at=2))
    assert next(ahead) == 10
    with pytest.raises(KeyError, match="bad 2"):
        next(ahead)

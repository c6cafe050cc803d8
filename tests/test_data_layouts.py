"""Shards in the layouts the WebDataset world writes (LLaVA single-image, numbered multi-image,
our listed-images layout, img2dataset captions, text-only), written by webdataset's own writer
with no index, are read as they are: the validator and the loader accept and refuse exactly the
same samples for the same reasons, captions become prompted conversations, and training through
the entry point runs on such a folder, building the missing indexes itself."""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import skimage.data
import webdataset as wds
from PIL import Image
from transformers import AutoTokenizer

from megatron_internvl.data.loader import DatasetSpec, InternVLLoader, LoaderConfig
from megatron_internvl.data.samples import SampleConfig, read_sample
from megatron_internvl.data.shard_index import index_path, read_index
from megatron_internvl.data.shard_reader import ShardReader
from megatron_internvl.data.shard_validation import validate_shards
from megatron_internvl.data.tiler import TilerConfig

ROOT = Path(__file__).resolve().parents[1]


def encode(array_hwc, fmt="JPEG", size=(80, 60)):
    buffer = io.BytesIO()
    Image.fromarray(array_hwc).resize(size).save(buffer, format=fmt)
    return buffer.getvalue()


JPG = encode(skimage.data.chelsea())
PNG = encode(skimage.data.coffee(), "PNG", (50, 90))
WEBP = encode(skimage.data.rocket(), "WEBP", (120, 40))
GIF = encode(skimage.data.astronaut(), "GIF")


def conv(*turns):
    """A LLaVA `conversations` JSON member from (human, gpt, human, ...) texts."""
    turns_json = [{"from": ("human", "gpt")[i % 2], "value": t} for i, t in enumerate(turns)]
    return json.dumps({"conversations": turns_json})


CASES = {
    # key: (members, reason the sample is refused, or None)
    "llava": ({"jpg": JPG, "json": conv("<image>\nWhat is this?", "A cat.")}, None),
    "llava_no_placeholder": ({"png": PNG, "json": conv("What is this?", "Coffee.")}, None),
    "numbered": (
        {"2.jpg": JPG, "10.webp": WEBP, "json": conv("<image> then <image>: same?", "No.")},
        None,
    ),
    "listed": (
        {
            "0.png": PNG,
            "1.jpg": JPG,
            "json": json.dumps(
                {**json.loads(conv("<image><image> ?", "x")), "images": ["1.jpg", "0.png"]}
            ),
        },
        None,
    ),
    "caption": (
        {"jpg": JPG, "txt": b"A cat on a sofa.", "json": b'{"width": 80, "similarity": 0.35}'},
        None,
    ),
    "caption_no_meta": ({"webp": WEBP, "txt": b"A rocket.\n"}, None),
    "text": ({"json": conv("Hi", "Hello.")}, None),
    "no_conversations": ({"jpg": JPG, "json": b'{"caption": "x"}'}, "malformed json"),
    "empty_caption": ({"jpg": JPG, "txt": b"  "}, "malformed caption"),
    "too_few_placeholders": (
        {"0.jpg": JPG, "1.jpg": JPG, "json": conv("<image> ?", "y")},
        "placeholder mismatch",
    ),
    "bare_and_numbered": (
        {"jpg": JPG, "0.jpg": JPG, "json": conv("<image>", "y")},
        "ambiguous images",
    ),
    "gif": ({"gif": GIF, "json": conv("<image>", "y")}, "unsupported image"),
    "gif_named_jpg": ({"jpg": GIF, "json": conv("<image>", "y")}, "unsupported image"),
    "role_is_a_list": (
        {"json": b'{"conversations": [{"from": ["gpt"], "value": "x"}]}'},
        "malformed json",
    ),
    "value_is_a_number": (
        {"json": b'{"conversations": [{"from": "human", "value": 5}]}'},
        "malformed json",
    ),
    "caption_only": ({"txt": b"a caption without its image"}, "missing member"),
    "corrupt_jpeg": ({"jpg": JPG[: len(JPG) // 2], "json": conv("<image>", "y")}, "corrupt image"),
}


def write_world_shard(path: Path, cases: dict) -> str:
    """One tar written by webdataset's own TarWriter, keys as given, no index."""
    with wds.TarWriter(str(path)) as writer:
        for key, (members, _) in cases.items():
            writer.write({"__key__": key, **members})
    return str(path)


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(ROOT / "demo" / "tokenizer")


def loader_config(n: int, **sample) -> LoaderConfig:
    return LoaderConfig(
        seq_length=512,
        max_tiles_per_row=16,
        max_tiles_per_sample=16,
        tokens_per_tile=4,
        system_prompt=None,
        shuffle=False,
        read_ahead=n,
        skip_check_after=10**6,
        tiler=TilerConfig(image_size=56, max_num=4, batch_size=8),
        sample=SampleConfig(**sample),
    )


def loader_verdicts(shard: str, n: int, tokenizer, caplog, **sample) -> dict[str, str | None]:
    """Reason per sample name the loader skipped (None: used), after one pass over the shard."""
    loader = InternVLLoader([DatasetSpec("w", (shard,))], tokenizer, loader_config(n, **sample))
    with caplog.at_level(logging.WARNING, logger="megatron_internvl.data.loader"):
        while loader.seen < n:
            loader._fill()  # one read-ahead of n: every sample once
    names = [e.name for e in loader.entries[0]]
    verdicts: dict[str, str | None] = dict.fromkeys(names)
    for record in caplog.records:
        for name in names:
            if f"sample {name}: " in record.getMessage():
                verdicts[name] = record.getMessage().split(f"sample {name}: ")[1].split(":")[0]
    loader.close()
    return verdicts


def test_validator_and_loader_agree_on_every_layout(tmp_path, tokenizer, caplog):
    shard = write_world_shard(tmp_path / "world.tar", CASES)
    report = validate_shards([shard])
    by_validator = {f"{shard}:{k}": None for k in CASES}
    by_validator.update({n: why.split(":")[0] for n, why in report.bad.items()})
    assert by_validator == {f"{shard}:{k}": why for k, (_, why) in CASES.items()}
    assert report.index_problems == {shard: "missing"}
    assert not index_path(shard).exists()  # the validator reports, it does not write

    by_loader = loader_verdicts(shard, len(CASES), tokenizer, caplog)
    assert index_path(shard).exists()  # built by the loader on first use
    assert by_loader == by_validator


def test_layouts_parse_into_the_conversations_internvl_trains_on(tmp_path):
    shard = write_world_shard(tmp_path / "world.tar", CASES)
    from megatron_internvl.data.shard_index import ensure_index

    ensure_index(shard)
    prompts = ("Caption it.", "Say what you see.")
    cfg = SampleConfig(caption_prompts=prompts)
    entries = {e.key: e for e in read_index(shard)}
    reader = ShardReader()

    def parse(key):
        return read_sample(reader, entries[key], cfg)

    numbered = parse("numbered")
    assert numbered.images == [JPG, WEBP]  # 2 before 10: numeric order
    assert numbered.image_sizes == [(80, 60), (120, 40)]
    assert parse("listed").images == [JPG, PNG]  # the order the JSON lists
    no_placeholder = parse("llava_no_placeholder")
    assert no_placeholder.conversations[0]["value"] == "<image>\nWhat is this?"
    caption = parse("caption")
    assert caption.layout == "caption" and caption.meta == {"width": 80, "similarity": 0.35}
    human, gpt = caption.conversations
    assert human["from"] == "human" and human["value"].split("\n", 1)[1] in prompts
    assert human["value"].startswith("<image>\n") and gpt == {
        "from": "gpt",
        "value": "A cat on a sofa.",
    }
    # The prompt is a function of the sample: the same on every read.
    assert parse("caption").conversations == caption.conversations
    assert parse("caption_no_meta").conversations[1]["value"] == "A rocket."
    assert parse("text").layout == "text" and parse("text").images == []


def test_caption_metadata_filters_drop_samples_in_both_paths(tmp_path, tokenizer, caplog):
    cases = {k: CASES[k] for k in ("caption", "caption_no_meta", "llava")}
    cases["caption_low"] = ({"jpg": JPG, "txt": b"x", "json": b'{"similarity": 0.1}'}, None)
    shard = write_world_shard(tmp_path / "cap.tar", cases)
    limits = {"caption_min": {"similarity": 0.3}}
    report = validate_shards([shard], cfg=SampleConfig(**limits))
    assert report.good == 2 and report.filtered == {"filtered": 2} and not report.bad
    verdicts = loader_verdicts(shard, 4, tokenizer, caplog, **limits)
    assert verdicts == {
        f"{shard}:caption": None,
        f"{shard}:caption_no_meta": "filtered",  # no similarity: not known to pass
        f"{shard}:llava": None,  # filters apply to captions only
        f"{shard}:caption_low": "filtered",
    }


def test_img2dataset_folder_converts_through_the_cli(tmp_path, capsys):
    from tools.build_shards import main as build_main

    # img2dataset's "files" output: <dir>/<shard>/<key>.jpg + .txt + .json
    part = tmp_path / "laion" / "00000"
    part.mkdir(parents=True)
    for n, (image, text) in enumerate([(JPG, "a cat"), (PNG, "coffee"), (WEBP, "rocket")]):
        ext = ["jpg", "png", "webp"][n]
        (part / f"00000000{n}.{ext}").write_bytes(image)
        (part / f"00000000{n}.txt").write_text(text)
        (part / f"00000000{n}.json").write_text(json.dumps({"width": 80, "key": f"{n}"}))
    (part / "000000003.jpg").write_bytes(JPG)  # no caption: skipped, named
    code = build_main(["--img2dataset", str(tmp_path / "laion"), "--out", str(tmp_path / "out"),
                       "--no-progress"])  # fmt: skip
    out = capsys.readouterr().out
    assert (
        code == 1
        and "wrote 3 samples (3 images, 0 videos, 0 text-only" in out
        and "000000003.jpg" in out
    )
    report = validate_shards(sorted(map(str, (tmp_path / "out").glob("*.tar"))))
    assert report.good == 3 and not report.bad and not report.index_problems


def world_demo_shards(out: Path) -> None:
    """The demo data as the world writes it: webdataset's ShardWriter, LLaVA single-image,
    numbered multi-image, video and text-only samples, plus img2dataset-style captions; no
    index."""
    records = json.loads((ROOT / "demo" / "data" / "demo.json").read_text())
    out.mkdir(parents=True)
    with wds.ShardWriter(str(out / "world-%04d.tar"), maxcount=12, verbose=0) as writer:
        for n, record in enumerate(records):
            images = record.get("image") or []
            images = [images] if isinstance(images, str) else images
            sample = {"__key__": f"rec{n:04d}", "json": json.dumps(record)}
            if "video" in record:
                sample["mp4"] = (ROOT / "demo" / "data" / record["video"]).read_bytes()
            for i, rel in enumerate(images):
                data = (ROOT / "demo" / "data" / rel).read_bytes()
                sample["jpg" if len(images) == 1 else f"{i}.jpg"] = data
            writer.write(sample)
            if len(images) == 1:
                caption = record["conversations"][1]["value"]
                writer.write({"__key__": f"cap{n:04d}", "jpg": data, "txt": caption})


def test_training_runs_on_a_folder_of_plain_webdataset_tars(tmp_path):
    shards = tmp_path / "world"
    world_demo_shards(shards)
    assert not list(shards.glob("*.idx"))
    command = [
        sys.executable, "-m", "megatron_internvl.launch.local", "--standalone",
        "--nproc-per-node", "2", "-m", "megatron_internvl.train", "recipe=demo_cpu_shards",
        f"output_dir={tmp_path}",
        f"data.shards=[{shards}]", "train.steps=2", "train.warmup_steps=1",
        "checkpoint.save_every=100", "logging.log_every=1",
    ]  # fmt: skip
    result = subprocess.run(
        command,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert len(list(shards.glob("*.idx"))) == len(list(shards.glob("*.tar"))) == 5
    assert len([line for line in result.stdout.splitlines() if line.startswith("step")]) >= 2
    assert "skipping" not in result.stderr

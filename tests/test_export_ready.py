"""The demo's HF export is ready to use and round-trips, through tools/convert_hf.py on a real
training run: transformers loads it with its processor files (InternVL's tiling and
normalisation, the image tokens, the chat template) and generates from an image and a prompt;
`to-megatron` takes the model's shape from its config.json (no registered flavour fits the
demo's resized vocabulary) and converts back bit for bit."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
IMAGES = ROOT / "demo" / "data" / "images"


def _tool(*args: str) -> str:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    result = subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stderr


@pytest.fixture(scope="module")
def demo_export(tmp_path_factory) -> Path:
    """A 1-step demo run on the demo shards, exported by to-hf (native layout)."""
    base = tmp_path_factory.mktemp("export")
    _tool("tools/build_shards.py", "--demo", "--out", str(base / "shards"), "--no-progress")
    _tool(  # torchrun on loopback only
        *("-m", "megatron_internvl.launch.local", "--standalone", "--nproc-per-node", "1"),
        *("-m", "megatron_internvl.train"),
        "recipe=demo_cpu_shards",
        f"output_dir={base}",
        f"data.shards=[{base / 'shards'}]",
        *("parallel.tensor=1", "parallel.sequence_parallel=false"),
        *("train.steps=1", "train.warmup_steps=0"),
    )
    out = base / "hf"
    _tool(
        "tools/convert_hf.py", "to-hf", "--ckpt", str(base / "demo_cpu_shards"), "--out", str(out)
    )
    return out


MESSAGES = [
    {
        "role": "user",
        "content": [{"type": "image"}, {"type": "text", "text": "What is in the picture?"}],
    }
]


def _demo_image() -> Image.Image:
    return Image.open(sorted(IMAGES.iterdir())[0]).convert("RGB")


def _prompt_and_pixels(export: Path) -> tuple[dict, dict]:
    """What InternVLProcessor makes of one image and a question, expanded by hand from the
    export's files (the image processor, the tokenizer's image tokens, the chat template)."""
    from transformers import AutoImageProcessor, AutoTokenizer

    pixels = AutoImageProcessor.from_pretrained(export, backend="pil")(
        images=[_demo_image()], return_tensors="pt"
    )
    tok = AutoTokenizer.from_pretrained(export)
    text = tok.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    per_tile = json.loads((export / "processor_config.json").read_text())["image_seq_length"]
    tokens = tok.context_image_token * per_tile * pixels["pixel_values"].shape[0]
    text = text.replace(
        tok.context_image_token, tok.start_image_token + tokens + tok.end_image_token
    )
    return dict(tok(text, return_tensors="pt")), {"pixel_values": pixels["pixel_values"]}


# Run by the torchvision side environment (scripts/setup_torchvision.sh): the user's path,
# AutoProcessor + AutoModelForImageTextToText + generate, with what it made saved for comparison.
_AUTOPROCESSOR = """
import json, sys
import torch
from PIL import Image
from safetensors.torch import save_file
from transformers import AutoModelForImageTextToText, AutoProcessor

export, image, messages, out = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), sys.argv[4]
processor = AutoProcessor.from_pretrained(export)
text = processor.apply_chat_template(messages, add_generation_prompt=True)
inputs = processor(images=[Image.open(image).convert("RGB")], text=[text], return_tensors="pt")
model = AutoModelForImageTextToText.from_pretrained(export).eval()
with torch.no_grad():
    generated = model.generate(**inputs, max_new_tokens=4, do_sample=False)
save_file({"input_ids": inputs["input_ids"].contiguous(),
           "pixel_values": inputs["pixel_values"].contiguous(),
           "generated": generated.contiguous()}, out)
print(type(processor).__name__, type(processor.image_processor).__name__)
"""


def _torchvision_python() -> Path | None:
    side = Path(os.environ.get("TORCHVISION_VENV", ROOT / ".venv-torchvision"))
    python = side / "bin" / "python"
    return python if python.exists() else None


def test_autoprocessor_loads_the_export_and_generates(demo_export, tmp_path):
    python = _torchvision_python()
    if python is None:
        message = "no torchvision side environment: run scripts/setup_torchvision.sh"
        if os.environ.get("CI"):
            pytest.fail(message + " (CI's .ci/run builds it)")
        pytest.skip(message)
    image = sorted(IMAGES.iterdir())[0]
    out = tmp_path / "autoprocessor.safetensors"
    args = [str(demo_export), str(image), json.dumps(MESSAGES), str(out)]
    result = subprocess.run(
        [str(python), "-c", _AUTOPROCESSOR, *args], capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split()[0] == "InternVLProcessor", result.stdout
    made = load_file(out)
    text, pixels = _prompt_and_pixels(demo_export)
    # The processor expands the prompt exactly as the export's files say (tiles x tokens).
    assert torch.equal(made["input_ids"], text["input_ids"])
    # Its (fast, torchvision) image processor tiles like the PIL one; resampling differs a little.
    assert made["pixel_values"].shape == pixels["pixel_values"].shape
    assert (made["pixel_values"] - pixels["pixel_values"]).abs().mean() < 0.05
    assert made["generated"].shape[1] == text["input_ids"].shape[1] + 4


def test_the_export_loads_with_its_processor_and_generates(demo_export):
    from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer

    image_processor = AutoImageProcessor.from_pretrained(demo_export, backend="pil")
    assert image_processor.size == {"height": 56, "width": 56}  # the demo ViT's tile
    assert list(image_processor.image_mean) == [0.485, 0.456, 0.406]  # InternVL's ImageNet values
    assert image_processor.crop_to_patches and image_processor.max_patches == 12
    tok = AutoTokenizer.from_pretrained(demo_export)
    model = AutoModelForImageTextToText.from_pretrained(demo_export).eval()
    assert tok.context_image_token_id == model.config.image_token_id
    text, pixels = _prompt_and_pixels(demo_export)
    tiles = pixels["pixel_values"].shape[0]
    assert tiles > 1  # tiled (plus thumbnail), not one resized image
    image_tokens = (text["input_ids"] == model.config.image_token_id).sum().item()
    assert image_tokens == tiles * model.config.image_seq_length
    with torch.no_grad():
        out = model.generate(**text, **pixels, max_new_tokens=4, do_sample=False)
    assert out.shape[1] == text["input_ids"].shape[1] + 4


def test_the_export_converts_back_bit_exactly_from_its_config(demo_export, tmp_path):
    megatron = tmp_path / "megatron"
    _tool(
        "tools/convert_hf.py", "to-megatron", "--hf-dir", str(demo_export), "--out", str(megatron)
    )
    again = tmp_path / "hf"
    log = _tool("tools/convert_hf.py", "to-hf", "--ckpt", str(megatron), "--out", str(again))
    assert "100% (" in log and " MiB, " in log and " GiB" not in log  # units that suit ~1 MiB
    first = load_file(demo_export / "model-00001-of-00001.safetensors")
    second = load_file(again / "model-00001-of-00001.safetensors")
    assert first.keys() == second.keys()
    for name, tensor in first.items():
        assert torch.equal(tensor, second[name]), name
    original = json.loads((demo_export / "config.json").read_text())
    assert json.loads((again / "config.json").read_text()) == original
    # The original layout names no model code it does not ship (the README says how to load it).
    _tool(
        *("tools/convert_hf.py", "to-hf", "--ckpt", str(megatron)),
        *("--out", str(tmp_path / "original"), "--layout", "original"),
    )
    assert "auto_map" not in (tmp_path / "original" / "config.json").read_text()
    assert not list((tmp_path / "original").glob("*.py"))

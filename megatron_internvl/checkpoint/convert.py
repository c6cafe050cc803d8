"""HF checkpoints <-> Megatron dist checkpoints of InternVL, driven by the tables in hf_mappings.

The Megatron side is a `megatron.core.dist_checkpointing` checkpoint of the `sharded_state_dict()`
of a TP=1/PP=1 model built on the meta device: dist_checkpointing reshards on load, so it loads
at any TP/PP (and the ViT's padded head count, part of the shapes, is chosen here with
`vision_pad_heads_to`).

Both directions stream, one Megatron parameter at a time, so memory stays near the largest
parameter rather than the model (benchmarks/convert_memory.py measures it). Import validates the
HF file headers first (missing, unexpected and misshapen tensors are all reported before any
data is read); then the dist-checkpoint writer asks for each parameter in turn and gets it made
from just its HF tensors (megatron_files). Export reads one parameter at a time from the dist
checkpoint and writes each HF tensor straight into its planned shard file (hf_files.ShardWriter).
Progress, in bytes written, goes to stderr (checkpoint/progress.py).

Outputs are written to a hidden temporary directory next to the target and renamed into place
when complete, so a failed conversion leaves nothing that looks like a checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from megatron_internvl.checkpoint import hf_config, hf_files, megatron_files
from megatron_internvl.checkpoint.errors import ConversionError
from megatron_internvl.checkpoint.hf_mappings import (
    HF_LAYOUTS,
    Entry,
    expand,
    native_file_name,
    native_state_dict_name,
    retarget,
    table_for,
)
from megatron_internvl.checkpoint.hf_transforms import TRANSFORMS, ShapeContext
from megatron_internvl.checkpoint.megatron_files import release_memory
from megatron_internvl.checkpoint.progress import Progress, amount
from megatron_internvl.models.registry import (
    InternVLSpec,
    get_spec,
    spec_from_dict,
    spec_to_dict,
)

if TYPE_CHECKING:
    from megatron_internvl.config.precision import PrecisionConfig

Log = Callable[[str], None]
CONVERSION_INFO = "internvl_conversion.json"
"""Written next to a converted dist checkpoint: flavour, padded ViT heads, dtype, source."""
TOKENIZER_SUBDIR = "hf_tokenizer"
"""Where an imported checkpoint keeps the HF tokenizer files, for the way back."""
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
_VIT_QKV_KEY = "vision_model.encoder.layers.self_attention.linear_qkv.weight"


def _stderr_log(message: str) -> None:
    print(f"convert: {message}", file=sys.stderr, flush=True)


def _dtype(value: str | torch.dtype | None) -> torch.dtype | None:
    if value is None or isinstance(value, torch.dtype):
        return value
    names = {v: k for k, v in _DTYPE_NAMES.items()}
    if value not in names:
        raise ConversionError(f"dtype {value!r}: use one of {sorted(names)}")
    return names[value]


# --- output directory and the one-rank world ------------------------------------------------


@contextlib.contextmanager
def staged_output(out_dir: Path | str, force: bool) -> Iterator[Path]:
    """A hidden temporary directory renamed to `out_dir` only if the body succeeds."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not force:
        raise ConversionError(
            f"{out_dir} already exists; choose a new output directory or pass force=True "
            f"(--force) to replace it"
        )
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the result should not be
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if out_dir.exists():  # force: swap, then delete the old one
        old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
        os.rename(out_dir, old)
    os.rename(tmp, out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def _one_rank_world() -> Iterator[None]:
    """Megatron needs process groups even for a TP=1 model on one process."""
    from megatron.core import parallel_state

    from megatron_internvl.parallel import runtime
    from megatron_internvl.parallel.layout import ParallelLayout

    if not dist.is_initialized():
        with runtime.single_process():
            yield
        return
    if dist.get_world_size() != 1:
        raise ConversionError(
            f"the converter runs on one process, but this one is rank {dist.get_rank()} of "
            f"{dist.get_world_size()}; call it outside torchrun/srun"
        )
    if not parallel_state.model_parallel_is_initialized():
        ParallelLayout().initialize()
    yield


def _precision(dtype: torch.dtype) -> PrecisionConfig:
    from megatron_internvl.config.precision import PrecisionConfig

    return PrecisionConfig(dtype="bfloat16" if dtype == torch.bfloat16 else "float32")


def _build(spec: InternVLSpec, vit_padded_heads: int, dtype: torch.dtype) -> torch.nn.Module:
    """The TP=1 model on the meta device: names, shapes and sharding, no memory."""
    from megatron_internvl.models.internvl import build_internvl_chunks
    from megatron_internvl.parallel.layout import ParallelLayout

    with torch.device("meta"):
        [model] = build_internvl_chunks(
            spec,
            ParallelLayout(),
            max_sequence_length=4096,  # only sizes RoPE caches; no weight depends on it
            vision_pad_heads_to=vit_padded_heads,  # a multiple >= the real heads: exactly this
            precision=_precision(dtype),
            perform_initialization=False,
        )
    return model


def _fresh_projector(spec: InternVLSpec, dtype: torch.dtype, seed: int) -> dict[str, torch.Tensor]:
    """A Megatron-initialised projector (the only part a stage-1 import does not read)."""
    from megatron_internvl.models.vision import VisionProjector, projector_config
    from megatron_internvl.parallel.layout import ParallelLayout

    torch.manual_seed(seed)
    config = projector_config(
        spec.language.hidden_size, ParallelLayout(), **_precision(dtype).transformer_overrides()
    )
    projector = VisionProjector(config, input_size=spec.projector_input_size)
    return {
        f"vision_projection.{k}": v.detach()
        for k, v in megatron_files.model_tensors(projector).items()
    }


def _padded_heads(spec: InternVLSpec, vision_pad_heads_to: int | None) -> int:
    from megatron_internvl.models.vision import padded_heads

    return padded_heads(spec.vision.num_attention_heads, vision_pad_heads_to or 1)


# --- import ---------------------------------------------------------------------------------


@dataclass
class _Part:
    """One HF tensor a Megatron parameter is made of, with the shape it must have."""

    entry: Entry
    shape: tuple[int, ...]
    min_rows: int | None


def _expected_parts(
    entries: list[Entry], tensors: dict[str, torch.Tensor], ctx: ShapeContext
) -> dict[str, list[_Part]]:
    """HF name -> the slots it feeds, with the shape each expects."""
    by_hf: dict[str, list[_Part]] = {}
    for entry in entries:
        if entry.megatron not in tensors:
            raise AssertionError(f"mapping table names {entry.megatron!r}, which the model lacks")
        target = tensors[entry.megatron]
        transform = TRANSFORMS[entry.transform]
        shapes = transform.to_hf(ctx, torch.empty(target.shape, device="meta"))
        min_rows = transform.min_rows(ctx) if transform.min_rows else None
        for name, shape in zip(entry.hf, shapes, strict=True):
            by_hf.setdefault(name, []).append(_Part(entry, tuple(shape.shape), min_rows))
    return by_hf


def _shape_ok(part: _Part, shape: tuple[int, ...]) -> bool:
    if part.min_rows is None or not shape:
        return shape == part.shape
    return shape[1:] == part.shape[1:] and shape[0] >= part.min_rows


def _limited(items: list[str], limit: int = 12) -> str:
    shown = "\n    ".join(items[:limit])
    more = f"\n    ... and {len(items) - limit} more" if len(items) > limit else ""
    return f"\n    {shown}{more}"


def _validate(
    source: hf_files.HFSource,
    by_hf: dict[str, list[_Part]],
    rename: Callable[[str], str],
    what: str,
) -> None:
    """Every problem of the source against the table, in one error, before reading any data."""
    seen: dict[str, str] = {}
    unexpected, misshapen, twice = [], [], []
    for name, info in source.tensors.items():
        key = rename(name)
        if key in seen:  # e.g. both spellings of a native name
            twice.append(f"{name} and {seen[key]} (in {info.file.name}) are both {key}")
        seen[key] = name
        parts = by_hf.get(key)
        if parts is None:
            unexpected.append(f"{name} (in {info.file.name})")
            continue
        for part in parts:
            if not _shape_ok(part, info.shape):
                rows = f" (>= {part.min_rows} rows)" if part.min_rows else ""
                misshapen.append(
                    f"{name} (in {info.file.name}): found {list(info.shape)}, expected "
                    f"{list(part.shape)}{rows} for {part.entry.megatron}"
                )
    missing = [name for name in by_hf if name not in seen]
    problems = []
    if missing:
        problems.append(f"missing tensors:{_limited(missing)}")
    if unexpected:
        problems.append(
            f"unexpected tensors (no row of the table reads them):{_limited(unexpected)}"
        )
    if misshapen:
        problems.append(f"wrong shapes:{_limited(misshapen)}")
    if twice:
        problems.append(f"tensors given twice:{_limited(twice)}")
    if problems:
        raise ConversionError(
            f"{source.dir} does not match {what}:\n  "
            + "\n  ".join(problems)
            + "\n  Check that the flavour matches the checkpoint (same family, layer counts and "
            "widths) and that the files are complete."
        )


_Plan = tuple[hf_files.HFSource, list[Entry], Callable[[str], str]]
"""A validated source, the table rows it feeds and its file-name -> table-name renaming."""


def _materialiser(
    plans: list[_Plan],
    ctx: ShapeContext,
    dtype: torch.dtype,
    fresh: dict[str, torch.Tensor] | None = None,
) -> megatron_files.Materialise:
    """Parameter name -> its value, read from just its HF tensors when the writer needs it."""
    rows: dict[str, tuple[hf_files.HFSource, Entry, dict[str, str]]] = {}
    for source, entries, rename in plans:
        file_names = {rename(name): name for name in source.tensors}
        rows.update({e.megatron: (source, e, file_names) for e in entries})

    @torch.no_grad()
    def materialise(name: str) -> torch.Tensor:
        if fresh and name in fresh:
            return fresh[name]
        source, entry, file_names = rows[name]
        parts = [source.read(file_names[hf]) for hf in entry.hf]
        return TRANSFORMS[entry.transform].to_megatron(ctx, *parts).to(dtype)

    return materialise


def _check_covered(tensors: dict[str, torch.Tensor], entries: list[Entry], skip: tuple) -> None:
    covered = {e.megatron for e in entries}
    left = [k for k in tensors if k not in covered and not k.startswith(skip)]
    if left:
        raise AssertionError(f"mapping tables do not cover these model tensors: {left}")


def _save_megatron(
    model: torch.nn.Module,
    out: Path,
    spec: InternVLSpec,
    ctx: ShapeContext,
    info: dict,
    materialise: megatron_files.Materialise,
    log: Log,
) -> None:
    dtype = next(model.parameters()).dtype
    total = sum(t.numel() * t.element_size() for t in megatron_files.model_tensors(model).values())
    log(f"writing dist checkpoint ({_DTYPE_NAMES[dtype]}, {amount(total)})")
    with Progress(total, "to-megatron", log) as progress:
        megatron_files.save(model, out, materialise, progress.advance)
    record = {
        "flavour": spec.name,
        "vision_padded_heads": ctx.vit_padded_heads,
        "dtype": _DTYPE_NAMES[dtype],
        **info,
    }
    (out / CONVERSION_INFO).write_text(json.dumps(record, indent=2) + "\n")


def hf_to_megatron(
    hf_dir: Path | str,
    out_dir: Path | str,
    spec_name: str | None = None,
    hf_layout: str = "auto",
    vision_pad_heads_to: int | None = None,
    dtype: str | torch.dtype | None = None,
    force: bool = False,
    log: Log = _stderr_log,
) -> Path:
    """Convert an InternVL HF checkpoint (original or transformers layout) to a dist checkpoint.

    `spec_name`: a registered flavour, or None to take the model's shape from its config.json
    (any InternVL-architecture checkpoint). `hf_layout`: "auto" (from config.json), "original"
    or "native". `vision_pad_heads_to`: pad the ViT's heads to a multiple of this (e.g. 8 lets
    a 25-head ViT load at TP 1-8). `dtype`: of the saved parameters; default bfloat16 for a
    bf16 source, else float32.
    """
    source = hf_files.HFSource(hf_dir)
    config = hf_config.read_config(source.dir) if hf_layout == "auto" or not spec_name else None
    if spec_name:
        spec = get_spec(spec_name)
    else:
        spec = hf_config.spec_from_config(config, source.dir, name=source.dir.name)
        log(f"model shape from {source.dir / 'config.json'} ({spec.llm_family} LLM)")
    if config is not None and hf_layout == "auto":
        hf_layout, family = hf_config.detect_internvl(config, str(source.dir / "config.json"))
        hf_config.check_family(family, spec, str(source.dir))
    if hf_layout not in HF_LAYOUTS:
        raise ConversionError(f"hf_layout={hf_layout!r}: use 'auto' or one of {HF_LAYOUTS}")
    rename = native_state_dict_name if hf_layout == "native" else (lambda n: n)
    model_dtype = _dtype(dtype) or (
        torch.bfloat16 if source.dtype == torch.bfloat16 else torch.float32
    )
    ctx = ShapeContext.of(spec, _padded_heads(spec, vision_pad_heads_to))
    entries = expand(table_for(hf_layout, spec.llm_family), spec)
    what = f"the {hf_layout} {spec.llm_family} table for flavour {spec.name!r}"
    with staged_output(out_dir, force) as tmp, _one_rank_world():
        model = _build(spec, ctx.vit_padded_heads, model_dtype)
        tensors = megatron_files.model_tensors(model)
        _check_covered(tensors, entries, ())
        _validate(source, _expected_parts(entries, tensors, ctx), rename, what)
        materialise = _materialiser([(source, entries, rename)], ctx, model_dtype)
        info = {"source": str(source.dir), "hf_layout": hf_layout, "spec": spec_to_dict(spec)}
        _save_megatron(model, tmp, spec, ctx, info, materialise, log)
        source.copy_extras(tmp / TOKENIZER_SUBDIR)
    return Path(out_dir)


def pieces_to_megatron(
    vision_dir: Path | str,
    llm_dir: Path | str,
    out_dir: Path | str,
    spec_name: str,
    vision_pad_heads_to: int | None = None,
    dtype: str | torch.dtype | None = None,
    force: bool = False,
    seed: int = 1234,
    log: Log = _stderr_log,
) -> Path:
    """Stage-1 start: an InternViT checkpoint + a Qwen2.5 / InternLM2.5 checkpoint -> InternVL.

    The LLM keeps its tokenizer's rows (padding rows beyond are dropped) and gets InternVL's 9
    special tokens as new embedding and output rows equal to the mean of the old rows; an LLM
    with tied embeddings (no lm_head in the file) gets its output layer from the embedding. The
    projector is freshly initialised (Megatron's init, seeded by `seed`).
    """
    spec = get_spec(spec_name)
    vision = hf_files.HFSource(vision_dir)
    llm = hf_files.HFSource(llm_dir)
    hf_config.check_vision(hf_config.read_config(vision.dir), str(vision.dir / "config.json"))
    llm_config = hf_config.read_config(llm.dir)
    family = hf_config.detect_llm(llm_config, str(llm.dir / "config.json"))
    hf_config.check_family(family, spec, str(llm.dir))
    table = table_for("original", family)
    vision_entries = expand(retarget(table, "vision_model.", ""), spec)
    llm_entries = expand(
        retarget(table, "language_model.", "", transform={"vocab_rows": "vocab_extend"}), spec
    )
    if llm_config.get("tie_word_embeddings"):
        embed, output = llm_entries[0], llm_entries[-1]  # first and last rows of the LLM table
        if output.hf[0] not in llm.tensors:
            llm_entries[-1] = Entry(output.megatron, embed.hf, output.transform)
    model_dtype = _dtype(dtype) or (
        torch.bfloat16 if llm.dtype == torch.bfloat16 else torch.float32
    )
    ctx = ShapeContext.of(spec, _padded_heads(spec, vision_pad_heads_to))
    with staged_output(out_dir, force) as tmp, _one_rank_world():
        model = _build(spec, ctx.vit_padded_heads, model_dtype)
        tensors = megatron_files.model_tensors(model)
        _check_covered(tensors, vision_entries + llm_entries, ("vision_projection.",))
        plans: list[_Plan] = []
        for source, entries, what in (
            (vision, vision_entries, "an InternViT checkpoint (InternVisionModel)"),
            (llm, llm_entries, f"a {family} LLM checkpoint"),
        ):
            by_hf = _expected_parts(entries, tensors, ctx)
            _validate(source, by_hf, lambda n: n, f"{what} for flavour {spec.name!r}")
            plans.append((source, entries, lambda n: n))
        fresh = _fresh_projector(spec, model_dtype, seed)
        materialise = _materialiser(plans, ctx, model_dtype, fresh)
        info = {"source": [str(vision.dir), str(llm.dir)], "hf_layout": "pieces"}
        _save_megatron(model, tmp, spec, ctx, info, materialise, log)
        llm.copy_extras(tmp / TOKENIZER_SUBDIR)
    return Path(out_dir)


# --- export ---------------------------------------------------------------------------------


def _resolve_training_checkpoint(path: Path, log: Log) -> Path:
    """A training run's checkpoints/ folder (or its run folder) -> its latest committed step."""
    from megatron_internvl.checkpoint.distributed import latest_committed

    if (path / "metadata.json").is_file():
        return path
    for root in (path, path / "checkpoints"):
        latest = latest_committed(root)
        if latest is not None:
            log(f"using the latest committed checkpoint {latest}")
            return latest
    return path


def read_conversion_info(ckpt_dir: Path | str) -> dict[str, Any]:
    """The converter's record next to a dist checkpoint ({} for checkpoints saved by training)."""
    path = Path(ckpt_dir) / CONVERSION_INFO
    return json.loads(path.read_text()) if path.is_file() else {}


def _checkpoint_metadata(ckpt_dir: Path) -> dict[str, Any]:
    from megatron.core import dist_checkpointing

    if not (ckpt_dir / "metadata.json").is_file():
        raise ConversionError(
            f"{ckpt_dir}: not a Megatron dist checkpoint (no metadata.json); pass the directory "
            f"dist_checkpointing.save wrote (e.g. .../iter_0001000)"
        )
    with megatron_files.safe_reading():
        return dist_checkpointing.load_tensors_metadata(str(ckpt_dir))


def _check_against_metadata(model: torch.nn.Module, metadata: dict, ckpt_dir: Path, spec) -> None:
    from megatron.core.dist_checkpointing import ShardedTensor
    from megatron.core.dist_checkpointing.mapping import ShardedTensorFactory

    problems = []
    for item in model.sharded_state_dict().values():
        if isinstance(item, ShardedTensorFactory):
            continue  # SwiGLU fc1: checked through its full-tensor shape below
        if not isinstance(item, ShardedTensor):
            continue
        stored = metadata.get(item.key)
        if stored is None:
            problems.append(f"{item.key}: missing")
        elif tuple(stored.global_shape) != tuple(item.global_shape):
            problems.append(
                f"{item.key}: checkpoint has {list(stored.global_shape)}, flavour "
                f"{spec.name!r} needs {list(item.global_shape)}"
            )
    if problems:
        raise ConversionError(
            f"{ckpt_dir} does not hold flavour {spec.name!r}:{_limited(sorted(set(problems)))}\n  "
            f"Pass the flavour the checkpoint was trained as."
        )


def megatron_to_hf(
    ckpt_dir: Path | str,
    out_dir: Path | str,
    spec_name: str | None = None,
    hf_layout: str = "native",
    dtype: str | torch.dtype | None = None,
    max_shard_bytes: int = 4 * 2**30,
    tokenizer_dir: Path | str | None = None,
    force: bool = False,
    log: Log = _stderr_log,
) -> Path:
    """Write a dist checkpoint as an HF checkpoint: safetensors shards, index, config.json.

    `spec_name`: the flavour (default: the one recorded at import). `hf_layout`: "native"
    (transformers' InternVLForConditionalGeneration, with the processor files AutoProcessor
    reads) or "original" (InternVLChatModel's weights and config; no model code and no
    auto_map: load it with InternVL's own code, see the README). `dtype`: of the written
    tensors (default: the checkpoint's). Tokenizer files come from `tokenizer_dir`, else from
    the checkpoint's `hf_tokenizer/` (kept at import).
    """
    ckpt_dir = _resolve_training_checkpoint(Path(ckpt_dir), log)
    if hf_layout not in HF_LAYOUTS:
        raise ConversionError(f"hf_layout={hf_layout!r}: use one of {HF_LAYOUTS}")
    metadata = _checkpoint_metadata(ckpt_dir)
    info = read_conversion_info(ckpt_dir)
    if spec_name is None and "spec" in info:  # saved by training: the exact (resized) shape
        spec = spec_from_dict(info["spec"])
    else:
        spec_name = spec_name or info.get("flavour")
        if spec_name is None:
            raise ConversionError(
                f"{ckpt_dir}: no {CONVERSION_INFO} names the flavour; pass spec_name"
            )
        spec = get_spec(spec_name)
    if _VIT_QKV_KEY not in metadata:
        raise ConversionError(
            f"{ckpt_dir}: no {_VIT_QKV_KEY}; expected an InternVL checkpoint with its ViT"
        )
    # The padded head count is part of the saved shapes: (layers, 3 * heads * head_dim, C).
    vit_padded = metadata[_VIT_QKV_KEY].global_shape[1] // (3 * spec.vision.head_dim)
    ckpt_dtype = metadata["language_model.embedding.word_embeddings.weight"].dtype
    out_dtype = _dtype(dtype) or ckpt_dtype
    ctx = ShapeContext.of(spec, max(vit_padded, spec.vision.num_attention_heads))
    entries = expand(table_for(hf_layout, spec.llm_family), spec)
    file_name = native_file_name if hf_layout == "native" else (lambda n: n)
    with staged_output(out_dir, force) as tmp, _one_rank_world():
        model = _build(spec, ctx.vit_padded_heads, ckpt_dtype)
        _check_against_metadata(model, metadata, ckpt_dir, spec)
        tensors = megatron_files.model_tensors(model)
        _check_covered(tensors, entries, ())
        reader = megatron_files.Reader(model.sharded_state_dict(), ckpt_dir)
        log(f"reading {ckpt_dir} one parameter at a time")

        def read(name: str) -> torch.Tensor:
            return reader.load([name])[name]

        shards = _plan_hf(entries, tensors, ctx, file_name, out_dtype, max_shard_bytes)
        _write_hf(entries, read, ctx, file_name, out_dtype, shards, tmp, log)
        config = (
            hf_config.native_config_dict(spec, _DTYPE_NAMES[out_dtype])
            if hf_layout == "native"
            else hf_config.original_config_dict(spec, _DTYPE_NAMES[out_dtype])
        )
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        extras = Path(tokenizer_dir) if tokenizer_dir else ckpt_dir / TOKENIZER_SUBDIR
        copied = hf_files.copy_extras(extras, tmp) if extras.is_dir() else []
        log(f"copied tokenizer files: {copied or 'none found'}")
        if hf_layout == "native":  # what AutoProcessor reads
            from megatron_internvl.data.chat import DEFAULT_SYSTEM_PROMPT

            hf_files.write_processor_files(
                tmp, spec.vision.image_size, spec.tokens_per_tile, DEFAULT_SYSTEM_PROMPT
            )
    return Path(out_dir)


def _plan_hf(
    entries: list[Entry],
    tensors: dict[str, torch.Tensor],
    ctx: ShapeContext,
    file_name: Callable[[str], str],
    dtype: torch.dtype,
    max_shard_bytes: int,
) -> list[list[tuple[str, tuple[int, ...]]]]:
    """The output shards, each a list of (file name, shape) in writing order, from shapes only."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    shapes: dict[str, tuple[int, ...]] = {}
    for entry in entries:
        meta = torch.empty(tensors[entry.megatron].shape, device="meta")
        for name, t in zip(entry.hf, TRANSFORMS[entry.transform].to_hf(ctx, meta), strict=True):
            shapes[file_name(name)] = tuple(t.shape)
    sizes = [(name, math.prod(shape) * itemsize) for name, shape in shapes.items()]
    return [
        [(name, shapes[name]) for name in names]
        for names in hf_files.plan_shards(sizes, max_shard_bytes)
    ]


@torch.no_grad()
def _write_hf(
    entries: list[Entry],
    read: Callable[[str], torch.Tensor],
    ctx: ShapeContext,
    file_name: Callable[[str], str],
    dtype: torch.dtype,
    shards: list[list[tuple[str, tuple[int, ...]]]],
    out: Path,
    log: Log,
) -> None:
    """Each parameter read, split into its HF tensors and written into its shard at once."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    total = sum(math.prod(shape) * itemsize for shard in shards for _, shape in shard)
    weight_map: dict[str, str] = {}
    writer: hf_files.ShardWriter | None = None
    k = 0  # the shard being written
    with Progress(total, "to-hf", log) as progress:
        for entry in entries:
            outputs = TRANSFORMS[entry.transform].to_hf(ctx, read(entry.megatron))
            for name, t in zip(entry.hf, outputs, strict=True):
                shard = hf_files.shard_name(k + 1, len(shards))
                if writer is None:
                    writer = hf_files.ShardWriter(out / shard, shards[k], dtype)
                writer.write(file_name(name), t.to(dtype))
                progress.advance(t.numel() * itemsize)
                if writer.complete:
                    writer.close()
                    weight_map.update({n: shard for n, _ in shards[k]})
                    size = writer.path.stat().st_size
                    log(f"wrote {k + 1}/{len(shards)} {shard} ({amount(size)})")
                    writer, k = None, k + 1
            del outputs, t  # this parameter is on disk: free it before reading the next
            release_memory()
    hf_files.write_index(out, weight_map, total)

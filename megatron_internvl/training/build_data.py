"""The run's data: the tokenizer, the model shape fitted to it, and each rank's micro-batches.

`data_source` is what the training loop draws from (shards through the loader, or synthetic
rows); `validation_loader` reads the held-out set (`data.valid_shards`) with the same tiling,
tokenization, packing and loss weights, in a fixed order, once per evaluation.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from megatron_internvl.config.schema import RunConfig
from megatron_internvl.data.synthetic import SyntheticRows, SyntheticSpec
from megatron_internvl.models.registry import InternVLSpec


class ShardSource:
    """The shard loader seen as the loop's data source: micro-batches by count, state, and
    (prefetch > 0) a background `Prefetcher` that prepares the next micro-batches (read, tile,
    tokenize, pack, collate) while the current step computes. Its state is the loader's right
    after the last micro-batch handed out, so prefetched but unused rows are neither lost nor
    repeated on resume."""

    def __init__(self, loader: Any, prefetch: int = 0) -> None:
        from megatron_internvl.data.prefetch import Prefetcher

        self.loader = loader
        self.batches = Prefetcher(loader, prefetch) if prefetch > 0 else loader

    def next_microbatches(self, count: int) -> list[dict[str, Any]]:
        return [next(self.batches) for _ in range(count)]

    def state_dict(self) -> dict[str, Any]:
        return self.batches.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.batches.load_state_dict(state)

    def close(self) -> None:
        """Stop the prefetch threads and close the shard files."""
        if self.batches is not self.loader:
            self.batches.close()
        self.loader.close()

    @property
    def fill_rate(self) -> float:
        """Real tokens / row positions so far (padding, layout padding included, is waste)."""
        return self.loader.packing_stats.fill_rate


class RowGroups:
    """Micro-batches of `rows_per_batch` single-row batches of `rows` (synthetic data)."""

    def __init__(self, rows: Any, rows_per_batch: int) -> None:
        self.rows, self.rows_per_batch = rows, rows_per_batch

    def next_microbatches(self, count: int) -> list[dict[str, Any]]:
        rows = self.rows.next_microbatches(count * self.rows_per_batch)
        size = self.rows_per_batch
        return [merge_rows(rows[i : i + size]) for i in range(0, len(rows), size)]

    def state_dict(self) -> dict[str, Any]:
        return self.rows.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rows.load_state_dict(state)


def merge_rows(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Single-row batches ([1, s] each) as one [b, s] batch, cu_seqlens over the b * s tokens."""
    seq = rows[0]["tokens"].size(1)
    images = [r["images"] for r in rows if r.get("images") is not None]
    bounds = [rows[0]["cu_seqlens"][:1]] + [
        r["cu_seqlens"][1:] + b * seq for b, r in enumerate(rows)
    ]
    return {
        **{k: torch.cat([r[k] for r in rows]) for k in ("tokens", "labels", "loss_mask")},
        "position_ids": torch.cat([r["position_ids"] for r in rows]),
        "cu_seqlens": torch.cat(bounds),
        "images": torch.cat(images) if images else None,
        "sample_keys": [key for r in rows for key in r.get("sample_keys", [])],
    }


def load_tokenizer(cfg: RunConfig) -> Any | None:
    if cfg.data.source != "shards":
        return None
    if not cfg.data.tokenizer:
        raise ValueError("data.source=shards needs data.tokenizer (a HF tokenizer directory)")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(cfg.data.tokenizer)


def fit_spec_to_tokenizer(spec: InternVLSpec, tokenizer: Any | None) -> InternVLSpec:
    """Embeddings sized to the tokenizer and its `<IMG_CONTEXT>` id, as InternVL resizes them."""
    if tokenizer is None:
        return spec
    from megatron_internvl.data.chat import IMG_CONTEXT

    image_token_id = tokenizer.convert_tokens_to_ids(IMG_CONTEXT)
    language = dataclasses.replace(spec.language, vocab_size=len(tokenizer))
    return dataclasses.replace(spec, language=language, image_token_id=image_token_id)


def loader_config(cfg: RunConfig, spec: InternVLSpec, **overrides: Any) -> Any:
    """The shard loader's settings for this run (`overrides`: e.g. a finite, unshuffled set)."""
    from megatron_internvl.config.validate import packing_multiples
    from megatron_internvl.data.loader import LoaderConfig
    from megatron_internvl.data.samples import sample_config
    from megatron_internvl.data.tiler import TilerConfig

    return LoaderConfig(
        seq_length=cfg.data.seq_length,
        micro_batch_size=cfg.train.micro_batch,
        pad_to_multiple=packing_multiples(cfg)[0],
        max_tiles_per_row=cfg.data.max_tiles_per_row,
        loss_reduction=cfg.data.loss_reduction,
        tokens_per_tile=spec.tokens_per_tile,
        seed=cfg.train.seed,
        skip_check_after=50,
        max_consecutive_drops=cfg.data.max_consecutive_drops,
        sample=sample_config(cfg.data),
        tiler=TilerConfig(
            image_size=spec.vision.image_size,
            max_num=cfg.data.max_tiles_per_image,
            device_id=torch.cuda.current_device() if torch.cuda.is_available() else None,
        ),
        **overrides,
    )


def shard_datasets(cfg: RunConfig) -> list[Any]:
    """The run's training shard sets (`data.shards`) with their weights and frame ranges."""
    from megatron_internvl.data.loader import DatasetSpec, shard_list
    from megatron_internvl.data.samples import video_frame_ranges
    from megatron_internvl.training.run_dir import shard_set_name

    weights = cfg.data.weights or [1.0] * len(cfg.data.shards)
    if len(weights) != len(cfg.data.shards):
        raise ValueError(
            f"data.weights has {len(weights)} entries for {len(cfg.data.shards)} shard sets"
        )
    frames = video_frame_ranges(cfg.data.video_frames, len(cfg.data.shards))
    return [
        DatasetSpec(shard_set_name(path), shard_list([path]), weight, video_frames)
        for path, weight, video_frames in zip(cfg.data.shards, weights, frames, strict=True)
    ]


def data_source(
    cfg: RunConfig, spec: InternVLSpec, dp_rank: int, dp_size: int, tokenizer: Any = None
) -> Any:
    """This data-parallel rank's source of micro-batches (shards or synthetic rows), with state."""
    if cfg.data.source == "shards":
        from megatron_internvl.data.loader import InternVLLoader

        datasets = shard_datasets(cfg)
        settings = loader_config(cfg, spec)
        if cfg.data.balance:
            from megatron_internvl.data.balanced import BalancedLoader
            from megatron_internvl.training.sample_cost import sample_cost_model

            cost = sample_cost_model(spec, cfg.train.stage)
            rows_per_rank = cfg.train.global_batch // dp_size
            loader = BalancedLoader(
                datasets, tokenizer, settings, dp_rank, dp_size, cost, rows_per_rank
            )
        else:
            loader = InternVLLoader(datasets, tokenizer, settings, dp_rank, dp_size)
        return ShardSource(loader, cfg.data.prefetch)
    if cfg.data.source == "synthetic":
        synthetic = SyntheticSpec(
            vocab_size=spec.language.vocab_size,
            image_token_id=spec.image_token_id,
            tokens_per_tile=spec.tokens_per_tile,
            image_size=spec.vision.image_size,
            seq_length=cfg.data.seq_length,
            text_vocab=cfg.data.synthetic_text_vocab,
        )
        rows = SyntheticRows(synthetic, cfg.train.seed, dp_rank, dp_size)
        return RowGroups(rows, cfg.train.micro_batch) if cfg.train.micro_batch > 1 else rows
    raise ValueError(f"data.source={cfg.data.source!r}; use 'synthetic' or 'shards'")


def validation_loader(
    cfg: RunConfig, spec: InternVLSpec, dp_rank: int, dp_size: int, tokenizer: Any
) -> Any | None:
    """This rank's slice of the held-out set (one pass, fixed order), or None without one."""
    if not cfg.data.valid_shards:
        return None
    from megatron_internvl.data.loader import DatasetSpec, InternVLLoader, shard_list

    held_out = DatasetSpec(name="valid", shards=shard_list(cfg.data.valid_shards))
    settings = loader_config(cfg, spec, shuffle=False, epochs=1)
    return InternVLLoader([held_out], tokenizer, settings, dp_rank, dp_size)

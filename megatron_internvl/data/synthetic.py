"""Generated packed rows with images: a deterministic, resumable stand-in for shards.

Row i of data-parallel rank r is a pure function of (seed, r, i), so the source's whole state is
the next row index. Sub-samples follow one fixed random permutation of the text vocabulary
(token t is followed by perm[t]) so a model can learn them, and carry 0-2 image tiles whose
`<IMG_CONTEXT>` runs the model fills with image tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class SyntheticSpec:
    """What the rows must fit: token ids and image geometry of the model."""

    vocab_size: int
    image_token_id: int
    tokens_per_tile: int
    image_size: int
    seq_length: int
    text_vocab: int | None = None
    """Text ids drawn from [0, text_vocab); None: every id below the image token."""


class SyntheticRows:
    """Endless packed rows (b=1) for one data-parallel rank."""

    def __init__(self, spec: SyntheticSpec, seed: int, dp_rank: int, dp_size: int) -> None:
        self.spec, self.seed, self.dp_rank, self.dp_size = spec, seed, dp_rank, dp_size
        self.next_index = 0
        text_vocab = spec.text_vocab or spec.image_token_id  # ids below it are plain text
        if not 1 < text_vocab <= spec.image_token_id:
            raise ValueError(
                f"data.synthetic_text_vocab={spec.text_vocab}: give 2 to {spec.image_token_id} "
                "(the text ids below the image token)"
            )
        self.perm = torch.randperm(text_vocab, generator=torch.Generator().manual_seed(seed))

    def _row(self, index: int) -> dict[str, Any]:
        spec = self.spec
        gen = torch.Generator().manual_seed(
            hash((self.seed, self.dp_rank, self.dp_size, index)) % 2**63
        )
        quarter = spec.seq_length // 4
        lengths = [quarter, 2 * quarter, spec.seq_length - 3 * quarter]
        tokens, positions, tiles = [], [], 0
        for n in lengths:
            seq = torch.empty(n, dtype=torch.long)
            seq[0] = torch.randint(0, len(self.perm), (1,), generator=gen)
            for i in range(1, n):
                seq[i] = self.perm[seq[i - 1]]
            n_tiles = int(torch.randint(0, 3, (1,), generator=gen))
            run = min(n_tiles * spec.tokens_per_tile, n - 2)
            n_tiles = run // spec.tokens_per_tile
            seq[1 : 1 + n_tiles * spec.tokens_per_tile] = spec.image_token_id
            tiles += n_tiles
            tokens.append(seq)
            positions.append(torch.arange(n))
        row = torch.cat(tokens)
        labels = torch.roll(row, -1)  # pre-shifted: labels[t] is the target at position t
        loss_mask = (row != spec.image_token_id) & (labels != spec.image_token_id)
        bounds = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
        loss_mask[bounds[1:] - 1] = False  # last token of a sample predicts nothing
        return {
            "tokens": row.unsqueeze(0),
            "labels": labels.unsqueeze(0),
            "loss_mask": loss_mask.float().unsqueeze(0),
            "position_ids": torch.cat(positions).unsqueeze(0),
            "cu_seqlens": bounds,
            "images": (
                torch.randn(tiles, 3, spec.image_size, spec.image_size, generator=gen)
                if tiles
                else None
            ),
            "sample_keys": [f"synthetic/{self.dp_rank}/{index}/{j}" for j in range(3)],
        }

    def next_microbatches(self, count: int) -> list[dict[str, Any]]:
        rows = [self._row(self.next_index + i) for i in range(count)]
        self.next_index += count
        return rows

    def state_dict(self) -> dict[str, int]:
        return {"next_index": self.next_index, "dp_rank": self.dp_rank, "dp_size": self.dp_size}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if (state["dp_rank"], state["dp_size"]) != (self.dp_rank, self.dp_size):
            raise ValueError(
                f"synthetic data state was saved by DP rank {state['dp_rank']} of "
                f"{state['dp_size']}, not {self.dp_rank} of {self.dp_size}; resume with the "
                "same data-parallel size"
            )
        self.next_index = state["next_index"]

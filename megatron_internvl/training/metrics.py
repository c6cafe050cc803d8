"""Console progress and TensorBoard scalars of a run (written by global rank 0 only)."""

from __future__ import annotations

import os
from pathlib import Path

import psutil
import torch

# Dense (no sparsity) BF16 tensor-core peak of one GPU, TFLOP/s, from NVIDIA's datasheets, by
# device-name fragment (first match wins), for MFU when the recipe states none.
_PEAK_TFLOPS = {"H100 PCIe": 756.0, "H100": 989.4, "H200": 989.4, "A100": 312.0, "B200": 2250.0}


def device_peak_tflops() -> float | None:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((peak for key, peak in _PEAK_TFLOPS.items() if key in name), None)


def memory_gb() -> float:
    """Peak device memory allocated on GPUs; resident set size of this process on CPU."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return psutil.Process(os.getpid()).memory_info().rss / 2**30


class MetricsLogger:
    """Every step: accumulate; every `every` steps: print a line and write TensorBoard scalars."""

    def __init__(self, tensorboard_dir: Path | None, every: int, active: bool) -> None:
        self.every, self.active = max(every, 1), active
        self.writer = None
        if active and tensorboard_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(tensorboard_dir))
        self.skipped_total = 0

    def step(
        self,
        step: int,
        *,
        loss: float | None,
        lr: float,
        grad_norm: float | None,
        skipped: bool,
        seconds: float,
        samples: int,
        tokens: int,
        flops: float,
        world_size: int,
        peak_tflops: float | None,
        fill_rate: float | None = None,
        balance: dict[str, float] | None = None,
    ) -> None:
        """`balance`: the step's data-parallel balance (`data.balance`): max/mean rank cost
        as dealt and as the stream order would have dealt it, and the deals kept unbalanced."""
        self.skipped_total += int(skipped)
        if not self.active or not self.due(step):
            return
        tflops_per_gpu = flops / seconds / world_size / 1e12
        peak = peak_tflops or device_peak_tflops()
        scalars = {
            "train/loss": loss,
            "train/lr": lr,
            "train/grad_norm": grad_norm,
            "train/skipped_steps": float(self.skipped_total),
            "throughput/samples_per_s": samples / seconds,
            "throughput/tokens_per_s": tokens / seconds,
            "throughput/model_tflops_per_gpu": tflops_per_gpu,
            "throughput/mfu": tflops_per_gpu / peak if peak else None,
            "memory/gb": memory_gb(),
            "data/packing_fill_rate": fill_rate,
            **{f"data/balance_{k}": v for k, v in (balance or {}).items()},
        }
        if self.writer is not None:
            for name, value in scalars.items():
                if value is not None:
                    self.writer.add_scalar(name, value, step)
            self.writer.flush()
        loss_text = "skipped (non-finite)" if skipped else f"{loss:.4f}"
        norm_text = f"{grad_norm:.3f}" if grad_norm is not None else "-"
        mfu = f" | MFU {scalars['throughput/mfu']:.1%}" if scalars["throughput/mfu"] else ""
        mfu += f" | packed {fill_rate:.1%}" if fill_rate is not None else ""
        if balance:
            mfu += (
                f" | rank cost max/mean {balance['max_over_mean']:.3f} "
                f"(stream order {balance['stream_max_over_mean']:.3f})"
            )
        print(
            f"step {step:6d} | loss {loss_text} | lr {lr:.3e} | grad norm {norm_text} | "
            f"{tokens / seconds:,.0f} tok/s | {tflops_per_gpu:.4f} TFLOP/s/GPU{mfu} | "
            f"mem {scalars['memory/gb']:.2f} GB",
            flush=True,
        )

    def due(self, step: int) -> bool:
        """Whether step `step` is logged (every `every` steps, and the first)."""
        return step % self.every == 0 or step == 1

    def validation(self, step: int, loss: float | None) -> None:
        """The held-out loss evaluated after optimizer step `step` (`valid/loss`)."""
        if not self.active:
            return
        if self.writer is not None and loss is not None:
            self.writer.add_scalar("valid/loss", loss, step)
            self.writer.flush()
        text = f"{loss:.4f}" if loss is not None else "- (no supervised token)"
        print(f"step {step:6d} | validation loss {text}", flush=True)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()

"""Training-step throughput: our InternVL (Megatron-Core, TE or local layers) vs transformers.

One process, one device. For each requested precision it builds our model, times `--steps`
optimizer steps after `--warmup` (CUDA events on a GPU, wall clock on a CPU), frees it, then
times transformers' model of the same size on the same tokens and tiles (`--baseline`).

  # GPU, the LLM of an 8B-class stack (8 of InternLM2.5-7B's 32 layers), 8192 packed tokens
  python benchmarks/train_step.py --flavour internvl2_5_8b --part llm --llm-layers 8 \\
      --seq-length 8192 --samples-per-row 4 --precision bf16,fp8-tensorwise,fp8-delayed
  # CPU smoke test (what CI runs)
  python benchmarks/train_step.py --flavour tiny_qwen_300m_style --seq-length 128 \\
      --tiles-per-sample 2 --precision fp32 --backend local --steps 2 --warmup 1

What is compared: a row of `--seq-length` tokens holds `--samples-per-row` samples of equal
length, each with `--tiles-per-sample` image tiles (256 `<IMG_CONTEXT>` tokens per tile at
InternVL 2.5's sizes) and text. Ours trains it as one packed (THD) row, as our loader does;
transformers gets the same samples as a [samples, length] batch (it has no packing with SDPA),
so both do the same attention work. Stage 2 (everything trains).

- ours: bf16 parameters with fp32 main gradients and fp32 Adam master weights (Megatron's mixed
  precision); FP8 rows run the GEMMs of TE layers in FP8 with the named scaling recipe.
- transformers: fp32 parameters under `torch.autocast(bfloat16)` (what Trainer's bf16=True does),
  SDPA attention, fused AdamW (Trainer's default); gradient checkpointing when `--recompute`
  is not none; logits and cross-entropy over every token (labels -100 where we mask).
- ours, as training runs it: the output layer and cross-entropy only on tokens that carry loss
  (models/language.py's SupervisedLogitsGPTModel: same loss and gradients), Adam on torch's
  fused kernel when on the CPU (training/build_optimizer.py).

`--rounds` repeats the measurement with the models interleaved (each round builds and times
every model in turn), for machines shared with other jobs: judge by the ratios. On a CPU,
each round also splits the step into forward (to the loss), backward (with gradient
finalization) and optimizer (zeroing, clipping, Adam), printed per model under the table;
`--profile` prints one step's top ops of each model, also by input shape with FLOPs.

Columns: step time (mean of timed steps; the median over rounds, and the best round),
tokens/s, model TFLOP/s per GPU (training/flops.py: matmuls only, recomputation not counted),
MFU = model TFLOP/s / the GPU's dense BF16 peak (FP8 rows too, so the columns compare), peak
memory allocated (GPU only), and ours / baseline (medians, and best / best).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import statistics
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch

from megatron_internvl.config.precision import PrecisionConfig
from megatron_internvl.models.registry import InternVLSpec, get_spec
from megatron_internvl.training.flops import llm_forward_flops, training_flops
from megatron_internvl.training.metrics import device_peak_tflops

PRECISIONS = {
    "fp32": PrecisionConfig("float32"),
    "bf16": PrecisionConfig("bfloat16"),
    "fp8-delayed": PrecisionConfig("bfloat16", "delayed"),
    "fp8-tensorwise": PrecisionConfig("bfloat16", "tensorwise"),
}


@dataclasses.dataclass(frozen=True)
class Workload:
    spec: InternVLSpec
    part: str  # "internvl" or "llm"
    seq_length: int
    samples_per_row: int
    tiles_per_sample: int
    microbatches: int

    @property
    def sample_length(self) -> int:
        return self.seq_length // self.samples_per_row

    @property
    def tiles_per_row(self) -> int:
        return self.samples_per_row * self.tiles_per_sample if self.part == "internvl" else 0

    def flops_per_step(self) -> float:
        lengths = [self.sample_length] * self.samples_per_row
        if self.part == "llm":
            return self.microbatches * 3 * llm_forward_flops(self.spec, lengths)
        return self.microbatches * training_flops(self.spec, lengths, self.tiles_per_row)

    def tokens_per_step(self) -> int:
        return self.microbatches * self.seq_length


def make_rows(work: Workload, device: torch.device, seed: int = 0) -> list[dict[str, Any]]:
    """Packed rows: each sample is [tiles x 256 <IMG_CONTEXT>, text], labels = next token."""
    spec, gen = work.spec, torch.Generator().manual_seed(seed)
    n, image_run = work.sample_length, work.tiles_per_sample * spec.tokens_per_tile
    if work.part == "internvl" and image_run >= n - 1:
        raise SystemExit(
            f"{work.tiles_per_sample} tiles x {spec.tokens_per_tile} tokens do not fit samples "
            f"of {n} tokens: raise --seq-length or lower --samples-per-row / --tiles-per-sample"
        )
    rows = []
    for _ in range(work.microbatches):
        samples = torch.randint(0, spec.image_token_id, (work.samples_per_row, n), generator=gen)
        if work.part == "internvl":
            samples[:, 1 : 1 + image_run] = spec.image_token_id
        labels = torch.roll(samples, -1, dims=1)
        mask = ((samples != spec.image_token_id) & (labels != spec.image_token_id)).float()
        mask[:, -1] = 0
        size = spec.vision.image_size
        tiles = work.tiles_per_row
        rows.append(
            {
                "tokens": samples.reshape(1, -1),
                "labels": labels.reshape(1, -1),
                "loss_mask": mask.reshape(1, -1),
                "position_ids": torch.arange(n).repeat(work.samples_per_row).unsqueeze(0),
                "cu_seqlens": torch.arange(0, work.seq_length + 1, n, dtype=torch.int32),
                "images": torch.randn(tiles, 3, size, size, generator=gen) if tiles else None,
            }
        )
    return [{k: v.to(device) if torch.is_tensor(v) else v for k, v in r.items()} for r in rows]


PHASES = ("forward", "backward", "optimizer")


class Phases(dict):
    """Wall-clock seconds per phase of the steps a model ran (CPU only: on a GPU the host runs
    ahead of the kernels, and syncing to split the phases would slow the step it measures)."""

    def __init__(self, enabled: bool) -> None:
        super().__init__()
        self.enabled = enabled

    def add(self, phase: str, began: float, ended: float | None = None) -> float:
        """Adds `ended` (default: now) - `began` to `phase`; returns `ended`."""
        ended = time.perf_counter() if ended is None else ended
        if self.enabled:
            self[phase] = self.get(phase, 0.0) + ended - began
        return ended


class Timer:
    """Device-side step timing on a GPU (CUDA events), wall clock on a CPU."""

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda

    def __call__(
        self, step: Callable[[], None], phases: Phases, warmup: int, steps: int
    ) -> tuple[float, dict[str, float]]:
        """(seconds per step, seconds per step of each phase) over the timed steps."""
        for _ in range(warmup):
            step()
        phases.clear()
        if self.cuda:
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(steps):
                step()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end) / 1000 / steps, {}
        began = time.perf_counter()
        for _ in range(steps):
            step()
        return (time.perf_counter() - began) / steps, {k: v / steps for k, v in phases.items()}


Maker = Callable[[Phases], tuple[Callable[[], None], int]]


def ours_step(
    work: Workload,
    precision: PrecisionConfig,
    backend: str,
    recompute: str,
    rows: list,
    phases: Phases,
) -> tuple[Callable[[], None], int]:
    """(one optimizer step, parameter count) for our model on this process's one-rank world,
    built as training builds it (training/build_optimizer.py's optimizer). The count leaves
    out the vocabulary padding's rows (masked, see LanguageConfig), so it is comparable with
    transformers'. Phases: forward (up to the loss), backward (with Megatron's gradient
    finalization), optimizer (zeroing, clipping, Adam)."""
    from megatron.core.optimizer import OptimizerConfig

    from megatron_internvl.models.internvl import build_internvl_chunks
    from megatron_internvl.parallel import runtime
    from megatron_internvl.parallel.layout import ParallelLayout
    from megatron_internvl.training.build_optimizer import megatron_optimizer
    from megatron_internvl.training.loop import recompute_overrides
    from megatron_internvl.training.step import (
        forward_backward,
        internvl_forward_step,
        wrap_with_ddp,
    )

    chunks = build_internvl_chunks(
        work.spec,
        ParallelLayout(),
        work.seq_length,
        backend=backend,
        precision=precision,
        with_vision=work.part == "internvl",
        **recompute_overrides(None if recompute == "none" else recompute),
    )
    for chunk in chunks:
        runtime.adapt_model_config(chunk.config)
    model = wrap_with_ddp(chunks, chunks[0].config)
    bf16 = precision.dtype == "bfloat16"
    optimizer = megatron_optimizer(
        OptimizerConfig(
            optimizer="adam",
            lr=1e-5,
            bf16=bf16,
            params_dtype=torch.bfloat16 if bf16 else torch.float32,
            clip_grad=1.0,
        ),
        model,
    )

    forward = Phases(enabled=True)  # this step's forward time, up to each loss

    def timed_forward(data: Any, chunk: torch.nn.Module) -> tuple[torch.Tensor, Any]:
        began = time.perf_counter()
        output, loss_func = internvl_forward_step(data, chunk)

        def loss_then_stamp(output_tensor: torch.Tensor) -> Any:
            result = loss_func(output_tensor)  # the schedule runs backward right after this
            forward.add("forward", began)
            return result

        return output, loss_then_stamp

    def step() -> None:
        began = time.perf_counter()
        optimizer.zero_grad()
        began = phases.add("optimizer", began)
        forward.clear()
        forward_backward(
            timed_forward,
            iter(rows),
            model,
            num_microbatches=len(rows),
            seq_length=work.seq_length,
            micro_batch_size=1,
        )
        ended = time.perf_counter()
        phases.add("forward", 0.0, forward["forward"])
        phases.add("backward", began + forward["forward"], ended)
        began = time.perf_counter()
        optimizer.step()
        phases.add("optimizer", began)

    lang = work.spec.language
    padding = 2 * (lang.padded_vocab_size - lang.vocab_size) * lang.hidden_size  # embed + output
    return step, sum(p.numel() for chunk in chunks for p in chunk.parameters()) - padding


def baseline_step(
    work: Workload,
    precision: PrecisionConfig,
    recompute: str,
    rows: list,
    device: torch.device,
    phases: Phases,
) -> tuple[Callable[[], None], int]:
    """(one optimizer step, parameter count) for transformers' model of the same size: what
    its Trainer does (fused AdamW, gradient clipping), phases as ours."""
    import transformers

    from megatron_internvl.checkpoint.hf_config import native_config

    config = native_config(work.spec, "float32")
    for sub in (config, config.text_config, config.vision_config):
        sub._attn_implementation = "sdpa"
    with device:  # initialise on the GPU: CPU init of billions of weights takes minutes
        if work.part == "llm":
            model = transformers.AutoModelForCausalLM.from_config(config.text_config)
        else:
            model = transformers.InternVLForConditionalGeneration(config)
    model.train()
    if recompute != "none":
        model.gradient_checkpointing_enable()
    # Trainer's default optimizer since torch 2.8 is "adamw_torch_fused", on any device.
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    autocast = precision.dtype == "bfloat16"
    batches = []
    for row in rows:
        n = work.sample_length
        batch = {
            "input_ids": row["tokens"].reshape(-1, n),
            # transformers shifts labels itself: give it the inputs, masked where we mask.
            "labels": torch.where(
                torch.roll(row["loss_mask"].reshape(-1, n), 1, dims=1) > 0,
                row["tokens"].reshape(-1, n),
                torch.full_like(row["tokens"].reshape(-1, n), -100),
            ),
        }
        if row["images"] is not None:
            batch["pixel_values"] = row["images"]
        batches.append(batch)

    def step() -> None:
        began = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        began = phases.add("optimizer", began)
        for batch in batches:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                loss = model(**batch).loss
            began = phases.add("forward", began)
            (loss / len(batches)).backward()
            began = phases.add("backward", began)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        phases.add("optimizer", began)

    return step, sum(p.numel() for p in model.parameters())


def gpu_peak_tflops(override: float | None) -> tuple[float | None, str]:
    if override:
        return override, f"{override} (--peak-tflops)"
    if not torch.cuda.is_available():
        return None, "n/a on CPU"
    peak = device_peak_tflops()
    name = torch.cuda.get_device_name()
    if peak is None:
        return None, f"unknown for {name!r}: pass --peak-tflops"
    return peak, f"{peak} TFLOP/s ({name}, dense BF16)"


def time_one(
    make: Maker, timer: Timer, args: argparse.Namespace
) -> tuple[float, int, float | None, dict[str, float]]:
    """(seconds per step, parameter count, peak GiB, seconds per step of each phase) of a
    freshly built model; frees it after."""
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    phases = Phases(enabled=not cuda)
    step, params = make(phases)
    seconds, phase_seconds = timer(step, phases, args.warmup, args.steps)
    memory = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    del step  # frees the model and optimizer it holds before the next one is built
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return seconds, params, memory, phase_seconds


def summarize(
    times: list[float],
    phases: list[dict[str, float]],
    params: int,
    memory: float | None,
    work: Workload,
    peak: float | None,
) -> dict[str, Any]:
    """One table row from a model's per-round step times: the median, and the best; the
    median of each phase's per-round time."""
    seconds = statistics.median(times)
    tflops = work.flops_per_step() / seconds / 1e12
    return {
        "step_s": seconds,
        "best_s": min(times),
        "rounds_s": times,
        "phases_s": {
            name: statistics.median(p[name] for p in phases) for name in PHASES if name in phases[0]
        },
        "tokens_s": work.tokens_per_step() / seconds,
        "tflops": tflops,
        "mfu": tflops / peak if peak else None,
        "memory_gib": memory,
        "params": params,
    }


def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


BASELINE = "transformers (sdpa)"


def baseline_kind(precision: str) -> str:
    """The transformers row a precision compares with (bf16 autocast for bf16 and FP8)."""
    return "bf16" if PRECISIONS[precision].dtype == "bfloat16" else "fp32"


def interleaved_rounds(
    makers: dict[tuple[str, str], Maker],
    timer: Timer,
    args: argparse.Namespace,
    work: Workload,
    peak: float | None,
) -> list[dict[str, Any]]:
    """Each round builds and times every model in turn, so that load from other jobs on a
    shared machine hits them alike; a row per model with the median and best of its rounds."""
    times: dict[tuple[str, str], list[float]] = {key: [] for key in makers}
    phases: dict[tuple[str, str], list[dict[str, float]]] = {key: [] for key in makers}
    sizes: dict[tuple[str, str], tuple[int, float | None]] = {}
    for round_ in range(args.rounds):
        for key, make in makers.items():
            seconds, params, memory, phase_seconds = time_one(make, timer, args)
            times[key].append(seconds)
            phases[key].append(phase_seconds)
            split = " ".join(f"{k} {v:.2f}" for k, v in phase_seconds.items())
            print(f"round {round_ + 1}/{args.rounds}: {key[0]} {key[1]} {seconds:.4f} s {split}")
            sizes[key] = (params, memory)
    return [
        {
            "model": model,
            "precision": precision,
            **summarize(times[key], phases[key], *sizes[key], work, peak),
        }
        for key in makers
        for model, precision in [key]
    ]


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--flavour", default="internvl2_5_8b", help="registry flavour")
    parser.add_argument("--part", choices=("internvl", "llm"), default="internvl")
    parser.add_argument("--llm-layers", type=int, help="LLM depth (default: the flavour's)")
    parser.add_argument("--vit-layers", type=int, help="ViT depth (default: the flavour's)")
    parser.add_argument("--seq-length", type=int, default=8192, help="tokens per packed row")
    parser.add_argument("--samples-per-row", type=int, default=4)
    parser.add_argument("--tiles-per-sample", type=int, default=4)
    parser.add_argument("--microbatches", type=int, default=1, help="rows per optimizer step")
    parser.add_argument(
        "--precision", default="bf16", help=f"comma-separated, of {', '.join(PRECISIONS)}"
    )
    parser.add_argument("--backend", choices=("te", "local"), default="te")
    parser.add_argument("--recompute", choices=("none", "selective", "full"), default="none")
    parser.add_argument(
        "--warmup", type=int, help="untimed steps per model and round (default: GPU 3, CPU 1)"
    )
    parser.add_argument(
        "--steps", type=int, help="timed steps per model and round (default: GPU 10, CPU 2)"
    )
    parser.add_argument(
        "--rounds", type=int, default=1, help="interleaved rounds; median and best reported"
    )
    parser.add_argument("--no-baseline", dest="baseline", action="store_false")
    parser.add_argument("--peak-tflops", type=float, help="dense BF16 peak of this GPU")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="top CUDA kernels (CPU ops on a CPU) of one step of each model, first precision",
    )
    parser.add_argument("--json", type=Path, help="also write the results here (gpu_report.py)")
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available()
    args.warmup = args.warmup if args.warmup is not None else (3 if cuda else 1)
    args.steps = args.steps if args.steps is not None else (10 if cuda else 2)

    precisions = args.precision.split(",")
    unknown = [p for p in precisions if p not in PRECISIONS]
    if unknown:
        parser.error(f"unknown precision {unknown}; use {list(PRECISIONS)}")
    spec = get_spec(args.flavour)
    spec = dataclasses.replace(
        spec,
        language=dataclasses.replace(
            spec.language, num_layers=args.llm_layers or spec.language.num_layers
        ),
        vision=dataclasses.replace(
            spec.vision, num_layers=args.vit_layers or spec.vision.num_layers
        ),
    )
    work = Workload(
        spec,
        args.part,
        args.seq_length,
        args.samples_per_row,
        args.tiles_per_sample,
        args.microbatches,
    )
    from megatron_internvl.parallel import runtime

    timer = Timer(cuda)
    peak, peak_text = gpu_peak_tflops(args.peak_tflops)
    with runtime.single_process():
        device = torch.device(torch.cuda.current_device()) if cuda else torch.device("cpu")
        rows = make_rows(work, device)
        ours_model = f"ours ({args.backend})"
        makers = {}
        for name in precisions:
            precision = PRECISIONS[name]
            makers[(ours_model, name)] = partial(
                ours_step, work, precision, args.backend, args.recompute, rows
            )
        if args.baseline:
            for name in precisions:  # transformers has no FP8: its bf16 row serves those
                theirs = partial(
                    baseline_step, work, PRECISIONS[name], args.recompute, rows, device
                )
                makers.setdefault((BASELINE, baseline_kind(name)), theirs)
        results = interleaved_rounds(makers, timer, args, work, peak)
        if args.profile:
            profile_step(makers[(ours_model, precisions[0])], cuda)
            if args.baseline:
                profile_step(makers[(BASELINE, baseline_kind(precisions[0]))], cuda)
    baselines = {r["precision"]: r for r in results if r["model"] == BASELINE}
    for row in results:
        base = baselines.get(baseline_kind(row["precision"]))
        if base is not None and row is not base:
            row["vs_baseline"] = base["step_s"] / row["step_s"]
            row["vs_baseline_best"] = base["best_s"] / row["best_s"]
    print_table(args, work, results, peak_text)
    if args.json:
        write_json(args.json, work, results, peak)
    return results


def write_json(
    path: Path, work: Workload, results: list[dict[str, Any]], peak: float | None
) -> None:
    """The table as data, with what produced it: `benchmarks/gpu_report.py` reads it."""
    cuda = torch.cuda.is_available()
    record = {
        "device": torch.cuda.get_device_name() if cuda else "CPU",
        "torch": torch.__version__,
        "peak_tflops": peak,
        "flavour": work.spec.name,
        "part": work.part,
        "llm_layers": work.spec.language.num_layers,
        "vit_layers": work.spec.vision.num_layers,
        "tokens_per_step": work.tokens_per_step(),
        "tflop_per_step": work.flops_per_step() / 1e12,
        "results": results,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1) + "\n")


def profile_step(make: Maker, cuda: bool) -> None:
    """Where one step's time goes: the 15 most expensive CUDA kernels, or CPU ops by self time
    (then by input shape, with their FLOPs: which GEMMs dominate)."""
    from torch.profiler import ProfilerActivity, profile

    step, _ = make(Phases(enabled=False))
    step()
    activity, sort = (ProfilerActivity.CUDA, "cuda_time_total") if cuda else (
        ProfilerActivity.CPU, "self_cpu_time_total"
    )  # fmt: skip
    if cuda:
        torch.cuda.synchronize()
    with profile(activities=[activity], record_shapes=not cuda, with_flops=not cuda) as prof:
        step()
        if cuda:
            torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by=sort, row_limit=15))
    if not cuda:
        by_shape = prof.key_averages(group_by_input_shape=True)
        print(
            by_shape.table(
                sort_by=sort, row_limit=12, max_name_column_width=30, max_shapes_column_width=70
            )
        )
    del step
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()


def print_table(
    args: argparse.Namespace, work: Workload, results: list[dict[str, Any]], peak_text: str
) -> None:
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    spec = work.spec
    shape = (
        f"ViT layers={spec.vision.num_layers} | {work.microbatches} x {work.seq_length}-token "
        f"rows of {work.samples_per_row} samples x {work.tiles_per_sample} tiles "
        f"({work.tiles_per_row} tiles/row)"
        if work.part == "internvl"
        else f"{work.microbatches} x {work.seq_length}-token rows of {work.samples_per_row} "
        "text samples"
    )
    print(
        f"\n{device}: {spec.name} part={work.part} LLM layers={spec.language.num_layers} "
        f"(vocab {spec.language.vocab_size} padded to {spec.language.padded_vocab_size}) "
        f"{shape} | recompute={args.recompute} | "
        f"{work.flops_per_step() / 1e12:.2f} model TFLOP/step | peak {peak_text}"
    )
    print(
        f"{args.rounds} round(s) of {args.warmup} warm-up + {args.steps} timed steps, models "
        "interleaved; step s = median of rounds, best = fastest"
    )
    header = (
        f"{'model':<22}{'precision':<16}{'params M':>10}{'step s':>9}{'best s':>9}{'tokens/s':>11}"
        f"{'TFLOP/s':>9}{'MFU':>7}{'mem GiB':>9}{'ours/baseline':>15}{'best/best':>11}"
    )
    print(header)
    print("-" * len(header))
    for r in results:
        mfu = "-" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
        ratio = "-" if r.get("vs_baseline") is None else f"{r['vs_baseline']:.2f}x"
        best = "-" if r.get("vs_baseline_best") is None else f"{r['vs_baseline_best']:.2f}x"
        print(
            f"{r['model']:<22}{r['precision']:<16}{r['params'] / 1e6:>10.1f}{r['step_s']:>9.4f}"
            f"{r['best_s']:>9.4f}{r['tokens_s']:>11.0f}{r['tflops']:>9.3f}{mfu:>7}"
            f"{fmt(r['memory_gib'], '.1f'):>9}{ratio:>15}{best:>11}"
        )
    print_phases(results)


def print_phases(results: list[dict[str, Any]]) -> None:
    """Seconds per step in forward, backward and optimizer (median of rounds; CPU only)."""
    rows = [r for r in results if r["phases_s"]]
    if not rows:
        return
    print(f"\nper phase, s/step (median of rounds){'':<8}" + "".join(f"{p:>11}" for p in PHASES))
    for r in rows:
        name = f"{r['model']} {r['precision']}"
        print(f"{name:<45}" + "".join(f"{r['phases_s'].get(p, 0.0):>11.3f}" for p in PHASES))


if __name__ == "__main__":
    main()

"""Enumerate InternVL layouts, refuse those that cannot run or fit (saying why), rank the rest.

Dimensions: TP (divides heads, KV groups and the padded vocabulary; inside a node), PP with the
first stage's LLM layer count (stage 0 also runs the ViT), CP (seq divisible by 2 x CP),
recomputation (none, full = the LLM's layers, full+vit = also the ViT's), micro-batch, and the
ViT's own TP (`parallel.vision_tensor`, a divisor of TP); SP is on whenever TP > 1 (it only
saves memory). `Plan.future` names what a layout would need that the code lacks (nothing today;
`--future` in tools/plan.py lists such layouts when there are).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from megatron_internvl.models.registry import InternVLSpec
from megatron_internvl.planner.model import Hardware, Layout, Prediction, Workload, predict
from megatron_internvl.planner.params import param_table


@dataclass(frozen=True)
class Plan:
    layout: Layout
    prediction: Prediction

    @property
    def future(self) -> list[str]:
        """What the code lacks to run this layout (empty: runnable today)."""
        return []

    def overrides(self) -> list[str]:
        """The recipe overrides that run this layout."""
        lay = self.layout
        recompute = {"none": "null", "full": "full", "full+vit": "full+vit"}[lay.recompute]
        items = [
            f"parallel.tensor={lay.tensor}",
            f"parallel.pipeline={lay.pipeline}",
            f"parallel.first_stage_layers={lay.first_stage_layers or 'null'}",
            f"parallel.context={lay.context}",
            f"parallel.sequence_parallel={'true' if lay.tensor > 1 else 'false'}",
            f"model.recompute={recompute}",
            f"train.micro_batch={lay.micro_batch}",
        ]
        if lay.vision_tensor != lay.tensor:
            items.insert(1, f"parallel.vision_tensor={lay.vision_tensor}")
        return items


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _structural_refusal(spec: InternVLSpec, lay: Layout, work: Workload, hw: Hardware):
    """Why `lay` cannot run at all, or None."""
    lang = spec.language
    if lay.tensor > hw.gpus_per_node:
        return "TP crosses nodes"
    if lang.num_attention_heads % lay.tensor or lang.num_query_groups % lay.tensor:
        return "TP does not divide the LLM's heads / KV groups"
    if lang.padded_vocab_size % lay.tensor:
        return "TP does not divide the padded vocabulary"
    if work.gpus % lay.model_parallel:
        return "TP x PP x CP does not divide the GPUs"
    if work.seq_length % (2 * lay.context) or work.seq_length % lay.tensor:
        return "seq_length does not divide over 2 x CP / TP"
    dp = work.gpus // lay.model_parallel
    if work.global_batch % (dp * lay.micro_batch):
        return "global batch not a multiple of micro_batch x DP"
    return None


def candidates(spec: InternVLSpec, work: Workload, future: bool) -> list[Layout]:
    """Every layout in the search space (structurally valid or not)."""
    layers = spec.language.num_layers
    out = []
    for tp in _divisors(64):  # beyond a node's 8 GPUs: refused with the reason
        for vt in _divisors(tp):
            for pp in (1, 2, 4, 8, 16):
                firsts = [None] if pp == 1 else _first_stage_options(layers, pp)
                for first in firsts:
                    for cp in (1, 2, 4, 8):
                        for rc in ("none", "full", "full+vit"):
                            for mb in (1, 2):
                                out.append(Layout(tp, vt, pp, first, cp, rc, mb))
    return out


def _first_stage_options(layers: int, pp: int) -> list[int | None]:
    """Stage-0 layer counts that leave an even split of the rest (None: an even split); never
    more than the even share, since stage 0 also runs the ViT."""
    options = [f for f in range(1, layers // pp + 1) if (layers - f) % (pp - 1) == 0]
    even = [None] if layers % pp == 0 else []
    return even + [f for f in options if f != layers // pp or layers % pp]


def search(
    spec: InternVLSpec, work: Workload, hw: Hardware, future: bool = False
) -> tuple[list[Plan], Counter]:
    """Layouts that fit, fastest first, and refusal reasons with their counts."""
    refused: Counter = Counter()
    plans = []
    tables = {}
    for lay in candidates(spec, work, future):
        reason = _structural_refusal(spec, lay, work, hw)
        if reason:
            refused[reason] += 1
            continue
        if lay.vision_tensor not in tables:
            tables[lay.vision_tensor] = param_table(spec, lay.vision_tensor)
        prediction = predict(spec, tables[lay.vision_tensor], lay, work, hw)
        peak = max(prediction.memory_gb)
        if peak > hw.gpu_memory_gb:
            stage = prediction.memory_gb.index(peak)
            what = "ViT activations" if stage == 0 else "LLM stage"
            refused[f"over {hw.gpu_memory_gb:g} GB (largest: stage {stage}, {what})"] += 1
            continue
        plans.append(Plan(lay, prediction))
    plans.sort(key=lambda plan: (plan.prediction.step_s, max(plan.prediction.memory_gb)))
    return _best_first_stage(plans), refused


def _best_first_stage(plans: list[Plan]) -> list[Plan]:
    """Keep one first_stage_layers per (TP, vision TP, PP, CP, recompute, micro-batch): the
    fastest (plans arrive fastest first)."""
    seen, kept = set(), []
    for plan in plans:
        key = plan.layout.without_first_stage()
        if key not in seen:
            seen.add(key)
            kept.append(plan)
    return kept

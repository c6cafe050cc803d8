"""On a GPU, the Transformer Engine backend computes what the local backend computes.

Same weights, same batch: bf16 losses and gradients of the TE model equal the local model's
within bf16 tolerance, for packed (THD) rows and for plain [b, s] batches; FP8 stays within FP8
tolerance, with the ViT's 17-token tiles padded to 32 for FP8 and the padding masked.
"""

from __future__ import annotations

import pytest
import torch

from megatron_internvl.config.precision import PrecisionConfig
from megatron_internvl.data.synthetic import SyntheticRows, SyntheticSpec
from megatron_internvl.models.internvl import build_internvl_chunks
from megatron_internvl.models.registry import get_spec
from megatron_internvl.models.specs import local_layer_spec
from megatron_internvl.parallel.layout import ParallelLayout
from megatron_internvl.training.step import internvl_forward_step

pytestmark = pytest.mark.gpu
SEQ = 64


def _te_key(local_key: str) -> str:
    """A local-backend parameter name as the TE backend names it (norms fused into linears)."""
    for ours, theirs in local_layer_spec().submodules.sharded_state_dict_keys_map.items():
        local_key = local_key.replace(f".{ours}", f".{theirs}")
    return local_key


def _models(flavour: str, te_precision: PrecisionConfig):
    pytest.importorskip("transformer_engine")
    spec = get_spec(flavour)
    torch.manual_seed(0)
    [local] = build_internvl_chunks(
        spec, ParallelLayout(), SEQ, backend="local", precision=PrecisionConfig("bfloat16")
    )
    [te] = build_internvl_chunks(spec, ParallelLayout(), SEQ, backend="te", precision=te_precision)
    missing, unexpected = te.load_state_dict(
        {_te_key(k): v for k, v in local.state_dict().items()}, strict=False
    )
    assert not unexpected, unexpected
    assert all(k.endswith("_extra_state") for k in missing), missing
    return spec, local.eval(), te.eval()


def _rows(spec, packed: bool):
    rows = SyntheticRows(
        SyntheticSpec(
            spec.language.vocab_size,
            spec.image_token_id,
            spec.tokens_per_tile,
            spec.vision.image_size,
            SEQ,
        ),
        seed=3,
        dp_rank=0,
        dp_size=1,
    ).next_microbatches(2)
    if packed:
        return rows[0]
    # Two rows as one [2, s] batch, each a single causal sequence.
    batch = {k: torch.cat([r[k] for r in rows]) for k in ("tokens", "labels", "loss_mask")}
    batch["position_ids"] = torch.arange(SEQ).repeat(2, 1)
    images = [r["images"] for r in rows if r["images"] is not None]
    batch["images"] = torch.cat(images) if images else None
    return batch


def _loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    output, loss_func = internvl_forward_step(iter([batch]), model)
    loss_sum, tokens, _ = loss_func(output)
    loss = loss_sum / tokens
    loss.backward()
    grads = {n: p.grad.float().flatten() for n, p in model.named_parameters() if p.grad is not None}
    return float(loss), output.float(), grads


@pytest.mark.parametrize("packed", [True, False], ids=["thd", "bshd"])
@pytest.mark.parametrize("flavour", ["tiny_qwen_300m_style", "tiny_internlm_6b_style"])
def test_te_bf16_equals_local_bf16(single_rank, flavour, packed):
    spec, local, te = _models(flavour, PrecisionConfig("bfloat16"))
    batch = _rows(spec, packed)
    loss_local, tokens_local, grads_local = _loss_and_grads(local, batch)
    loss_te, tokens_te, grads_te = _loss_and_grads(te, batch)
    assert loss_te == pytest.approx(loss_local, rel=1e-2)
    torch.testing.assert_close(tokens_te, tokens_local, atol=0.1, rtol=0.02)
    assert set(grads_te) == {_te_key(n) for n in grads_local}
    for name, grad in grads_local.items():
        other = grads_te[_te_key(name)]
        if grad.norm() > 1e-6:
            cosine = torch.nn.functional.cosine_similarity(grad, other, dim=0)
            assert cosine > 0.99, f"{name}: gradient cosine {cosine:.4f}"


@pytest.mark.parametrize("recipe", ["delayed", "tensorwise"])
def test_fp8_stays_close_to_bf16_with_masked_vit_padding(single_rank, recipe):
    spec, local, te = _models("tiny_qwen_300m_style", PrecisionConfig("bfloat16", recipe))
    assert te.vision_model.seq_pad_multiple == 16  # 17 tokens per tile -> 32 for FP8 GEMMs
    pixels = torch.randn(4, 3, 56, 56, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        features_local = local.vision_model(pixels).float().flatten()
        features_fp8 = te.vision_model(pixels).float().flatten()
    cosine = torch.nn.functional.cosine_similarity(features_local, features_fp8, dim=0)
    assert cosine > 0.98, f"FP8 ViT features vs bf16: cosine {cosine:.4f}"
    batch = _rows(spec, packed=True)
    loss_local, _, _ = _loss_and_grads(local, batch)
    loss_fp8, _, _ = _loss_and_grads(te, batch)
    assert loss_fp8 == pytest.approx(loss_local, rel=3e-2)

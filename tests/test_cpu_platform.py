"""The CPU platform module: each piece is needed on a CPU-only host, works, and is inert on CUDA."""

from __future__ import annotations

import pytest
import torch

from megatron_internvl.parallel import cpu_platform
from tests.harness import run_on_ranks


def _outcome(call) -> str:
    try:
        call()
    except Exception as error:  # the piece's absence shows up as some error from Megatron/torch
        return f"{type(error).__name__}: {error}"
    return "ok"


def _megatron_calls() -> dict:
    """Megatron-Core calls that hit one CUDA assumption each."""
    from megatron.core import parallel_state
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
    from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32
    from megatron.core.optimizer.grad_scaler import ConstantGradScaler
    from megatron.core.tensor_parallel import get_cuda_rng_tracker, model_parallel_cuda_manual_seed

    def rng_tracker():
        model_parallel_cuda_manual_seed(123)
        with get_cuda_rng_tracker().fork():
            torch.rand(3)

    def clip():
        param = torch.nn.Parameter(torch.ones(4))
        param.grad = torch.full((4,), 2.0)
        clip_grad_by_total_norm_fp32([param], max_norm=1.0, total_norm=4.0)
        assert torch.allclose(param.grad, torch.full((4,), 0.5), atol=1e-5), param.grad

    def streams():
        stream = torch.cuda.Stream()
        with torch.cuda.stream(stream):
            torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()

    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel()
    return {
        "current_device": lambda: RotaryEmbedding(kv_channels=8, rotary_percent=1.0),
        "rng_tracker": rng_tracker,
        "cuda_tensors": lambda: ConstantGradScaler(1.0),
        "streams": streams,
        "type_checks": clip,
    }


def pieces_without_and_with() -> dict:
    cpu_platform.uninstall()
    without = {name: _outcome(call) for name, call in _megatron_calls().items()}
    cpu_platform.install()
    with_platform = {name: _outcome(call) for name, call in _megatron_calls().items()}

    # The tracker's fork draws from the model-parallel stream (seed + 2718 + tp_rank) on CPU,
    # and the default stream continues afterwards as if the fork never happened.
    from megatron.core.tensor_parallel import get_cuda_rng_tracker, model_parallel_cuda_manual_seed

    model_parallel_cuda_manual_seed(123)
    torch.manual_seed(0)
    before = torch.rand(2)
    with get_cuda_rng_tracker().fork():
        forked = torch.rand(2)
    after = torch.rand(2)
    torch.manual_seed(0)
    return {
        "without": without,
        "with": with_platform,
        "fork_matches_tp_seed": torch.equal(
            forked, torch.rand(2, generator=torch.Generator().manual_seed(123 + 2718))
        ),
        "default_stream_continues": torch.equal(torch.cat([before, after]), torch.rand(4)),
    }


def test_each_piece_is_needed_and_works():
    [result] = run_on_ranks(pieces_without_and_with, 1)
    for name, outcome in result["without"].items():
        assert outcome != "ok", f"{name}: Megatron call unexpectedly worked without the platform"
    assert result["with"] == {name: "ok" for name in result["without"]}
    assert result["fork_matches_tp_seed"] and result["default_stream_continues"]


def test_redirects_cuda_tensors_and_reports_cuda_types():
    installed_here = cpu_platform.install()
    try:
        tensor = torch.zeros(3, device="cuda")
        assert tensor.device.type == "cpu"
        assert tensor.cuda() is tensor
        assert tensor.to("cuda").device.type == "cpu"
        assert tensor.type() == "torch.cuda.FloatTensor"
        assert tensor.to(torch.bfloat16).type() == "torch.cuda.BFloat16Tensor"
        assert tensor.long().type() == "torch.LongTensor"  # only float types Megatron checks
        assert torch.tensor([1, 2], pin_memory=True).tolist() == [1, 2]
    finally:
        if installed_here:
            cpu_platform.uninstall()
    with pytest.raises((AssertionError, RuntimeError)):
        torch.zeros(1, device="cuda")


def test_uninstall_restores_torch_cuda():
    original = torch.cuda.current_device
    cpu_platform.install()
    assert torch.cuda.current_device() == torch.device("cpu")
    cpu_platform.uninstall()
    assert torch.cuda.current_device is original
    assert not cpu_platform.is_active()


def test_inert_when_cuda_is_available(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    original = torch.cuda.current_device
    assert cpu_platform.install() is False
    assert not cpu_platform.is_active()
    assert torch.cuda.current_device is original

    class Config:
        batch_p2p_comm = True

    assert cpu_platform.adapt_model_config(Config()).batch_p2p_comm is True


@pytest.mark.gpu
def test_inert_on_a_real_gpu():
    assert cpu_platform.install() is False
    assert torch.zeros(1, device="cuda").is_cuda

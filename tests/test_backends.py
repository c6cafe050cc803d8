"""Backends and precision are chosen by configuration and refused with actionable errors."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from megatron_internvl.config.precision import PrecisionConfig
from megatron_internvl.models.internvl import build_internvl_chunks
from megatron_internvl.models.registry import get_spec
from megatron_internvl.models.specs import get_backend
from megatron_internvl.parallel.layout import ParallelLayout

HAVE_TE = importlib.util.find_spec("transformer_engine") is not None


def test_fp8_on_the_local_backend_is_refused(single_rank):
    precision = PrecisionConfig(dtype="bfloat16", fp8_recipe="tensorwise")
    with pytest.raises(ValueError, match="needs the Transformer Engine backend; set backend='te'"):
        build_internvl_chunks(
            get_spec("tiny_qwen_300m_style"), ParallelLayout(), 32, precision=precision
        )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"fp8_recipe": "fp4"}, "use one of"),
        ({"fp8_recipe": "delayed"}, "set precision.dtype=bfloat16"),
        ({"dtype": "float16"}, "use 'float32' or 'bfloat16'"),
    ],
)
def test_invalid_precision_is_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PrecisionConfig(**kwargs)


def test_bf16_precision_builds_bf16_parameters_everywhere(single_rank):
    [model] = build_internvl_chunks(
        get_spec("tiny_internlm_6b_style"),
        ParallelLayout(),
        32,
        precision=PrecisionConfig(dtype="bfloat16"),
    )
    dtypes = {p.dtype for p in model.parameters()}
    assert dtypes == {torch.bfloat16}
    assert model.vision_model.seq_pad_multiple == 1  # no FP8: no alignment padding


def test_unknown_backend_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown backend 'apex'.*\['local', 'te'\]"):
        get_backend("apex")


@pytest.mark.skipif(HAVE_TE, reason="Transformer Engine is installed")
def test_te_backend_without_te_says_how_to_get_it():
    with pytest.raises(ImportError, match=r"pip install -e \.\[gpu\]"):
        get_backend("te").layer()


@pytest.mark.gpu
def test_te_backend_builds_the_model_with_fp8_padding(single_rank):
    pytest.importorskip("transformer_engine")
    [model] = build_internvl_chunks(
        get_spec("tiny_internlm_6b_style"),
        ParallelLayout(),
        32,
        backend="te",
        precision=PrecisionConfig(dtype="bfloat16", fp8_recipe="tensorwise"),
    )
    assert model.vision_model.seq_pad_multiple == 16

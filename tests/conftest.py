"""Shared pytest configuration: the `gpu` marker skips cleanly where CUDA is absent."""

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def single_rank():
    """This process as a one-rank gloo world with Megatron's groups and the CPU platform.

    Torn down at the end of the module, so modules that test the platform itself stay clean.
    """
    from megatron_internvl.parallel import runtime

    with runtime.single_process():
        yield

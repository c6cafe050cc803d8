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
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from megatron_internvl.parallel import cpu_platform

    installed = cpu_platform.install()
    owns_world = not dist.is_initialized()
    if owns_world:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    parallel_state.initialize_model_parallel()
    model_parallel_cuda_manual_seed(1234)
    yield
    parallel_state.destroy_model_parallel()
    if owns_world:
        dist.destroy_process_group()
    if installed:
        cpu_platform.uninstall()

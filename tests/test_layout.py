"""ParallelLayout rejects impossible layouts with messages that say what to change."""

from __future__ import annotations

import pytest

from megatron_internvl.parallel.layout import ParallelLayout


def test_data_parallel_is_what_the_world_leaves():
    assert ParallelLayout(tensor=2, pipeline=2).data_parallel(16) == 4
    assert ParallelLayout(context=2).data_parallel(2) == 1


def test_layout_that_does_not_divide_the_world_lists_valid_products():
    with pytest.raises(ValueError, match=r"= 6 does not divide the world size 8.*\[1, 2, 4, 8\]"):
        ParallelLayout(tensor=2, pipeline=3).data_parallel(8)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"tensor": 0}, "tensor=0 must be >= 1"),
        ({"sequence_parallel": True}, "sequence_parallel=True needs tensor > 1"),
        ({"pipeline": 1, "virtual_pipeline": 2}, "virtual_pipeline=2 needs pipeline >= 2"),
    ],
)
def test_invalid_layouts_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ParallelLayout(**kwargs)


def test_layout_name_is_stable():
    assert (
        str(ParallelLayout(tensor=2, pipeline=2, virtual_pipeline=2, sequence_parallel=True))
        == "tp2-pp2-cp1-vpp2-sp"
    )

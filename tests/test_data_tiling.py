"""Tiling picks InternVL's grid (ties included), plans row-major crops and caps tiles per image."""

from __future__ import annotations

import numpy as np
import pytest

from megatron_internvl.data.tiling import candidate_grids, choose_grid, per_image_cap, tile_plan


def reference_grid(width, height, min_num=1, max_num=12, image_size=448):
    """InternVL's `dynamic_preprocess` grid choice, transcribed from internvl_chat."""
    aspect_ratio = width / height
    target_ratios = set(
        (i, j)
        for n in range(min_num, max_num + 1)
        for i in range(1, n + 1)
        for j in range(1, n + 1)
        if i * j <= max_num and i * j >= min_num
    )
    target_ratios = sorted(target_ratios, key=lambda x: x[0] * x[1])
    best_ratio_diff = float("inf")
    best_ratio = (1, 1)
    area = width * height
    for ratio in target_ratios:
        target_aspect_ratio = ratio[0] / ratio[1]
        ratio_diff = abs(aspect_ratio - target_aspect_ratio)
        if ratio_diff < best_ratio_diff:
            best_ratio_diff = ratio_diff
            best_ratio = ratio
        elif ratio_diff == best_ratio_diff:
            if area > 0.5 * image_size * image_size * ratio[0] * ratio[1]:
                best_ratio = ratio
    return best_ratio


def random_sizes(count, seed, max_area=4_000_000):
    """Sizes whose aspect ratios span 20x500 .. 4000x300 (log-uniform), areas up to max_area."""
    rng = np.random.default_rng(seed)
    log_ratio = rng.uniform(np.log(20 / 500), np.log(4000 / 300), count)
    area = rng.uniform(20 * 500, max_area, count)
    widths = np.maximum(1, np.round(np.sqrt(area * np.exp(log_ratio)))).astype(int)
    heights = np.maximum(1, np.round(np.sqrt(area / np.exp(log_ratio)))).astype(int)
    return list(zip(widths.tolist(), heights.tolist(), strict=True))


def test_candidate_grids_are_every_grid_within_bounds_sorted_by_tile_count():
    grids = candidate_grids(1, 12)
    brute = {(i, j) for i in range(1, 13) for j in range(1, 13) if i * j <= 12}
    assert set(grids) == brute and len(grids) == len(brute) == 35
    counts = [i * j for i, j in grids]
    assert counts == sorted(counts)
    assert all(3 <= i * j <= 6 for i, j in candidate_grids(3, 6))


@pytest.mark.parametrize(("min_num", "max_num"), [(0, 4), (5, 4)])
def test_candidate_grids_refuse_empty_ranges(min_num, max_num):
    with pytest.raises(ValueError, match="min_num <= max_num"):
        candidate_grids(min_num, max_num)


@pytest.mark.parametrize(("min_num", "max_num"), [(1, 12), (1, 6), (1, 1), (2, 9)])
def test_choose_grid_matches_internvl_on_random_sizes(min_num, max_num):
    sizes = [*random_sizes(2000, seed=max_num), (20, 500), (4000, 300), (448, 448)]
    for width, height in sizes:
        assert choose_grid(width, height, min_num, max_num) == reference_grid(
            width, height, min_num, max_num
        ), (width, height)


@pytest.mark.parametrize(
    ("size", "grid"),
    [
        # Square images tie between (1,1), (2,2), (3,3); area 896^2 = 802816 exceeds
        # 0.5 * 448^2 * 4 = 401408 but not 0.5 * 448^2 * 9 = 903168, so (2,2).
        ((896, 896), (2, 2)),
        # 448^2 = 200704 does not exceed 401408: the tie keeps (1,1).
        ((448, 448), (1, 1)),
        # Ratio 2: (2,1) and (4,2) tie ((6,3) has 18 > 12 tiles); 2e6 px > 802816 =
        # 0.5 * 448^2 * 8, so (4,2).
        ((2000, 1000), (4, 2)),
        # 5e5 px < 802816 = 0.5 * 448^2 * 8: stays (2,1).
        ((1000, 500), (2, 1)),
        # No exact candidate: 3.6 is closer to 4 (4,1) than to 3 (3,1).
        ((3600, 1000), (4, 1)),
        # A very tall strip: the tallest grid, (1,12).
        ((20, 4000), (1, 12)),
    ],
)
def test_choose_grid_hand_derived_cases(size, grid):
    assert choose_grid(*size) == grid


def test_tile_plan_resizes_to_the_grid_and_cuts_row_major():
    plan = tile_plan(1300, 900)  # ratio 1.44 -> (3, 2)
    assert plan.grid == (3, 2) == reference_grid(1300, 900)
    assert plan.resize_wh == (3 * 448, 2 * 448)
    assert plan.boxes == (
        (0, 0, 448, 448),
        (448, 0, 896, 448),
        (896, 0, 1344, 448),
        (0, 448, 448, 896),
        (448, 448, 896, 896),
        (896, 448, 1344, 896),
    )
    assert plan.thumbnail and plan.num_tiles == 7


def test_tile_plan_boxes_match_internvl_crop_formula_and_tile_the_image():
    for width, height in random_sizes(200, seed=7):
        plan = tile_plan(width, height, image_size=336)
        target_width, target_height = plan.resize_wh
        blocks = plan.grid[0] * plan.grid[1]
        # InternVL's box for block i, verbatim.
        expected = tuple(
            (
                (i % (target_width // 336)) * 336,
                (i // (target_width // 336)) * 336,
                ((i % (target_width // 336)) + 1) * 336,
                ((i // (target_width // 336)) + 1) * 336,
            )
            for i in range(blocks)
        )
        assert plan.boxes == expected
        covered = sum((r - left) * (b - top) for left, top, r, b in plan.boxes)
        assert covered == target_width * target_height


def test_single_tile_has_no_thumbnail_and_thumbnail_can_be_turned_off():
    plan = tile_plan(500, 480)
    assert plan.grid == (1, 1) and not plan.thumbnail and plan.num_tiles == 1
    plan = tile_plan(2000, 500, use_thumbnail=False)
    assert plan.grid == (4, 1) and not plan.thumbnail and plan.num_tiles == 4


@pytest.mark.parametrize(
    ("max_tiles", "num_images", "cap"), [(48, 1, 48), (48, 5, 9), (12, 20, 1), (6, 6, 1)]
)
def test_per_image_cap(max_tiles, num_images, cap):
    assert per_image_cap(max_tiles, num_images) == cap


def test_per_image_cap_refuses_zero_images():
    with pytest.raises(ValueError, match="num_images must be >= 1"):
        per_image_cap(48, 0)

"""InternVL's dynamic tiling as pure functions on image sizes (no pixels).

An image of `width` x `height` is resized to a grid of `cols` x `rows` square tiles of
`image_size` pixels, the grid whose aspect ratio `cols / rows` is closest to the image's; when
more than one tile results, a thumbnail of the whole image is appended. This mirrors
`dynamic_preprocess` / `find_closest_aspect_ratio` of InternVL's `internvl_chat`, tie rule
included, so the DALI pipeline and any reference can share one definition.
"""

from __future__ import annotations

from dataclasses import dataclass

Grid = tuple[int, int]
"""(cols, rows): tiles across the width, tiles down the height."""


def candidate_grids(min_num: int = 1, max_num: int = 12) -> list[Grid]:
    """All grids (cols, rows) with min_num <= cols * rows <= max_num, in InternVL's order.

    The order matters for ties. InternVL builds a set and sorts it by tile count; Python's sort
    is stable, so grids with equal counts keep the set's iteration order. Tuples of small ints
    hash deterministically (no hash randomisation), so rebuilding the same set reproduces it.
    """
    if min_num < 1 or max_num < min_num:
        raise ValueError(
            f"tiling: need 1 <= min_num <= max_num, got min_num={min_num}, max_num={max_num}"
        )
    grids = {
        (i, j)
        for n in range(min_num, max_num + 1)
        for i in range(1, n + 1)
        for j in range(1, n + 1)
        if min_num <= i * j <= max_num
    }
    return sorted(grids, key=lambda g: g[0] * g[1])


def choose_grid(
    width: int, height: int, min_num: int = 1, max_num: int = 12, image_size: int = 448
) -> Grid:
    """The (cols, rows) grid InternVL picks for a `width` x `height` image.

    Closest aspect ratio wins; on an exact tie a later (larger) grid replaces the current one
    when the image area exceeds half the grid's pixel area, as `find_closest_aspect_ratio` does.
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"tiling: image size must be positive, got {width}x{height}")
    aspect_ratio = width / height
    area = width * height
    best_diff = float("inf")
    best: Grid = (1, 1)
    for grid in candidate_grids(min_num, max_num):
        diff = abs(aspect_ratio - grid[0] / grid[1])
        if diff < best_diff:
            best_diff, best = diff, grid
        elif diff == best_diff and area > 0.5 * image_size * image_size * grid[0] * grid[1]:
            best = grid
    return best


@dataclass(frozen=True)
class TilePlan:
    """How one image becomes tiles: resize to `resize_wh`, cut `boxes`, maybe add a thumbnail."""

    grid: Grid
    """(cols, rows) of the chosen grid."""
    resize_wh: tuple[int, int]
    """(width, height) the whole image is resized to: (cols * image_size, rows * image_size)."""
    boxes: tuple[tuple[int, int, int, int], ...]
    """Crop boxes (left, upper, right, lower) in the resized image, row-major."""
    thumbnail: bool
    """True when a image_size x image_size thumbnail of the whole image follows the tiles."""

    @property
    def num_tiles(self) -> int:
        """Tiles the image contributes, thumbnail included."""
        return len(self.boxes) + int(self.thumbnail)


def tile_plan(
    width: int,
    height: int,
    min_num: int = 1,
    max_num: int = 12,
    image_size: int = 448,
    use_thumbnail: bool = True,
) -> TilePlan:
    """The resize target, row-major crop boxes and thumbnail flag for a `width` x `height` image."""
    cols, rows = choose_grid(width, height, min_num, max_num, image_size)
    boxes = tuple(
        (c * image_size, r * image_size, (c + 1) * image_size, (r + 1) * image_size)
        for r in range(rows)
        for c in range(cols)
    )
    return TilePlan(
        grid=(cols, rows),
        resize_wh=(cols * image_size, rows * image_size),
        boxes=boxes,
        thumbnail=use_thumbnail and len(boxes) > 1,
    )


def per_image_cap(max_tiles: int, num_images: int) -> int:
    """Tile budget per image when a sample holds `num_images` images: max(1, max_tiles // n)."""
    if num_images < 1:
        raise ValueError(f"tiling: num_images must be >= 1, got {num_images}")
    return max(1, max_tiles // num_images)

"""The neighbourhood of every patch (docs/method.md section 3) and the teacher's choice of positives among it
(section 4): the k neighbours whose raw features are most cosine-similar to the patch's own.

Patches are indexed row-major on the `(h, w)` grid of a view (`p = row * w + col`, the order in which ViT flattens
them; a Swin's last stage is read the same way).
"""

from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn.functional as F


# ---------------------------------------------------------------------------------------------------------------------
# Neighbourhood table (docs/method.md section 3): the candidate positives of every patch
# ---------------------------------------------------------------------------------------------------------------------
def neighborhood_offsets(window: int) -> list[tuple[int, int]]:
    """(row, col) offsets of a `window` x `window` square around a patch, the patch itself excluded, row-major."""
    radius = window // 2
    return [
        (dr, dc)
        for dr in range(-radius, radius + 1)
        for dc in range(-radius, radius + 1)
        if (dr, dc) != (0, 0)
    ]


@lru_cache(maxsize=64)
def _neighbor_table_cpu(height: int, width: int, window: int | str) -> torch.Tensor:
    num_patches = height * width
    index = torch.arange(num_patches)
    if window == "all":
        # every other patch: row p lists 0..N-1 without p
        table = index.repeat(num_patches, 1)
        keep = ~torch.eye(num_patches, dtype=torch.bool)
        return table[keep].view(num_patches, num_patches - 1)
    rows, cols = index // width, index % width
    columns = [
        ((rows + dr) % height) * width + (cols + dc) % width for dr, dc in neighborhood_offsets(window)
    ]
    return torch.stack(columns, dim=1)


def build_neighbor_table(
    height: int, width: int, window: int | str = 3, device: torch.device | str | None = None
) -> torch.Tensor:
    """Neighbour indices of every patch of an `height` x `width` grid, as a `(N, M)` LongTensor.

    Patches are indexed row-major (`p = row * width + col`, the order in which ViT flattens them). For an odd
    `window`, the M = window**2 - 1 neighbours are the cells of the window around p except p, with wrap-around at
    the borders (rows modulo `height`, columns modulo `width`: a torus). `window="all"` lists every other patch
    (M = N - 1). On small grids the wrapped window can visit a cell twice; the table keeps such duplicates, as a
    torus does.
    """
    if window != "all" and (not isinstance(window, int) or window < 3 or window % 2 == 0):
        raise ValueError(f'window must be an odd int >= 3 or "all", got {window!r}.')
    if height < 1 or width < 1:
        raise ValueError(f"Empty patch grid {height}x{width}.")
    return _neighbor_table_on(height, width, window, torch.device(device if device is not None else "cpu"))


@lru_cache(maxsize=64)
def _neighbor_table_on(height: int, width: int, window: int | str, device: torch.device) -> torch.Tensor:
    # one copy per device: a host-to-GPU copy every step would make the host wait for the GPU's queue
    return _neighbor_table_cpu(height, width, window).to(device)


# ---------------------------------------------------------------------------------------------------------------------
# Positive matching (docs/method.md section 4): the teacher keeps the k most similar neighbours
# ---------------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def select_positive_neighbors(
    patch_features: torch.Tensor, grid: tuple[int, int], num_positives: int, window: int | str = 3
) -> torch.Tensor:
    """The `num_positives` neighbours most cosine-similar to each patch (docs/method.md section 4).

    Args:
        patch_features: `(B, N, D)` raw patch features (teacher, before the output norm), N = h * w row-major.
        grid: `(h, w)` patch grid of the view.
        num_positives: k.
        window: odd window side (wrap-around neighbourhood) or `"all"`.

    Returns:
        `(B, N, k)` LongTensor of patch indices into the same view. The order among the k is not meaningful.
    """
    height, width = grid
    batch, num_patches, dim = patch_features.shape
    if num_patches != height * width:
        raise ValueError(f"{num_patches} patch tokens do not form a {height}x{width} grid.")
    table = build_neighbor_table(height, width, window, device=patch_features.device)  # (N, M)
    if num_positives > table.shape[1]:
        raise ValueError(
            f"num_positives (k={num_positives}) exceeds the {table.shape[1]} neighbours available on a "
            f"{height}x{width} grid."
        )
    normed = F.normalize(patch_features.float(), dim=-1)
    if window == "all":
        # in fp32 also under autocast, which would run the product in bf16 / fp16 and reorder close neighbours
        with torch.autocast(normed.device.type, enabled=False):
            similarity = torch.bmm(normed, normed.transpose(1, 2))  # (B, N, N)
        neighbor_similarity = similarity.gather(2, table.unsqueeze(0).expand(batch, -1, -1))
    else:
        # One shifted copy of the grid per offset: O(M * B * N * D) time and O(B * N * D) extra memory, instead of
        # materialising a (B, N, M, D) gather. roll(-offset)[r, c] == x[(r + dr) % h, (c + dc) % w].
        grid_features = normed.view(batch, height, width, dim)
        neighbor_similarity = torch.stack(
            [
                (grid_features * torch.roll(grid_features, shifts=(-dr, -dc), dims=(1, 2)))
                .sum(-1)
                .view(batch, -1)
                for dr, dc in neighborhood_offsets(window)
            ],
            dim=-1,
        )  # (B, N, M), same column order as the table
    top = neighbor_similarity.topk(num_positives, dim=-1).indices  # (B, N, k) columns of the table
    return table.unsqueeze(0).expand(batch, -1, -1).gather(2, top)


__all__ = ["build_neighbor_table", "neighborhood_offsets", "select_positive_neighbors"]

"""Semi-supervised video object segmentation by label propagation on frozen patch features.

The protocol of DINO / SelfPatch (docs/method.md section 12, reference: DINO's
`eval_video_segmentation.py`; its settings: `selfpatch_hf.evaluation.configs.PropagationConfig`):

1. frames are resized so that the short side is `short_side` (480) and the long side is floored to a
   multiple of `size_multiple` (64); a frame whose short side is below `short_side` keeps it unless `upscale`
   (DINO's script enlarges it; DAVIS 480p frames are unchanged either way); features are the last-layer patch
   tokens, L2-normalised;
2. the context of a target frame is the first frame (with its ground-truth mask, one-hot at patch
   resolution) and the `n_last_frames` (7) most recent frames with their soft predicted masks;
3. affinity exp(cos / temperature) (temperature 0.1) between each target patch and every context patch
   within +-`neighborhood` (12) patches in both directions; the `topk` (5) largest affinities per target
   patch over all context frames are kept and normalised to sum to 1 (a softmax over the kept logits);
4. the soft labels of the kept patches are averaged with those weights, upsampled bilinearly by the patch
   size, each channel min-max normalised (the reference code's `norm_mask`), and the argmax is resized to
   the original frame size with nearest-neighbour interpolation.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from selfpatch_hf.evaluation.configs import PropagationConfig
from selfpatch_hf.evaluation.features import PatchFeatureExtractor, image_to_tensor


def protocol_size(height: int, width: int, config: PropagationConfig, patch_size: int) -> tuple[int, int]:
    """Network input size of a frame: short side `short_side` (at most the frame's own unless `config.upscale`),
    long side floored to `size_multiple`.

    Both sides are finally floored to a multiple of the patch size (a no-op for 480 and patch 8 or 16).
    """
    short, multiple = config.short_side, config.size_multiple
    if not config.upscale:
        short = min(short, height, width)
    if height <= width:
        new_h, new_w = short, int((short * width / height) // multiple * multiple)
    else:
        new_h, new_w = int((short * height / width) // multiple * multiple), short
    new_h, new_w = max(new_h, multiple), max(new_w, multiple)
    new_h, new_w = new_h - new_h % patch_size, new_w - new_w % patch_size
    if new_h == 0 or new_w == 0:
        raise ValueError(f"short_side {short} is smaller than the patch size {patch_size}.")
    return new_h, new_w


def window_mask(h: int, w: int, radius: int, device: torch.device | str = "cpu") -> torch.Tensor | None:
    """(h*w, h*w) boolean mask: True where two patches are within `radius` rows and columns (None: no limit)."""
    if radius <= 0 or (radius >= h - 1 and radius >= w - 1):
        return None
    rows = torch.arange(h, device=device).repeat_interleave(w)
    cols = torch.arange(w, device=device).repeat(h)
    return ((rows[:, None] - rows[None, :]).abs() <= radius) & (
        (cols[:, None] - cols[None, :]).abs() <= radius
    )


def propagate_labels(
    target_features: torch.Tensor,
    context_features: torch.Tensor,
    context_labels: torch.Tensor,
    config: PropagationConfig,
    neighborhood_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Soft labels of one target frame from its context frames.

    target_features: (N, C) L2-normalised patch features of the target frame.
    context_features: (T, N, C) L2-normalised features of the T context frames (same grid).
    context_labels: (T, N, K) soft labels of the context patches.
    neighborhood_mask: (N, N) boolean window (see `window_mask`) or None for no spatial restriction.
    Returns (N, K) propagated soft labels.
    """
    num_context, num_patches, _ = context_features.shape
    num_labels = context_labels.shape[-1]
    topk = min(config.topk, num_context * num_patches)
    flat_labels = context_labels.reshape(num_context * num_patches, num_labels)
    output = target_features.new_empty(target_features.shape[0], num_labels)
    for start in range(0, target_features.shape[0], config.query_chunk):
        stop = min(start + config.query_chunk, target_features.shape[0])
        # (n, T, N): cosine similarities of the chunk's target patches with all context patches
        logits = (
            torch.einsum("nc,tmc->ntm", target_features[start:stop], context_features) / config.temperature
        )
        if neighborhood_mask is not None:
            logits = logits.masked_fill(~neighborhood_mask[start:stop, None, :], float("-inf"))
        values, indices = logits.flatten(1).topk(topk, dim=1)  # top-k over all context frames jointly
        weights = torch.softmax(values, dim=1)  # exp(cos / T) normalised to sum 1 over the kept patches
        output[start:stop] = torch.einsum("nk,nkl->nl", weights, flat_labels[indices])
    return output


def _normalize_channels(soft: torch.Tensor) -> torch.Tensor:
    # (K, H, W): min-max per channel, leaving channels whose maximum is <= 0 untouched (reference norm_mask)
    flat = soft.flatten(1)
    minimum, maximum = flat.min(dim=1).values, flat.max(dim=1).values
    scaled = (flat - minimum[:, None]) / (maximum - minimum).clamp_min(1e-12)[:, None]
    keep = (maximum > 0)[:, None]
    return torch.where(keep, scaled, flat).view_as(soft)


def _first_frame_labels(mask: np.ndarray, grid: tuple[int, int], num_labels: int) -> torch.Tensor:
    h, w = grid
    small = np.asarray(Image.fromarray(mask.astype(np.uint8)).resize((w, h), Image.Resampling.NEAREST))
    return F.one_hot(torch.from_numpy(small.astype(np.int64)).flatten(), num_labels).float()  # (h*w, K)


def _to_tensor(frame: np.ndarray | Image.Image | torch.Tensor) -> torch.Tensor:
    if isinstance(frame, torch.Tensor):
        return frame.float()
    return image_to_tensor(frame)


def iter_propagation(
    frames: Iterable[np.ndarray | Image.Image | torch.Tensor],
    first_mask: np.ndarray,
    extractor: PatchFeatureExtractor,
    config: PropagationConfig | None = None,
) -> Iterator[np.ndarray]:
    """Yield an indexed mask (H0, W0) uint8 for every frame; the first one is `first_mask` itself.

    frames: RGB frames (H0 x W0 x 3 uint8 arrays, PIL images, or (3, H0, W0) tensors in [0, 1]).
    first_mask: (H0, W0) integer mask of the first frame, 0 = background, 1..K = objects; the void label
        255 is treated as background.
    extractor: a `PatchFeatureExtractor` (e.g. `FrozenBackbone`).
    """
    config = config or PropagationConfig()
    first_mask = np.asarray(first_mask).astype(np.int64)
    first_mask = np.where(first_mask == 255, 0, first_mask)
    num_labels = int(first_mask.max()) + 1
    patch_size = int(extractor.patch_size)

    frame_iter = iter(frames)
    state: dict = {"context": deque(maxlen=config.n_last_frames)}

    def batches() -> Iterator[list[torch.Tensor]]:
        batch: list[torch.Tensor] = []
        for frame in frame_iter:
            batch.append(_to_tensor(frame))
            if len(batch) == config.feature_batch_size:
                yield batch
                batch = []
        if batch:
            yield batch

    for batch in batches():
        original_size = batch[0].shape[-2:]
        if any(frame.shape[-2:] != original_size for frame in batch) or (
            "original_size" in state and original_size != state["original_size"]
        ):
            raise ValueError("All frames of a sequence must have the same size.")
        size = protocol_size(int(original_size[0]), int(original_size[1]), config, patch_size)
        resized = F.interpolate(torch.stack(batch), size=size, mode="bilinear", align_corners=False)
        features = extractor(resized)  # (B, h, w, C)
        grid = tuple(features.shape[1:3])
        features = F.normalize(features.flatten(1, 2).float(), dim=-1)  # (B, h*w, C)

        for index in range(features.shape[0]):
            if "first" not in state:
                if tuple(first_mask.shape) != tuple(original_size):
                    raise ValueError(
                        f"The first mask has shape {first_mask.shape} but the frames are {tuple(original_size)}."
                    )
                state.update(
                    original_size=original_size,
                    neighborhood=window_mask(grid[0], grid[1], config.neighborhood, features.device),
                    first=(
                        features[index],
                        _first_frame_labels(first_mask, grid, num_labels).to(features.device),
                    ),
                )
                yield first_mask.astype(np.uint8)
                continue
            context = [state["first"], *state["context"]]
            soft = propagate_labels(
                features[index],
                torch.stack([feats for feats, _ in context]),
                torch.stack([labels for _, labels in context]),
                config,
                state["neighborhood"],
            )
            state["context"].append((features[index], soft))  # the deque drops the oldest frame

            soft_map = soft.T.reshape(1, num_labels, *grid)
            upsampled = F.interpolate(
                soft_map, scale_factor=patch_size, mode="bilinear", align_corners=False
            )[0]
            if config.normalize_channels:
                upsampled = _normalize_channels(upsampled)
            labels = upsampled.argmax(dim=0).to(torch.uint8).cpu().numpy()
            height, width = (int(v) for v in original_size)
            yield np.asarray(Image.fromarray(labels).resize((width, height), Image.Resampling.NEAREST))


def propagate_video(
    frames: Sequence[np.ndarray | Image.Image | torch.Tensor],
    first_mask: np.ndarray,
    extractor: PatchFeatureExtractor,
    config: PropagationConfig | None = None,
) -> list[np.ndarray]:
    """`iter_propagation` collected into a list of (H0, W0) uint8 masks, one per frame."""
    return list(iter_propagation(frames, first_mask, extractor, config))

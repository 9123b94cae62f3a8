"""Label propagation: equality with a literal port of DINO's reference code, and behaviour on a sequence whose
right answer is known (a translated textured object)."""

import queue

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from selfpatch_hf.evaluation.propagation import (
    PropagationConfig,
    propagate_labels,
    propagate_video,
    protocol_size,
    window_mask,
)
from selfpatch_hf.evaluation.vos_metrics import db_statistics, sequence_scores


class ColourTextureFeatures:
    """Hand-built features: mean colour (centred) and colour standard deviation of each 4x4 patch."""

    patch_size = 4

    def __call__(self, pixels):
        mean = F.avg_pool2d(pixels, 4)
        std = (F.avg_pool2d(pixels**2, 4) - mean**2).clamp_min(0).sqrt()
        return torch.cat([mean - 0.5, std], dim=1).permute(0, 2, 3, 1)


class RandomFeatures:
    patch_size = 4

    def __init__(self, seed=0):
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, pixels):
        b, _, h, w = pixels.shape
        return torch.randn(b, h // 4, w // 4, 32, generator=self.generator)


class ProjectedPatches:
    """Deterministic features that depend on the frame content: a fixed random projection of each patch."""

    def __init__(self, patch_size=4, dim=16, seed=0):
        self.patch_size = patch_size
        self.projection = torch.randn(
            3 * patch_size * patch_size, dim, generator=torch.Generator().manual_seed(seed)
        )

    def __call__(self, pixels):
        p = self.patch_size
        patches = F.unfold(pixels, p, stride=p)  # (B, 3 p p, h w)
        b, _, h, w = pixels.shape
        return (patches.transpose(1, 2) @ self.projection).reshape(b, h // p, w // p, -1)


def translated_object_sequence(num_frames=12, height=64, width=96, seed=0):
    """A red textured disk moving 4 px per frame over a blue textured background that pans 1 px per frame."""
    rng = np.random.default_rng(seed)
    background = np.empty((height + num_frames, width + num_frames, 3))
    background[...] = (0.2, 0.45, 0.7)
    background += rng.normal(0, 0.08, background.shape)
    texture = np.empty((40, 40, 3))
    texture[...] = (0.8, 0.25, 0.2)
    texture += rng.normal(0, 0.08, texture.shape)
    yy, xx = np.mgrid[:40, :40]
    disk = (yy - 19.5) ** 2 + (xx - 19.5) ** 2 < 14**2
    frames, masks = [], []
    for t in range(num_frames):
        frame = background[t : t + height, t : t + width].copy()
        mask = np.zeros((height, width), np.uint8)
        top, left = 12, 8 + 4 * t
        window = frame[top : top + 40, left : left + 40]  # clipped at the frame border
        inside = disk[: window.shape[0], : window.shape[1]]
        window[inside] = texture[: window.shape[0], : window.shape[1]][inside]
        mask[top : top + 40, left : left + 40][inside] = 1
        frames.append((np.clip(frame, 0, 1) * 255).astype(np.uint8))
        masks.append(mask)
    return frames, masks


def jf_of(frames_pred, frames_true):
    j, f = sequence_scores(np.stack(frames_true[1:-1]), np.stack(frames_pred[1:-1]))
    return (db_statistics(j[0])[0] + db_statistics(f[0])[0]) / 2


# ---------------------------------------------------------------- literal port of DINO's eval_video_segmentation.py


def reference_restrict_neighborhood(h, w, size):
    mask = torch.zeros(h, w, h, w)
    for i in range(h):
        for j in range(w):
            for p in range(2 * size + 1):
                for q in range(2 * size + 1):
                    if i - size + p < 0 or i - size + p >= h:
                        continue
                    if j - size + q < 0 or j - size + q >= w:
                        continue
                    mask[i, j, i - size + p, j - size + q] = 1
    return mask.reshape(h * w, h * w)


def reference_label_propagation(feat_tar, list_frame_feats, list_segs, h, w, topk, size_mask):
    # feat_tar: (h*w, dim); list_frame_feats: [(dim, h*w)]; list_segs: [(1, C, h, w)]
    ncontext = len(list_frame_feats)
    feat_sources = torch.stack(list_frame_feats)
    feat_tar = F.normalize(feat_tar, dim=1, p=2)
    feat_sources = F.normalize(feat_sources, dim=1, p=2)
    feat_tar = feat_tar.unsqueeze(0).repeat(ncontext, 1, 1)
    aff = torch.exp(torch.bmm(feat_tar, feat_sources) / 0.1)
    if size_mask > 0:
        aff *= reference_restrict_neighborhood(h, w, size_mask).unsqueeze(0).repeat(ncontext, 1, 1)
    aff = aff.transpose(2, 1).reshape(-1, h * w)
    tk_val, _ = torch.topk(aff, dim=0, k=topk)
    tk_val_min, _ = torch.min(tk_val, dim=0)
    aff[aff < tk_val_min] = 0
    aff = aff / torch.sum(aff, keepdim=True, axis=0)
    segs = torch.cat(list_segs)
    nmb_context, C, h, w = segs.shape
    segs = segs.reshape(nmb_context, C, -1).transpose(2, 1).reshape(-1, C).T
    return torch.mm(segs, aff).reshape(1, C, h, w)


def reference_norm_mask(mask):
    for cnt in range(mask.shape[0]):
        mask_cnt = mask[cnt, :, :]
        if mask_cnt.max() > 0:
            mask_cnt = mask_cnt - mask_cnt.min()
            mask_cnt = mask_cnt / mask_cnt.max()
            mask[cnt, :, :] = mask_cnt
    return mask


def reference_video(frames, first_mask, extractor, n_last_frames, topk, size_mask, patch):
    """eval_video_tracking_davis with frames already at network size (no resizing)."""

    def feature(frame):
        tensor = torch.from_numpy(frame).permute(2, 0, 1).float()[None] / 255
        out = extractor(tensor)[0]
        return out.reshape(-1, out.shape[-1])

    height, width = first_mask.shape
    h, w = height // patch, width // patch
    small = np.array(Image.fromarray(first_mask).resize((w, h), 0))
    first_seg = (
        F.one_hot(torch.from_numpy(small).long(), int(first_mask.max()) + 1).permute(2, 0, 1)[None].float()
    )
    que = queue.Queue(n_last_frames)
    frame1_feat = feature(frames[0]).T
    outputs = [first_mask]
    for cnt in range(1, len(frames)):
        used_frame_feats = [frame1_feat] + [pair[0] for pair in list(que.queue)]
        used_segs = [first_seg] + [pair[1] for pair in list(que.queue)]
        feat_tar = feature(frames[cnt])
        frame_tar_avg = reference_label_propagation(
            feat_tar, used_frame_feats, used_segs, h, w, topk, size_mask
        )
        if que.qsize() == n_last_frames:
            que.get()
        que.put([feat_tar.T, frame_tar_avg.clone()])
        frame_tar_avg = F.interpolate(
            frame_tar_avg, scale_factor=patch, mode="bilinear", align_corners=False
        )[0]
        frame_tar_avg = reference_norm_mask(frame_tar_avg)
        _, frame_tar_seg = torch.max(frame_tar_avg, dim=0)
        outputs.append(frame_tar_seg.numpy().astype(np.uint8))
    return outputs


# ---------------------------------------------------------------- tests


def test_window_mask_matches_reference():
    for h, w, radius in ((5, 7, 1), (6, 4, 2), (3, 3, 5)):
        expected = reference_restrict_neighborhood(h, w, radius).bool()
        mask = window_mask(h, w, radius)
        if mask is None:  # the window covers the whole grid
            assert expected.all()
        else:
            assert torch.equal(mask, expected)


def test_propagate_labels_matches_reference():
    torch.manual_seed(0)
    h, w, dim, classes = 6, 7, 12, 3
    for num_context, radius in ((1, 0), (3, 2), (4, 1)):
        target = torch.randn(h * w, dim)
        context = torch.randn(num_context, h * w, dim)
        labels = torch.rand(num_context, h * w, classes)
        expected = reference_label_propagation(
            target,
            list(context.transpose(1, 2)),
            [lab.T.reshape(1, classes, h, w) for lab in labels],
            h,
            w,
            topk=5,
            size_mask=radius,
        )
        config = PropagationConfig(topk=5, neighborhood=radius, query_chunk=17)  # chunking must not matter
        ours = propagate_labels(
            F.normalize(target, dim=-1),
            F.normalize(context, dim=-1),
            labels,
            config,
            window_mask(h, w, radius),
        )
        torch.testing.assert_close(ours.T.reshape(1, classes, h, w), expected, rtol=1e-4, atol=1e-5)


def test_propagate_video_matches_reference_loop():
    frames, masks = translated_object_sequence(num_frames=7, height=32, width=48)
    extractor = ProjectedPatches()
    masks[0][2:6, 2:6] = 2  # a second object
    expected = reference_video(frames, masks[0], extractor, n_last_frames=2, topk=3, size_mask=2, patch=4)
    config = PropagationConfig(short_side=32, size_multiple=4, n_last_frames=2, topk=3, neighborhood=2)
    ours = propagate_video(frames, masks[0], extractor, config)
    assert len(ours) == len(expected)
    for a, b in zip(ours, expected, strict=True):
        np.testing.assert_array_equal(a, b)


def test_translated_object_is_tracked_by_hand_built_features():
    frames, masks = translated_object_sequence()
    config = PropagationConfig(short_side=64, size_multiple=8)
    predictions = propagate_video(frames, masks[0], ColourTextureFeatures(), config)
    assert all(p.shape == masks[0].shape and p.dtype == np.uint8 for p in predictions)
    np.testing.assert_array_equal(predictions[0], masks[0])
    assert jf_of(predictions, masks) > 0.8
    # The object moves 40 px: a prediction that stayed put would score far lower.
    assert jf_of([masks[0]] * len(masks), masks) < 0.3


def test_random_features_fail():
    frames, masks = translated_object_sequence()
    config = PropagationConfig(short_side=64, size_multiple=8)
    predictions = propagate_video(frames, masks[0], RandomFeatures(), config)
    assert jf_of(predictions, masks) < 0.3


def test_protocol_size():
    config = PropagationConfig()
    assert protocol_size(480, 854, config, 16) == (480, 832)  # DAVIS landscape
    assert protocol_size(854, 480, config, 16) == (832, 480)
    assert protocol_size(240, 320, PropagationConfig(short_side=224, size_multiple=32), 16) == (224, 288)
    assert protocol_size(64, 96, PropagationConfig(short_side=60, size_multiple=8), 16) == (48, 80)
    # frames smaller than the short side keep their size (the offline scenes' 240 px), unless asked otherwise
    assert protocol_size(240, 320, config, 16) == (240, 320)
    assert protocol_size(240, 320, PropagationConfig(upscale=True), 16) == (480, 640)


def test_bad_inputs_raise_clear_errors():
    frames, masks = translated_object_sequence(num_frames=3)
    with pytest.raises(ValueError, match="first mask"):
        propagate_video(frames, masks[0][:10], ColourTextureFeatures(), PropagationConfig(short_side=64))
    with pytest.raises(ValueError, match="topk"):
        PropagationConfig(topk=0)

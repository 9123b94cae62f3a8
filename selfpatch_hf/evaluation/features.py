"""Frozen-backbone patch features for dense evaluation.

Any vision transformer that `AutoModel` loads can be evaluated: the published SelfPatch / DINO backbones
(`ViTModel`, one CLS token), converted reference SelfPatch checkpoints (`SiglipVisionModel`, no prefix
token), DeiT (CLS + distillation token), DINOv2 with registers, ... The number of prefix tokens is read
from the config where the model type is known and always checked against the token count of the output.

Every evaluation in this package hands images to a backbone the same way: a float tensor
(B, 3, H, W) with values in [0, 1] and H, W multiples of the patch size. The backbone normalises
with its image processor's mean and std and returns a (B, H / p, W / p, C) patch feature map.

Hierarchical backbones (`SwinModel`) have no prefix token and one token map per stage; `stage` picks it
(1-based, default the last). The last stage's map is `last_hidden_state` (after the final norm, the
representation SelfPatch trains on Swin); an earlier stage's is that stage's output before its patch merging
(`reshaped_hidden_states` with `output_hidden_states_before_downsampling=True`; Swin has no norm there). For
such a backbone `patch_size` is the stage's stride: patch size x 2 ** (stage - 1), e.g. Swin-T stage 3 -> 16.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np
import torch
from PIL import Image
from transformers import AutoConfig, AutoImageProcessor, AutoModel, PreTrainedModel
from transformers.models.auto.modeling_auto import MODEL_MAPPING

from selfpatch_hf.image_conventions import IMAGENET_MEAN, IMAGENET_STD

logger = logging.getLogger(__name__)


# Tokens placed before the patch tokens, for the model types whose layout is fixed by the config.
_PREFIX_TOKENS_BY_MODEL_TYPE = {
    "vit": 1,
    "vit_msn": 1,
    "dinov2": 1,
    "clip_vision_model": 1,
    "deit": 2,
    "siglip_vision_model": 0,
    "siglip2_vision_model": 0,
}


@runtime_checkable
class PatchFeatureExtractor(Protocol):
    """Anything that maps images in [0, 1] to a patch feature map.

    `__call__(pixel_values)` takes (B, 3, H, W) float images with values in [0, 1], H and W multiples of
    `patch_size`, and returns (B, H // patch_size, W // patch_size, C) features.
    """

    patch_size: int

    def __call__(self, pixel_values: torch.Tensor) -> torch.Tensor: ...


@dataclass
class BackboneOutput:
    """Outputs of one frozen forward pass, split into prefix and patch tokens."""

    patch_tokens: torch.Tensor  # (B, h, w, C), last layer after the backbone's final norm
    prefix_tokens: torch.Tensor  # (B, P, C): CLS / distillation / register tokens (P may be 0)
    attentions: tuple[torch.Tensor, ...] | None = None  # per layer (B, heads, P + h*w, P + h*w)


def expected_prefix_tokens(config) -> int | None:
    """Number of tokens before the patch tokens implied by `config`, or None for unknown model types."""
    model_type = getattr(config, "model_type", None)
    if model_type == "dinov2_with_registers":
        return 1 + int(getattr(config, "num_register_tokens", 0))
    return _PREFIX_TOKENS_BY_MODEL_TYPE.get(model_type)


# Model types with stages of decreasing resolution (patch merging between stages) and no prefix token.
_HIERARCHICAL_MODEL_TYPES = ("swin",)


def _patch_size_of(config) -> int:
    patch_size = getattr(config, "patch_size", None)
    if patch_size is None:
        raise ValueError(
            f"The backbone config ({type(config).__name__}) has no `patch_size`; only patch-based vision "
            "transformers can be evaluated with patch features."
        )
    if isinstance(patch_size, Sequence):
        if len(set(patch_size)) != 1:
            raise ValueError(f"Non-square patches {tuple(patch_size)} are not supported.")
        patch_size = patch_size[0]
    return int(patch_size)


def load_image_statistics(
    name_or_path: str,
    image_mean: Sequence[float] | None = None,
    image_std: Sequence[float] | None = None,
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Mean and std to normalise with: explicit values, else the backbone's image processor, else ImageNet's."""
    if image_mean is not None and image_std is not None:
        return tuple(float(v) for v in image_mean), tuple(float(v) for v in image_std)
    try:
        processor = AutoImageProcessor.from_pretrained(name_or_path)
        mean, std = processor.image_mean, processor.image_std
    except (OSError, ValueError, AttributeError):
        logger.warning(
            "No image processor found for %s; normalising with ImageNet mean/std (the DINO/SelfPatch "
            "convention). Pass image_mean/image_std to override.",
            name_or_path,
        )
        mean, std = IMAGENET_MEAN, IMAGENET_STD
    mean = image_mean if image_mean is not None else mean
    std = image_std if image_std is not None else std
    if isinstance(mean, int | float):
        mean = (mean,) * 3
    if isinstance(std, int | float):
        std = (std,) * 3
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)


class FrozenBackbone(torch.nn.Module):
    """A frozen vision transformer that returns patch feature maps (a `PatchFeatureExtractor`).

    Example:
        >>> backbone = FrozenBackbone.from_pretrained("path/or/hub-id")
        >>> features = backbone(images)  # images (B, 3, H, W) in [0, 1] -> (B, H/p, W/p, C)
    """

    def __init__(
        self,
        model: PreTrainedModel,
        image_mean: Sequence[float] = IMAGENET_MEAN,
        image_std: Sequence[float] = IMAGENET_STD,
        stage: int | None = None,
    ):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.patch_size = _patch_size_of(model.config)
        self.hidden_size = int(getattr(model.config, "hidden_size", 0)) or None
        self.expected_prefix_tokens = expected_prefix_tokens(model.config)
        self.hierarchical = getattr(model.config, "model_type", None) in _HIERARCHICAL_MODEL_TYPES
        self.stage = self._check_stage(stage)
        if self.hierarchical:
            # the chosen stage's token map: its stride is the "patch size" every evaluation works with
            self.patch_size *= 2 ** (self.stage - 1)
            self.hidden_size = int(model.config.embed_dim) * 2 ** (self.stage - 1)
            self.expected_prefix_tokens = 0
        self.register_buffer("image_mean", torch.tensor(image_mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("image_std", torch.tensor(image_std, dtype=torch.float32).view(1, 3, 1, 1))
        self._accepts_interpolate = "interpolate_pos_encoding" in inspect.signature(model.forward).parameters

    @property
    def num_stages(self) -> int:
        return len(self.model.config.depths) if self.hierarchical else 1

    def _check_stage(self, stage: int | None) -> int:
        if stage is None:
            return self.num_stages
        if not self.hierarchical:
            if stage == 1:
                return 1
            raise ValueError(
                f"stage={stage} is for hierarchical backbones (Swin); this {self.model.config.model_type!r} "
                "backbone has a single token map: leave the stage unset."
            )
        if not 1 <= stage <= self.num_stages:
            raise ValueError(
                f"stage={stage} is out of range: this Swin has stages 1..{self.num_stages} (strides "
                + ", ".join(str(_patch_size_of(self.model.config) * 2**i) for i in range(self.num_stages))
                + ")."
            )
        return stage

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str,
        *,
        attn_implementation: str | None = None,
        image_mean: Sequence[float] | None = None,
        image_std: Sequence[float] | None = None,
        device: str | torch.device = "cpu",
        stage: int | None = None,
        **model_kwargs,
    ) -> FrozenBackbone:
        """Load a backbone with `AutoModel` (no remote code) and its normalisation statistics.

        Use `attn_implementation="eager"` to get attention maps (SDPA returns none). `stage` picks the token map
        of a hierarchical (Swin) backbone, 1-based; default the last.
        """
        config = AutoConfig.from_pretrained(name_or_path)
        model_class = MODEL_MAPPING.get(type(config), None)
        if (
            model_class is not None
            and "add_pooling_layer" in inspect.signature(model_class.__init__).parameters
            # our exports and conversions store an identity pooler (pooler_act "linear"): load it as saved
            and getattr(config, "pooler_act", None) != "linear"
        ):
            # A randomly initialised pooler is never read here; skip it (and its load warning).
            model_kwargs.setdefault("add_pooling_layer", False)
        if attn_implementation is not None:
            model_kwargs["attn_implementation"] = attn_implementation
        model = AutoModel.from_pretrained(name_or_path, dtype=torch.float32, **model_kwargs)
        mean, std = load_image_statistics(name_or_path, image_mean, image_std)
        return cls(model, mean, std, stage=stage).to(device)

    @classmethod
    def random_like(
        cls,
        name_or_path: str,
        *,
        seed: int = 0,
        attn_implementation: str | None = None,
        image_mean: Sequence[float] | None = None,
        image_std: Sequence[float] | None = None,
        device: str | torch.device = "cpu",
        stage: int | None = None,
    ) -> FrozenBackbone:
        """A backbone of `name_or_path`'s architecture and normalisation with transformers' random initialisation
        (seed `seed`; the caller's random state is left as it was): the floor that learnt features must beat."""
        config = AutoConfig.from_pretrained(name_or_path)
        kwargs = {"attn_implementation": attn_implementation} if attn_implementation is not None else {}
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = AutoModel.from_config(config, dtype=torch.float32, **kwargs)
        mean, std = load_image_statistics(name_or_path, image_mean, image_std)
        return cls(model, mean, std, stage=stage).to(device)

    @property
    def device(self) -> torch.device:
        return self.image_mean.device

    def _normalized_grid(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        """(normalised images on the device, patch rows, patch columns) of (B, 3, H, W) images in [0, 1]."""
        if pixel_values.ndim != 4 or pixel_values.shape[1] != 3:
            raise ValueError(f"Expected images of shape (B, 3, H, W), got {tuple(pixel_values.shape)}.")
        height, width = pixel_values.shape[-2:]
        p = self.patch_size
        if height % p or width % p:
            raise ValueError(
                f"Image size {height}x{width} is not a multiple of the patch size {p}; resize or crop first."
            )
        pixel_values = pixel_values.to(self.device, torch.float32)
        return (pixel_values - self.image_mean) / self.image_std, height // p, width // p

    def _split_tokens(
        self, tokens: torch.Tensor, h: int, w: int, attentions: tuple[torch.Tensor, ...] | None = None
    ) -> BackboneOutput:
        num_prefix = tokens.shape[1] - h * w
        if num_prefix < 0 or (
            self.expected_prefix_tokens is not None and num_prefix != self.expected_prefix_tokens
        ):
            raise ValueError(
                f"The backbone returned {tokens.shape[1]} tokens for a {h}x{w} patch grid "
                f"(expected {self.expected_prefix_tokens} prefix tokens for model type "
                f"{self.model.config.model_type!r}); this model's token layout is not supported."
            )
        return BackboneOutput(
            patch_tokens=tokens[:, num_prefix:].reshape(tokens.shape[0], h, w, tokens.shape[-1]),
            prefix_tokens=tokens[:, :num_prefix],
            attentions=attentions,
        )

    def forward_features(self, pixel_values: torch.Tensor, output_attentions: bool = False) -> BackboneOutput:
        """Run the backbone on (B, 3, H, W) images in [0, 1]; H and W must be multiples of the patch size."""
        pixel_values, h, w = self._normalized_grid(pixel_values)
        if self.hierarchical:
            return self._hierarchical_features(pixel_values, h, w, output_attentions)
        kwargs = {"interpolate_pos_encoding": True} if self._accepts_interpolate else {}
        if output_attentions:
            kwargs["output_attentions"] = True
        with torch.inference_mode():
            outputs = self.model(pixel_values=pixel_values, **kwargs)
        attentions = getattr(outputs, "attentions", None) if output_attentions else None
        if output_attentions and not attentions:
            raise ValueError(
                "The backbone returned no attention maps; load it with attn_implementation='eager'."
            )
        # last_hidden_state: (B, P + h*w, C)
        return self._split_tokens(outputs.last_hidden_state, h, w, tuple(attentions) if attentions else None)

    def last_blocks(self, pixel_values: torch.Tensor, n: int) -> list[BackboneOutput]:
        """The tokens of the last `n` blocks, oldest first, each after the backbone's final norm (DINO's
        `get_intermediate_layers`, which its linear evaluation reads). Hierarchical backbones: `n` = 1 only."""
        if n == 1:
            return [self.forward_features(pixel_values)]
        final_norm = getattr(self.model, "layernorm", None)
        if self.hierarchical or final_norm is None:
            raise ValueError(
                f"Several blocks need a ViT-like backbone with a final `layernorm`; this "
                f"{self.model.config.model_type!r} backbone gives its last block only: use 1 block."
            )
        blocks = int(self.model.config.num_hidden_layers)
        if n > blocks:
            raise ValueError(f"The backbone has {blocks} blocks, fewer than the {n} asked for.")
        pixel_values, h, w = self._normalized_grid(pixel_values)
        kwargs = {"interpolate_pos_encoding": True} if self._accepts_interpolate else {}
        with torch.inference_mode():
            # hidden_states are the blocks' outputs before the final norm; [0] is the embedding
            outputs = self.model(pixel_values=pixel_values, output_hidden_states=True, **kwargs)
            return [self._split_tokens(final_norm(tokens), h, w) for tokens in outputs.hidden_states[-n:]]

    def _hierarchical_features(
        self, pixel_values: torch.Tensor, h: int, w: int, output_attentions: bool
    ) -> BackboneOutput:
        config = self.model.config
        if output_attentions:
            raise ValueError(
                "Attention maps of a Swin backbone are per (shifted) local window, with no CLS token to look from, "
                "so there is no image-wide attention map to draw; visualise a ViT backbone, or use the patch "
                "features (e.g. `selfpatch eval visualize --positives`)."
            )
        # transformers' SwinModel shrinks a window to a stage grid smaller than it but keeps the window-sized
        # relative position table, which then fails; the reference code and this check agree on what runs
        height, width = pixel_values.shape[-2:]
        for i in range(self.num_stages):
            side = min(-(-height // (config.patch_size * 2**i)), -(-width // (config.patch_size * 2**i)))
            if side < config.window_size:
                minimum = config.window_size * config.patch_size * 2 ** (self.num_stages - 1)
                raise ValueError(
                    f"Image size {height}x{width} gives Swin stage {i + 1} a grid {side} tokens wide, smaller than "
                    f"its window ({config.window_size}); feed images of at least {minimum} px per side."
                )
        last = self.stage == self.num_stages
        with torch.inference_mode():
            outputs = self.model(
                pixel_values=pixel_values,
                interpolate_pos_encoding=True,
                output_hidden_states=not last,
                output_hidden_states_before_downsampling=True,
            )
        if last:
            tokens = outputs.last_hidden_state  # (B, h*w, C) after the final norm
            feature_map = tokens.reshape(tokens.shape[0], h, w, tokens.shape[-1])
        else:
            # [0] is the patch embedding; [i] stage i's output before its patch merging, (B, C, h, w)
            feature_map = outputs.reshaped_hidden_states[self.stage].permute(0, 2, 3, 1)
        if feature_map.shape[1:3] != (h, w):
            raise ValueError(
                f"Swin stage {self.stage} returned a {tuple(feature_map.shape[1:3])} grid for a {h}x{w} stride-"
                f"{self.patch_size} grid; pass images whose sides are multiples of {self.patch_size}."
            )
        # no prefix tokens: image_embedding's "auto" pooling averages the map (Swin's own average pool at the last stage)
        no_prefix = feature_map.new_zeros(feature_map.shape[0], 0, feature_map.shape[-1])
        return BackboneOutput(patch_tokens=feature_map, prefix_tokens=no_prefix)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) images in [0, 1] -> (B, H/p, W/p, C) last-layer patch features."""
        return self.forward_features(pixel_values).patch_tokens

    def image_embedding(self, pixel_values: torch.Tensor, pooling: str = "auto") -> torch.Tensor:
        """(B, 3, H, W) images in [0, 1] -> (B, C) image representation.

        pooling: "cls" (first token after the final norm, the DINO k-NN convention), "mean" (average of the
        patch tokens) or "auto" (CLS when the backbone has one, else the patch mean).
        """
        output = self.forward_features(pixel_values)
        has_cls = output.prefix_tokens.shape[1] > 0
        if pooling == "auto":
            pooling = "cls" if has_cls else "mean"
        if pooling == "cls":
            if not has_cls:
                raise ValueError("This backbone has no CLS token; use pooling='mean'.")
            return output.prefix_tokens[:, 0]
        if pooling == "mean":
            return output.patch_tokens.flatten(1, 2).mean(dim=1)
        raise ValueError(f"Unknown pooling {pooling!r}; choose 'auto', 'cls' or 'mean'.")


def progress_bar(total: int, description: str, enabled: bool = True, unit: str = "img"):
    """A tqdm progress bar of the feature passes on stderr, shown only when `enabled` and stderr is a terminal
    (logs and pipes get no bar lines); the bar disappears when closed."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=description, unit=unit, disable=None if enabled else True, leave=False)


def image_to_tensor(image: Image.Image | np.ndarray) -> torch.Tensor:
    """RGB image (PIL or H x W x 3 uint8 array) -> (3, H, W) float tensor in [0, 1]."""
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    array = np.asarray(image)
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=-1)
    if array.ndim != 3 or array.shape[-1] not in (3, 4):
        raise ValueError(f"Expected an H x W x 3 RGB image, got an array of shape {array.shape}.")
    array = array[..., :3]
    # astype copies, so the tensor never aliases a read-only buffer (PIL / decoded frames)
    tensor = torch.from_numpy(array.astype(np.float32))
    if array.dtype == np.uint8:
        tensor /= 255.0
    return tensor.permute(2, 0, 1)


def resize_image(
    image: Image.Image | np.ndarray, size: tuple[int, int], resample: int = Image.Resampling.BICUBIC
) -> torch.Tensor:
    """Resize an RGB image to (height, width) and return it as a (3, height, width) tensor in [0, 1]."""
    if not isinstance(image, Image.Image):
        image = Image.fromarray(np.asarray(image))
    height, width = size
    return image_to_tensor(image.convert("RGB").resize((width, height), resample))

"""Export of a pretrained SelfPatch backbone as a plain `ViTModel` or `SwinModel` folder (weights, config, image
processor, card).

The exported folder needs neither this package nor remote code: `AutoModel.from_pretrained(folder)` builds a
`ViTModel` whose `last_hidden_state[:, 1:]` (a `SwinModel` whose `last_hidden_state`: the last stage's tokens) is
exactly the per-patch representation the patch loss trained
(the output norm is the ViT's final `layernorm`, docs/method.md section 2).
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch
from transformers import SwinModel, ViTModel
from transformers.image_processing_utils import BaseImageProcessor
from transformers.image_utils import PILImageResampling

from selfpatch_hf.atomic_folders import staged_folder
from selfpatch_hf.image_conventions import IMAGENET_MEAN, IMAGENET_STD, as_height_width

if TYPE_CHECKING:
    from selfpatch_hf.hub.cards.backbone import BackboneCardInfo
    from selfpatch_hf.models.selfpatch.modeling import SelfPatchForPretraining


def build_image_processor(size: int | Sequence[int], model_type: str = "vit") -> BaseImageProcessor:
    """The preprocessing of every backbone this project writes (exports and conversions): conversion to RGB (so a
    grayscale or RGBA image gets the three channels the normalisation expects), bicubic resize to `size` (the
    global crop size of training), rescale to [0, 1], ImageNet mean/std.

    The class is the one `AutoImageProcessor` maps `model_type` to (`ViTImageProcessor` for ViT and Swin,
    `SiglipImageProcessor` for SigLIP). The PIL backend is built, so no torchvision is needed; both backends save the
    same `image_processor_type`, and `AutoImageProcessor` picks the torchvision one where it is installed (the same
    arithmetic).
    """
    import transformers

    names = {
        "vit": "ViTImageProcessor",
        "swin": "ViTImageProcessor",
        "siglip_vision_model": "SiglipImageProcessor",
    }
    if model_type not in names:
        raise ValueError(f"No image processor for backbone type {model_type!r}; known: {', '.join(names)}.")
    processor_class = getattr(transformers, f"{names[model_type]}Pil", None) or getattr(
        transformers, names[model_type]
    )
    height, width = as_height_width(size, "size")
    return processor_class(
        do_convert_rgb=True,
        do_resize=True,
        size={"height": height, "width": width},
        resample=PILImageResampling.BICUBIC,
        do_rescale=True,
        do_normalize=True,
        image_mean=list(IMAGENET_MEAN),
        image_std=list(IMAGENET_STD),
    )


def extract_backbone(
    model: SelfPatchForPretraining, source: Literal["teacher", "student"] = "teacher"
) -> ViTModel | SwinModel:
    """A standalone `ViTModel` or `SwinModel` with the weights of the teacher's or student's backbone (no
    drop-path).

    ViT: its pooler is the identity (`pooler_act="linear"`, identity weights, zero bias): SelfPatch trains no
    pooler, and plain `AutoModel.from_pretrained` would otherwise add a randomly initialised one. `pooler_output` is
    thus the normalised CLS token, which also makes `pipeline(..., pool=True)` meaningful.
    Swin: its pooler is Swin's average pool (no weights), so `pooler_output` is the mean of `last_hidden_state`,
    MoBY's image representation.
    """
    if source not in ("teacher", "student"):
        raise ValueError(f'source must be "teacher" or "student", got {source!r}.')
    network = model.teacher if source == "teacher" else model.student
    backbone_config = copy.deepcopy(model.config.backbone_config)
    # building a model initialises its weights from the global RNG; the export must not move the caller's (a
    # training run's drop-path stream, saved in its checkpoints) or a resumed run would no longer be exact
    if model.config.backbone_type == "swin":
        backbone_config.architectures = ["SwinModel"]
        with torch.random.fork_rng(devices=[]):
            backbone = SwinModel(backbone_config, add_pooling_layer=True)
        expected_missing: set[str] = set()
    else:
        backbone_config.architectures = ["ViTModel"]
        backbone_config.pooler_act = "linear"
        backbone_config.pooler_output_size = backbone_config.hidden_size
        with torch.random.fork_rng(devices=[]):
            backbone = ViTModel(backbone_config, add_pooling_layer=True)
        with torch.no_grad():
            backbone.pooler.dense.weight.copy_(torch.eye(backbone_config.hidden_size))
            backbone.pooler.dense.bias.zero_()
        expected_missing = {"pooler.dense.weight", "pooler.dense.bias"}
    # live module names on both sides: a plain strict copy (no file-format renaming involved)
    missing, unexpected = backbone.load_state_dict(network.backbone.state_dict(), strict=False)
    if unexpected or set(missing) != expected_missing:
        raise RuntimeError(
            f"Backbone weights do not match a {type(backbone).__name__}: missing {missing}, unexpected {unexpected}."
        )
    return backbone.float().eval()


def non_finite_tensors(tensors: Mapping[str, torch.Tensor]) -> list[str]:
    """The names of the floating-point tensors that hold a NaN or an infinity."""
    return [
        name
        for name, tensor in tensors.items()
        if tensor.is_floating_point() and not torch.isfinite(tensor).all()
    ]


def check_finite(module: torch.nn.Module, what: str) -> None:
    """Refuses to publish weights with NaN / inf (a diverged run): written, they would replace a good export
    without a word, and every user of the folder would get NaN features."""
    bad = non_finite_tensors(module.state_dict())
    if bad:
        raise ValueError(
            f"{what} holds NaN or infinite values in {len(bad)} tensor(s) ({', '.join(bad[:5])}"
            f"{', ...' if len(bad) > 5 else ''}); nothing was written. Export a checkpoint from before the values "
            "went bad."
        )


def export_backbone(
    model: SelfPatchForPretraining,
    output_dir: str | os.PathLike,
    source: Literal["teacher", "student"] = "teacher",
    card_info: BackboneCardInfo | None = None,
    image_size: int | Sequence[int] | None = None,
) -> Path:
    """Writes the teacher's (default; what the paper evaluates) or student's backbone as a plain `ViTModel` or
    `SwinModel` folder.

    The folder holds `config.json` (`model_type: "vit"` or `"swin"`), `model.safetensors`, `preprocessor_config.json` and, when
    `card_info` is given, a model card `README.md`. It is written next to `output_dir` and swapped in atomically:
    a crash mid-export leaves the previous export intact. Files get the user's normal permissions (umask), and the
    global RNG is left as it was. The image processor resizes to `image_size` (training passes its global crop
    size); by default to the backbone's `image_size`, the resolution of its position grid.
    """
    target = Path(output_dir)
    backbone = extract_backbone(model, source)
    check_finite(backbone, f"the {source}'s backbone")
    target.parent.mkdir(parents=True, exist_ok=True)
    with staged_folder(target) as staging:
        backbone.save_pretrained(staging)
        size = image_size if image_size is not None else backbone.config.image_size
        build_image_processor(size, backbone.config.model_type).save_pretrained(staging)
        if card_info is not None:
            from selfpatch_hf.hub.cards.backbone import write_backbone_card

            write_backbone_card(staging, card_info)
    return target


__all__ = [
    "build_image_processor",
    "check_finite",
    "export_backbone",
    "extract_backbone",
    "non_finite_tensors",
]

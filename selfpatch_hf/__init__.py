"""SelfPatch: patch-level self-supervised Vision Transformers for the Hugging Face ecosystem.

The public names below are imported on first use, so `import selfpatch_hf` (and every command line's `--help`)
stays fast: torch and transformers load only when a model, config or tool is touched. Touching `SelfPatchConfig`
registers it with `AutoConfig`; touching any model class registers `SelfPatchForPretraining` with
`AutoModelForPreTraining` (`selfpatch_hf.register_auto_classes()` does both explicitly). Exported backbones are
plain `transformers` models and need neither this package nor remote code.
"""

from importlib import import_module
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# public name -> submodule that defines it
_EXPORTS = {
    "BACKBONE_PRESETS": "models.selfpatch.configuration",
    "SelfPatchConfig": "models.selfpatch.configuration",
    "SelfPatchForPretraining": "models.selfpatch.modeling",
    "SelfPatchNetwork": "models.selfpatch.networks",
    "SelfPatchPreTrainedModel": "models.selfpatch.modeling",
    "SelfPatchPretrainingOutput": "models.selfpatch.modeling",
    "SelfPatchViTForPretraining": "models.selfpatch.modeling",
    "build_neighbor_table": "models.selfpatch.neighbors",
    "select_positive_neighbors": "models.selfpatch.neighbors",
    "export_backbone": "export.backbone",
    "export_dense_backbone": "models.dense.backbones",
    "build_upernet": "models.dense.heads",
}

__all__ = [
    "BACKBONE_PRESETS",
    "SelfPatchConfig",
    "SelfPatchForPretraining",
    "SelfPatchNetwork",
    "SelfPatchPreTrainedModel",
    "SelfPatchPretrainingOutput",
    "SelfPatchViTForPretraining",
    "build_neighbor_table",
    "build_upernet",
    "export_backbone",
    "export_dense_backbone",
    "register_auto_classes",
    "select_positive_neighbors",
]

if TYPE_CHECKING:
    from selfpatch_hf.export.backbone import export_backbone
    from selfpatch_hf.models.dense.backbones import export_dense_backbone
    from selfpatch_hf.models.dense.heads import build_upernet
    from selfpatch_hf.models.selfpatch.configuration import BACKBONE_PRESETS, SelfPatchConfig
    from selfpatch_hf.models.selfpatch.modeling import (
        SelfPatchForPretraining,
        SelfPatchPreTrainedModel,
        SelfPatchPretrainingOutput,
        SelfPatchViTForPretraining,
    )
    from selfpatch_hf.models.selfpatch.neighbors import build_neighbor_table, select_positive_neighbors
    from selfpatch_hf.models.selfpatch.networks import SelfPatchNetwork


def register_auto_classes() -> None:
    """Register `SelfPatchConfig` with `AutoConfig`, the pretraining model with `AutoModelForPreTraining`, and the
    CLS-free SelfPatch backbone (`SelfPatchSiglipBackbone`) with `AutoConfig` / `AutoBackbone`.

    Importing `selfpatch_hf.models.selfpatch.modeling` / `selfpatch_hf.models.dense.siglip_backbone` already does this; call it when
    the first thing your code does with this package is `AutoModelForPreTraining.from_pretrained(...)` or loading a
    segmentation model fine-tuned from a converted SelfPatch checkpoint.
    """
    import_module(".models.selfpatch.modeling", __name__)
    import_module(".models.dense.siglip_backbone", __name__)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

"""SelfPatch: patch-level self-supervised Vision Transformers for the Hugging Face ecosystem.

Importing the package registers `SelfPatchConfig` with `AutoConfig` and `SelfPatchViTForPretraining` with
`AutoModelForPreTraining`. Exported backbones are plain `ViTModel`s and need neither this package nor remote code.
"""

from transformers import AutoConfig, AutoModelForPreTraining

from .configuration_selfpatch import BACKBONE_PRESETS, SelfPatchConfig
from .export import export_backbone
from .modeling_selfpatch import (
    SelfPatchNetwork,
    SelfPatchPreTrainedModel,
    SelfPatchPretrainingOutput,
    SelfPatchViTForPretraining,
    build_neighbor_table,
    select_positive_neighbors,
)

__version__ = "0.1.0"

AutoConfig.register(SelfPatchConfig.model_type, SelfPatchConfig, exist_ok=True)
AutoModelForPreTraining.register(SelfPatchConfig, SelfPatchViTForPretraining, exist_ok=True)

__all__ = [
    "BACKBONE_PRESETS",
    "SelfPatchConfig",
    "SelfPatchNetwork",
    "SelfPatchPreTrainedModel",
    "SelfPatchPretrainingOutput",
    "SelfPatchViTForPretraining",
    "build_neighbor_table",
    "export_backbone",
    "select_positive_neighbors",
]

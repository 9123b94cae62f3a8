"""Dense evaluation of frozen vision transformers: DAVIS label propagation (J&F), linear-probe semantic
segmentation (mIoU), k-NN classification, and the figures (attention maps, teacher positives).

Every protocol's settings are a dataclass of `configs` (the one home of their defaults). Everything takes backbones
that `AutoModel` loads (see `FrozenBackbone`). The command line is `selfpatch eval` (`cli`, also `python -m
selfpatch_hf.evaluation`); the offline evaluation data (synthetic scenes of real photographs) are built by
`selfpatch_hf.data.samples.synthetic_scenes`, and what scores on them mean is in `offline_reference`. Submodules
are imported on first use to keep the command line fast.
"""

from importlib import import_module

_EXPORTS = {
    "FrozenBackbone": "features",
    "PatchFeatureExtractor": "features",
    "AttentionFigureConfig": "configs",
    "DavisConfig": "configs",
    "PropagationConfig": "configs",
    "propagate_labels": "propagation",
    "propagate_video": "propagation",
    "iter_propagation": "propagation",
    "DavisResult": "davis",
    "evaluate_davis": "davis",
    "predict_davis": "davis",
    "run_davis": "davis",
    "region_similarity": "vos_metrics",
    "boundary_f_measure": "vos_metrics",
    "ConfusionMatrix": "semseg_metrics",
    "segmentation_scores": "semseg_metrics",
    "LinearProbeConfig": "configs",
    "run_linear_probe": "linear_probe",
    "KnnConfig": "configs",
    "knn_classify": "knn",
    "run_knn": "knn",
    "load_metric": "evaluate_metrics",
    "attention_figure": "visualize",
    "positives_figure": "visualize",
    "teacher_positives": "visualize",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

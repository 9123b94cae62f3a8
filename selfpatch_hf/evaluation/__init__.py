"""Dense evaluation of frozen vision transformers: DAVIS label propagation (J&F), linear-probe semantic
segmentation (mIoU), k-NN classification, and the figures (attention maps, teacher positives).

The offline evaluation data (synthetic scenes of real photographs) lives in `selfpatch_hf.data.samples.synthetic_scenes`.

Everything takes backbones that `AutoModel` loads (see `FrozenBackbone`); the command line is
`python -m selfpatch_hf.evaluation --help`. Submodules are imported on first use to keep the CLI fast.
"""

from importlib import import_module

_EXPORTS = {
    "FrozenBackbone": "features",
    "PatchFeatureExtractor": "features",
    "PropagationConfig": "propagation",
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
    "LinearProbeConfig": "linear_probe",
    "run_linear_probe": "linear_probe",
    "KnnConfig": "knn",
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

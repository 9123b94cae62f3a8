"""The `evaluate` metric modules shipped inside this package, loadable without network access."""

from __future__ import annotations

from pathlib import Path

METRICS_DIR = Path(__file__).parent / "metrics"
AVAILABLE_METRICS = ("coco_ap", "davis_jf", "segmentation_iou")


def metric_path(name: str) -> str:
    """Folder of a shipped metric module, to pass to `evaluate.load`."""
    if name not in AVAILABLE_METRICS:
        raise ValueError(f"Unknown metric {name!r}; available: {', '.join(AVAILABLE_METRICS)}.")
    return str(METRICS_DIR / name)


def load_metric(name: str, **kwargs):
    """`evaluate.load` of a shipped metric module (offline: the module is loaded from its folder)."""
    import evaluate

    return evaluate.load(metric_path(name), **kwargs)

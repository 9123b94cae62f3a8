"""Images in, multi-crop batches out: sources, decoding, augmentation, sharding, stream state, sample data.

- `augmentation`: the crop recipes (DINO multi-crop with SelfPatch's scales) on decoded RGB images;
- `streaming`: image sources (Hub, parquet, imagefolder, webdataset) through `datasets`, robust decoding, per-rank
  sharding, resumable stream positions, and `build_pretraining_dataloader` that ties them together;
- `samples.photographs`: the small offline pretraining dataset (freely licensed photographs from scikit-image);
- `samples.synthetic_scenes`: offline dense-evaluation data (DAVIS-layout sequences and a segmentation set composed from
  real photographs with known masks).

Submodules are imported on first use.
"""

from importlib import import_module

_EXPORTS = {
    "ImagePaths": "streaming",
    "MultiCropAugmentation": "augmentation",
    "MultiCropDataLoader": "streaming",
    "build_pretraining_dataloader": "streaming",
    "decode_image": "streaming",
    "load_image_stream": "streaming",
    "sample_dataset_path": "samples.photographs",
    "make_offline_data": "samples.synthetic_scenes",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

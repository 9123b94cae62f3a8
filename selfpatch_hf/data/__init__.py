"""Images in, multi-crop batches out: sources, decoding, augmentation, sharding, stream state, sample data.

- `sources`: image sources (Hub, parquet, imagefolder, webdataset) opened through `datasets`, undecoded;
- `decoding`: robust decoding to upright RGB with counted skip reasons, and the JPEG header / device decoder hooks;
- `augmentation`: the crop recipes (DINO multi-crop with SelfPatch's scales) on decoded RGB images;
- `batched_photometric`, `resampling`, `device_crops`: the recipe finished on the training device (photometric
  ops only, or decode, crops and photometric ops);
- `streaming`: the DataLoader workers' stream, per-rank sharding and the loader (`MultiCropDataLoader`,
  `build_pretraining_dataloader`), whose resumable position is `stream_state`;
- `samples.photographs`: the small offline pretraining dataset (freely licensed photographs from scikit-image);
- `samples.synthetic_scenes`: offline dense-evaluation data (DAVIS-layout sequences and a segmentation set composed from
  real photographs with known masks).

Submodules are imported on first use.
"""

from importlib import import_module

_EXPORTS = {
    "DeviceCrops": "device_crops",
    "ImageDecodeError": "decoding",
    "ImagePaths": "sources",
    "MultiCropAugmentation": "augmentation",
    "MultiCropDataLoader": "streaming",
    "build_pretraining_dataloader": "streaming",
    "decode_image": "decoding",
    "load_image_stream": "sources",
    "sample_dataset_path": "samples.photographs",
    "make_offline_data": "samples.synthetic_scenes",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

"""Detection / instance-segmentation examples from the two COCO layouts: a `datasets` dataset and a COCO json.

- The Hub's COCO layout (`cppe-5`, COCO conversions such as `detection-datasets/coco`, the offline instance set):
  one row per image with an `image` column and an `objects` column holding, per object, `bbox`, `category` (or
  `category_id` / `label`; a `ClassLabel` gives the names), optionally `segmentation` (polygons or RLE), `iscrowd`,
  `id`, `area`. `objects` may be stored as a dict of lists (`Sequence` of a dict) or a list of dicts (`List`). Box
  conventions differ between datasets (COCO's [x, y, width, height]; some conversions store [x0, y0, x1, y1]): read
  the dataset card and pass `box_format`.
- A COCO json + image folder, read with `pycocotools` (`COCO(annotation_file)`): categories are renumbered 0..K-1
  in id order (`category_ids` maps back, for writing results with the json's ids).

Both give `DetectionExample`s (image, checked `Instances`) through `DetectionSource.__getitem__`, so one index is one
image and a resumable sampler can address it. Bad annotations are repaired or refused as
`selfpatch_hf.data.detection.instances` says; a column that is named but missing, or no recognisable box / category
field, is an error naming what the dataset has.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from selfpatch_hf.data.detection.instances import AnnotationIssues, BoxFormat, Instances, check_instances

logger = logging.getLogger(__name__)

OFFLINE_INSTANCES = "offline-instances"
_CATEGORY_FIELDS = ("category", "category_id", "label", "labels")
_KNOWN_FIELDS = {"bbox", "segmentation", "iscrowd", "id", "bbox_id", "area", "image_id", *_CATEGORY_FIELDS}


@dataclass
class DetectionExample:
    image_id: Any
    image: Image.Image  # RGB
    instances: Instances


class DetectionSource:
    """Indexable examples of one split; `label_names[i]` is label i, `category_ids[i]` its id in the source."""

    label_names: list[str]
    category_ids: list[int]
    with_masks: bool
    box_format: BoxFormat
    issues: AnnotationIssues

    def __len__(self) -> int:
        raise NotImplementedError

    def raw(self, index: int) -> tuple[Any, Image.Image, list[dict[str, Any]]]:
        """(image id, RGB image, raw objects with `category` already a label 0..K-1)."""
        raise NotImplementedError

    def __getitem__(self, index: int) -> DetectionExample:
        image_id, image, objects = self.raw(index)
        instances = check_instances(
            objects,
            image.height,
            image.width,
            len(self.label_names),
            image_id=image_id,
            box_format=self.box_format,
            with_masks=self.with_masks,
            issues=self.issues,
        )
        return DetectionExample(image_id, image, instances)

    @property
    def id2label(self) -> dict[int, str]:
        return dict(enumerate(self.label_names))


def _rows_of(objects: Any) -> list[dict[str, Any]]:
    """`objects` of one row as a list of dicts, whether stored as a dict of lists or a list of dicts."""
    if objects is None:
        return []
    if isinstance(objects, Mapping):
        lengths = {key: len(values) for key, values in objects.items()}
        if len(set(lengths.values())) > 1:
            raise ValueError(f"the objects' fields have different lengths: {lengths}")
        count = next(iter(lengths.values()), 0)
        return [{key: values[i] for key, values in objects.items()} for i in range(count)]
    return [dict(obj) for obj in objects]


def _object_fields(feature: Any) -> tuple[dict[str, Any], bool]:
    """(field name -> feature) of an objects column, and whether it is one (Sequence / List of a dict)."""
    inner = getattr(feature, "feature", None)
    if isinstance(feature, dict):  # Sequence(dict) decodes to a dict of lists
        return {k: getattr(v, "feature", v) for k, v in feature.items()}, True
    if isinstance(inner, dict):  # List(dict)
        return dict(inner), True
    return {}, False


class HubDetectionSource(DetectionSource):
    """A `datasets.Dataset` in the Hub's COCO layout (see the module docstring)."""

    def __init__(
        self,
        dataset,
        *,
        label_names: Sequence[str] | None = None,
        box_format: BoxFormat = "xywh",
        image_column: str | None = None,
        objects_column: str | None = None,
        category_field: str | None = None,
        segmentation_field: str | None = None,
        with_masks: bool | None = None,
    ):
        import datasets

        if box_format not in ("xywh", "xyxy"):
            raise ValueError(f'box_format must be "xywh" or "xyxy", got {box_format!r}.')
        columns = dict(dataset.features)
        for role, name in (("image", image_column), ("objects", objects_column)):
            if name is not None and name not in columns:
                raise ValueError(f"no {role} column {name!r}; the dataset's columns are {sorted(columns)}.")
        self.image_column = image_column or next(
            (name for name, f in columns.items() if isinstance(f, datasets.Image)), None
        )
        candidates = (
            [objects_column] if objects_column else [n for n in columns if _object_fields(columns[n])[1]]
        )
        self.objects_column = next(iter(candidates), None)
        if self.image_column is None or self.objects_column is None:
            raise ValueError(
                f"not the Hub's COCO layout: need an image column and an objects column (a list of objects with "
                f"bbox and category); the dataset's columns are {sorted(columns)}. Name them with image_column / "
                "objects_column."
            )
        fields, _ = _object_fields(columns[self.objects_column])
        where = f"objects column {self.objects_column!r}"
        for role, name in (("category", category_field), ("segmentation", segmentation_field)):
            if name is not None and name not in fields:
                raise ValueError(f"{where} has no {role} field {name!r}; its fields are {sorted(fields)}.")
        if "bbox" not in fields:
            raise ValueError(f"{where} has no bbox field; its fields are {sorted(fields)}.")
        self.category_field = category_field or next((f for f in _CATEGORY_FIELDS if f in fields), None)
        if self.category_field is None:
            raise ValueError(
                f"{where} has no category field ({', '.join(_CATEGORY_FIELDS)}); its fields are {sorted(fields)}. "
                "Name it with category_field."
            )
        self.segmentation_field = segmentation_field or ("segmentation" if "segmentation" in fields else None)
        if with_masks and self.segmentation_field is None:
            raise ValueError(
                f"{where} has no segmentation field, so no masks; its fields are {sorted(fields)}."
            )
        self.with_masks = self.segmentation_field is not None if with_masks is None else bool(with_masks)
        unused = sorted(set(fields) - _KNOWN_FIELDS - {self.category_field, self.segmentation_field})
        if unused:
            logger.info("%s: fields %s are not used for detection", where, ", ".join(unused))

        category_feature = fields[self.category_field]
        self._names_by_value: dict[str, int] | None = None
        if isinstance(category_feature, datasets.ClassLabel):
            names = list(category_feature.names)
            if label_names is not None and list(label_names) != names:
                raise ValueError(
                    f"label_names {list(label_names)[:5]}... differ from the dataset's own category names "
                    f"{names[:5]}...; drop label_names to use the dataset's."
                )
        elif label_names is not None:
            names = [str(name) for name in label_names]
            if getattr(category_feature, "dtype", "") == "string":  # categories given by name
                self._names_by_value = {name: index for index, name in enumerate(names)}
        else:
            raise ValueError(
                f"{where}: its {self.category_field!r} field is a plain {getattr(category_feature, 'dtype', '?')} "
                "with no class names; pass label_names (a list, label i = category i)."
            )
        if len(names) < 1:
            raise ValueError("the label map is empty.")
        self.label_names = names
        self.category_ids = list(range(len(names)))
        self.box_format = box_format
        self.dataset = dataset
        self.issues = AnnotationIssues()

    def __len__(self) -> int:
        return len(self.dataset)

    def first_unknown_category(self, chunk_size: int = 4096) -> tuple[int, Any] | None:
        """(row, category) of the first object whose category lies outside the label map, read from the objects
        column alone (no image is decoded), or None: a training run checks this before its first step rather
        than stopping at the first batch that holds it. Categories given by name are checked when read."""
        if self._names_by_value is not None:
            return None
        column = self.dataset.select_columns([self.objects_column])
        count = len(self.label_names)
        for start in range(0, len(column), chunk_size):
            for offset, objects in enumerate(column[start : start + chunk_size][self.objects_column]):
                for obj in _rows_of(objects):
                    category = obj.get(self.category_field)
                    valid = isinstance(category, (int, np.integer)) and not isinstance(category, bool)
                    if not valid or not 0 <= category < count:
                        return start + offset, category
        return None

    def raw(self, index: int) -> tuple[Any, Image.Image, list[dict[str, Any]]]:
        row = self.dataset[int(index)]
        image = row[self.image_column].convert("RGB")
        image_id = row.get("image_id", index)
        objects = []
        for obj in _rows_of(row[self.objects_column]):
            category = obj[self.category_field]
            if self._names_by_value is not None:
                if category not in self._names_by_value:
                    raise ValueError(
                        f"image {image_id!r}: category {category!r} is not in label_names ({len(self.label_names)} "
                        "names); give label names that cover every category of the dataset."
                    )
                category = self._names_by_value[category]
            objects.append(
                {
                    "bbox": obj["bbox"],
                    "category": category,
                    "segmentation": obj.get(self.segmentation_field) if self.segmentation_field else None,
                    "iscrowd": obj.get("iscrowd", 0) or 0,
                    "area": obj.get("area"),
                    "id": obj.get("id", obj.get("bbox_id")),
                }
            )
        return image_id, image, objects


class CocoJsonSource(DetectionSource):
    """A COCO annotation file and its image folder, read with `pycocotools`; categories renumbered 0..K-1."""

    def __init__(
        self, annotation_file: str | os.PathLike, image_dir: str | os.PathLike, *, with_masks: bool = True
    ):
        import contextlib
        import io

        from pycocotools.coco import COCO

        annotation_file, image_dir = Path(annotation_file), Path(image_dir)
        if not annotation_file.is_file():
            raise FileNotFoundError(f"no COCO annotation file {annotation_file}")
        if not image_dir.is_dir():
            raise FileNotFoundError(f"no image folder {image_dir} (the images of {annotation_file.name})")
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
            try:
                self.coco = COCO(str(annotation_file))
            except (ValueError, KeyError, TypeError, AssertionError) as error:
                raise ValueError(f"{annotation_file} is not a COCO annotation file: {error!r}") from error
        categories = sorted(self.coco.loadCats(self.coco.getCatIds()), key=lambda c: c["id"])
        if not categories:
            raise ValueError(f"{annotation_file} lists no categories.")
        self.category_ids = [int(c["id"]) for c in categories]
        self.label_names = [str(c["name"]) for c in categories]
        self._label_of = {category_id: label for label, category_id in enumerate(self.category_ids)}
        self.image_ids = sorted(self.coco.getImgIds())
        self.image_dir = image_dir
        self.annotation_file = annotation_file
        self.with_masks = with_masks
        self.box_format = "xywh"
        self.issues = AnnotationIssues()

    def __len__(self) -> int:
        return len(self.image_ids)

    def raw(self, index: int) -> tuple[Any, Image.Image, list[dict[str, Any]]]:
        image_id = self.image_ids[int(index)]
        info = self.coco.loadImgs(image_id)[0]
        path = self.image_dir / info["file_name"]
        try:
            with Image.open(path) as opened:
                image = opened.convert("RGB")
        except OSError as error:
            raise OSError(
                f"image {image_id} of {self.annotation_file.name}: cannot read {path}: {error}"
            ) from error
        objects = []
        for annotation in self.coco.loadAnns(self.coco.getAnnIds(imgIds=image_id)):
            category_id = annotation["category_id"]
            if category_id not in self._label_of:
                raise ValueError(
                    f"image {image_id}, annotation {annotation.get('id')}: category id {category_id} is not among "
                    f"the file's categories {self.category_ids}."
                )
            objects.append({**annotation, "category": self._label_of[category_id]})
        return image_id, image, objects


def offline_instances_path(data_dir: str | os.PathLike | None = None, seed: int = 0) -> Path:
    """The offline instance set under `data_dir/instances` (`selfpatch eval make-offline-data`'s layout; default:
    the offline data's cache folder, `default_offline_data_dir()`), built atomically on first use with its
    defaults."""
    from selfpatch_hf.data.samples.instance_scenes import make_instance_dataset
    from selfpatch_hf.data.samples.synthetic_scenes import default_offline_data_dir

    target = Path(data_dir if data_dir is not None else default_offline_data_dir()) / "instances"
    if (target / "data").is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".instances.tmp-", dir=target.parent))
    try:
        make_instance_dataset(staging, seed=seed, coco_json=True)
        try:
            os.replace(staging, target)
        except OSError:  # another process built it first
            shutil.rmtree(staging, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def _coco_image_dir(annotation_file: Path, split: str) -> Path:
    # COCO's own layout: annotations/instances_val2017.json beside val2017/
    stem = annotation_file.stem.removeprefix("instances_")
    return annotation_file.parent.parent / (stem or split)


def load_detection_source(
    dataset: str | os.PathLike,
    split: str,
    *,
    image_dir: str | os.PathLike | None = None,
    config_name: str | None = None,
    revision: str | None = None,
    token: str | None = None,
    offline_data_dir: str | os.PathLike | None = None,
    **source_options: Any,
) -> DetectionSource:
    """One split as a `DetectionSource`: `offline-instances`, a COCO json file (`image_dir` default: COCO's layout,
    `annotations/instances_<name>.json` beside `<name>/`), a `save_to_disk` folder, a local data folder or a Hub id.
    `source_options` go to `HubDetectionSource` (label_names, box_format, column names, with_masks)."""
    import datasets

    if str(dataset) == OFFLINE_INSTANCES:
        dataset = offline_instances_path(offline_data_dir)
    path = Path(dataset)
    if path.suffix == ".json":
        folder = Path(image_dir) if image_dir is not None else _coco_image_dir(path, split)
        return CocoJsonSource(path, folder, **{k: v for k, v in source_options.items() if k == "with_masks"})
    if path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "dataset_info.json").is_file()):
        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise ValueError(f"{dataset} has splits {list(loaded)}, not {split!r}.")
            loaded = loaded[split]
    else:
        kwargs: dict[str, Any] = {"split": split}
        if config_name:
            kwargs["name"] = config_name
        if revision:
            kwargs["revision"] = revision
        if token:
            kwargs["token"] = token
        loaded = datasets.load_dataset(str(dataset), **kwargs)
    return HubDetectionSource(loaded, **source_options)


__all__ = [
    "OFFLINE_INSTANCES",
    "CocoJsonSource",
    "DetectionExample",
    "DetectionSource",
    "HubDetectionSource",
    "load_detection_source",
    "offline_instances_path",
]

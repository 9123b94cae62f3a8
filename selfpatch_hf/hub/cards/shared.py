"""What every model card shares: the citations, the licence, the repo-id placeholder, the metadata of fine-tuned
models, and rendering a template.

Each kind of published folder has one module here and one Jinja template beside it (`<kind>_template.md`, its
only copy): `backbone` (exported and converted backbones), `pretraining` (converted pretraining checkpoints),
`segmentation` and `detection` (fine-tuned models). A module builds the card's `huggingface_hub.ModelCardData`
(the YAML metadata the Hub validates; `fine_tuned_card_data` for fine-tuned models) and the values its template
reads, and renders both with `render_card` (`ModelCard.from_template`).
"""

from __future__ import annotations

from collections.abc import Iterable
from importlib import resources
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

LICENSE = "apache-2.0"
# Placeholder of the model id in a card's usage snippet: a card written with the folder cannot know where it will
# be published; `selfpatch_hf.hub.publishing` puts the repo id in the card it uploads.
REPO_ID_PLACEHOLDER = "<repo-id-or-local-folder>"

SELFPATCH_CITATION = """\
@inproceedings{yun2022patch,
  title     = {Patch-level Representation Learning for Self-supervised Vision Transformers},
  author    = {Yun, Sukmin and Lee, Hankook and Kim, Jaehyung and Shin, Jinwoo},
  booktitle = {Proceedings of the IEEE/CVF Conference on Computer Vision and Pattern Recognition (CVPR)},
  year      = {2022}
}"""
DINO_CITATION = """\
@inproceedings{caron2021emerging,
  title     = {Emerging Properties in Self-Supervised Vision Transformers},
  author    = {Caron, Mathilde and Touvron, Hugo and Misra, Ishan and J{\\'e}gou, Herv{\\'e} and Mairal, Julien
               and Bojanowski, Piotr and Joulin, Armand},
  booktitle = {Proceedings of the IEEE/CVF International Conference on Computer Vision (ICCV)},
  year      = {2021}
}"""
MOBY_CITATION = """\
@article{xie2021moby,
  title   = {Self-Supervised Learning with Swin Transformers},
  author  = {Xie, Zhenda and Lin, Yutong and Yao, Zhuliang and Zhang, Zheng and Dai, Qi and Cao, Yue and Hu, Han},
  journal = {arXiv preprint arXiv:2105.04553},
  year    = {2021}
}"""

# objective -> the works to cite, the method that produced the weights first
_CITATIONS = {
    "selfpatch": (SELFPATCH_CITATION, DINO_CITATION),
    "selfpatch_moby": (SELFPATCH_CITATION, MOBY_CITATION),
    "dino": (DINO_CITATION, SELFPATCH_CITATION),
    "moby": (MOBY_CITATION, SELFPATCH_CITATION),
}


def citations(objective: str) -> str:
    """The BibTeX entries a card of weights trained with `objective` cites, separated by blank lines."""
    if objective not in _CITATIONS:
        raise ValueError(f"Unknown objective {objective!r}; known: {', '.join(_CITATIONS)}.")
    return "\n\n".join(_CITATIONS[objective])


def template_path(name: str) -> Path:
    """The card template `name` shipped with the package (`backbone_template.md`, ...)."""
    return Path(str(resources.files("selfpatch_hf.hub.cards").joinpath(name)))


def render_card(template: str, card_data: ModelCardData, **values: Any) -> ModelCard:
    """Renders the package template `template` with the metadata `card_data` and the template's `values`."""
    return ModelCard.from_template(card_data, template_path=str(template_path(template)), **values)


def fine_tuned_card_data(
    pipeline_tag: str,
    tags: list[str],
    model_name: str,
    dataset: str,
    hub_dataset_id: str | None,
    eval_split: str | None,
    metrics: Iterable[tuple[str, str, float]],
) -> ModelCardData:
    """The metadata of a fine-tuned model's card: its pipeline, tags, Hub dataset, and a `model-index` with one
    result per `(metric type, metric name, value)` of `metrics` on `dataset`'s `eval_split` (none: no results)."""
    eval_results = [
        EvalResult(
            task_type=pipeline_tag,
            dataset_type=hub_dataset_id or "custom",
            dataset_name=dataset,
            dataset_split=eval_split,
            metric_type=metric_type,
            metric_name=metric_name,
            metric_value=value,
        )
        for metric_type, metric_name, value in metrics
    ]
    return ModelCardData(
        library_name="transformers",
        pipeline_tag=pipeline_tag,
        license=LICENSE,
        tags=tags,
        datasets=[hub_dataset_id] if hub_dataset_id else None,
        model_name=model_name if eval_results else None,
        eval_results=eval_results or None,
    )


def save_card(card: ModelCard, folder: str | Path) -> Path:
    """Writes `card` as `folder/README.md` (creating the folder); returns the path."""
    path = Path(folder) / "README.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    card.save(path)
    return path


__all__ = [
    "DINO_CITATION",
    "LICENSE",
    "MOBY_CITATION",
    "REPO_ID_PLACEHOLDER",
    "SELFPATCH_CITATION",
    "citations",
    "fine_tuned_card_data",
    "render_card",
    "save_card",
    "template_path",
]

"""Model cards of pretraining checkpoints converted from released DINO and MoBY checkpoints (`selfpatch-convert`).

Such a folder holds a `SelfPatchForPretraining` (both networks, heads, centres or queues) set up to continue
training; the card says what it was converted from, which parts are fresh and which objective it continues with.
Rendered from `pretraining_template.md` with `huggingface_hub.ModelCard.from_template`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from huggingface_hub import ModelCard, ModelCardData

from selfpatch_hf.hub.cards.shared import LICENSE, REPO_ID_PLACEHOLDER, citations, render_card, save_card

TEMPLATE_NAME = "pretraining_template.md"


@dataclass
class PretrainingCardInfo:
    """What the card of a converted pretraining checkpoint states."""

    converted_from: str  # file name of the released checkpoint
    source_method: Literal["dino", "moby"]
    source_format: str  # the converter's name of the file's format, e.g. "dino-training"
    # the objective the checkpoint continues with: the patch objective added ("selfpatch") or the method alone
    recipe: Literal["selfpatch", "dino", "moby"]
    fresh_image_head: bool = False  # a backbone-only DINO file: the image head starts fresh too
    model_class: str = "SelfPatchForPretraining"
    license: str = LICENSE

    def __post_init__(self) -> None:
        if self.recipe not in ("selfpatch", self.source_method):
            raise ValueError(
                f"A {self.source_method} checkpoint continues as 'selfpatch' or {self.source_method!r}, not "
                f"{self.recipe!r}."
            )


def _plan(info: PretrainingCardInfo) -> str:
    if info.recipe == "selfpatch" and info.source_method == "moby":
        return (
            'It is set up to continue with the SelfPatch objective (`image_representation="aggregation"`, '
            "`patch_loss_weight=0.1`): the aggregation modules and the patch projectors and predictor are freshly "
            "initialised, and MoBY's projectors now read the aggregation module's summary."
        )
    if info.recipe == "selfpatch":
        fresh = "image head, " if info.fresh_image_head else ""
        return (
            'It is set up to continue with the SelfPatch objective (`image_representation="aggregation"`, '
            f"`patch_loss_weight=0.1`): the {fresh}aggregation module and patch head are freshly initialised, and "
            "the DINO image head now reads the aggregation module's summary instead of the CLS token (with a CLS "
            "image representation the aggregation module would never receive a gradient)."
        )
    if info.recipe == "moby":
        return "It is set up to continue plain MoBY training (`patch_loss_weight=0`), an exact restart."
    return (
        'It is set up to continue plain DINO training (`image_representation="cls"`, `patch_loss_weight=0`).'
    )


def render_pretraining_card(info: PretrainingCardInfo, repo_id: str | None = None) -> ModelCard:
    card_data = ModelCardData(
        license=info.license,
        tags=["selfpatch", info.source_method, "self-supervised", "pretraining-checkpoint"],
    )
    objective = "selfpatch_moby" if info.source_method == "moby" else "selfpatch"
    return render_card(
        TEMPLATE_NAME,
        card_data,
        info=info,
        plan=_plan(info),
        repo_id=repo_id or REPO_ID_PLACEHOLDER,
        citations=citations(objective if info.recipe == "selfpatch" else info.source_method),
    )


def write_pretraining_card(folder: str | Path, info: PretrainingCardInfo) -> Path:
    """Renders the card and writes it as `folder/README.md`; returns the path."""
    return save_card(render_pretraining_card(info), folder)


__all__ = ["PretrainingCardInfo", "render_pretraining_card", "write_pretraining_card"]

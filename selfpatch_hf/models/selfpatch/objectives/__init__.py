"""The image-level objectives SelfPatch is added to, one module each: `dino` (DINO's self-distillation) and `moby`
(MoBY's contrastive learning with queues). `image_objective_class` is the one place where the config's
`image_objective` chooses between them; `base` holds the protocol they follow."""

from __future__ import annotations

from selfpatch_hf.models.selfpatch.objectives.base import ImageObjective, ObjectiveInputError, ObjectiveOutput
from selfpatch_hf.models.selfpatch.objectives.dino import DINOObjective
from selfpatch_hf.models.selfpatch.objectives.moby import MoBYObjective

OBJECTIVES: dict[str, type[ImageObjective]] = {
    objective.name: objective for objective in (DINOObjective, MoBYObjective)
}


def image_objective_class(name: str) -> type[ImageObjective]:
    """The objective class of `config.image_objective` (`"dino"` or `"moby"`)."""
    if name not in OBJECTIVES:
        raise ValueError(f"image_objective must be one of {tuple(OBJECTIVES)}, got {name!r}.")
    return OBJECTIVES[name]


__all__ = [
    "OBJECTIVES",
    "DINOObjective",
    "ImageObjective",
    "MoBYObjective",
    "ObjectiveInputError",
    "ObjectiveOutput",
    "image_objective_class",
]

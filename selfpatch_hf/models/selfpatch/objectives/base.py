"""What an image-level objective is to the pretraining model: the protocol `DINOObjective` and `MoBYObjective`
follow (docs/method.md section 15 explains how to add a third).

An objective is an `nn.Module` that owns everything of its method: the classes of its heads and their construction
for the online and target networks (`build_heads`; the networks hold them under their own names), the criteria of
its image-level loss and of its version of the patch loss, and its state (buffers, so that checkpoints resume it).
Its `forward` runs one step of the method on the two networks: the student on every view, the teacher (and
anything the method does before the teacher's forward, such as MoBY's momentum step), the heads, the losses, and
the update of its state.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import nn

if TYPE_CHECKING:
    from selfpatch_hf.models.selfpatch.configuration import SelfPatchConfig
    from selfpatch_hf.models.selfpatch.networks import (
        SelfPatchStudent,
        SelfPatchTeacher,
        StudentOutput,
        TeacherOutput,
    )

# the keyword arguments every objective's forward takes from the model (not per-step inputs)
_MODEL_ARGUMENTS = ("update_state",)


class ObjectiveInputError(TypeError, ValueError):
    """An argument the objective's `forward` does not take; the message names the objective, what it accepts and,
    where there is one, the right way to do what the argument meant. Both a `TypeError` (what Python raises for an
    unexpected keyword) and a `ValueError`."""


@dataclass
class ObjectiveOutput:
    """One step of an objective: its losses and what the two networks computed."""

    loss: torch.Tensor  # () image_loss + patch_loss_weight * patch_loss
    image_loss: torch.Tensor  # ()
    patch_loss: torch.Tensor | None  # (); None without the patch objective
    student: StudentOutput
    teacher: TeacherOutput


class ImageObjective(nn.Module):
    """Base class of the image-level objectives (with their patch-level counterpart).

    Class attributes (what the model and the training loop read):

    - `name`: the `image_objective` value that selects it; `display_name` for messages.
    - `step_inputs`: names of the per-step schedule values `forward` takes on every call (DINO:
      `("teacher_temperature",)`). The loop passes each from its schedules.
    - `moves_teacher_in_forward`: whether the teacher's momentum step happens inside `forward`, before the teacher
      runs (MoBY; `forward` then takes `teacher_momentum`, which the loop passes with the first micro-batch of
      each optimiser step only). Otherwise the loop calls `model.update_teacher(m)` after the optimiser step.
    - `uses_local_crops`: whether the objective trains on local crops besides the global ones (DINO's multi-crop);
      without (MoBY: its two views), the loop passes `local_crops=None`.
    - `teacher_follows_training_mode`: whether the teacher runs in the model's mode (MoBY: its BatchNorm uses batch
      statistics in training) rather than always in eval mode (DINO).
    - `input_hints`: for arguments a caller may wrongly pass (e.g. DINO given `teacher_momentum`), what to do
      instead.
    - `accepted_inputs`: derived from `forward`'s keyword-only parameters (all but `update_state`).
    """

    name: ClassVar[str]
    display_name: ClassVar[str]
    step_inputs: ClassVar[tuple[str, ...]] = ()
    moves_teacher_in_forward: ClassVar[bool] = False
    uses_local_crops: ClassVar[bool] = True
    teacher_follows_training_mode: ClassVar[bool] = False
    input_hints: ClassVar[Mapping[str, str]] = {}
    accepted_inputs: ClassVar[tuple[str, ...]] = ()

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        parameters = inspect.signature(cls.forward).parameters.values()
        cls.accepted_inputs = tuple(
            p.name for p in parameters if p.kind is p.KEYWORD_ONLY and p.name not in _MODEL_ARGUMENTS
        )
        missing = set(cls.step_inputs) - set(cls.accepted_inputs)
        if missing:
            raise TypeError(
                f"{cls.__name__}.step_inputs names {sorted(missing)}, which its forward does not take."
            )

    def __init__(self, config: SelfPatchConfig):
        super().__init__()
        self.config = config

    @classmethod
    def build_heads(cls, config: SelfPatchConfig, online: bool) -> dict[str, nn.Module | None]:
        """The heads of the online (student, `online=True`) or target (teacher) network, by attribute name, in the
        order they are built; `None` for a head this configuration does not have. Every target head must have an
        online head of the same name and shapes (the teacher is an EMA of the student)."""
        raise NotImplementedError

    def check_inputs(self, inputs: Mapping[str, object]) -> None:
        """Raises `ObjectiveInputError` (one line) for any argument `forward` does not take."""
        unknown = [name for name in inputs if name not in self.accepted_inputs]
        if not unknown:
            return
        hints = [self.input_hints[name] for name in unknown if name in self.input_hints]
        accepted = ", ".join(self.accepted_inputs) or "no per-step inputs"
        message = f"{self.display_name} takes {accepted}, not {', '.join(unknown)}."
        raise ObjectiveInputError(" ".join([message, *hints]))

    def check_views(
        self, global_groups: Sequence[torch.Tensor], local_groups: Sequence[torch.Tensor]
    ) -> None:
        """Raises a `ValueError` naming the problem and the fix if this objective cannot train on these views
        (groups of same-resolution views, `(n_views, B, 3, H, W)`)."""

    def forward(
        self,
        student: SelfPatchStudent,
        teacher: SelfPatchTeacher,
        global_groups: list[torch.Tensor],
        local_groups: list[torch.Tensor],
        *,
        update_state: bool,
    ) -> ObjectiveOutput:
        """One step on the views: the networks, the heads, the losses and, with `update_state`, the objective's
        state. Subclasses add their per-step inputs as keyword-only parameters."""
        raise NotImplementedError

    def init_weights(self, module: nn.Module, std: float) -> None:
        """Initialises the objective's own module types and, for the objective itself, its state. Called by the
        model's `_init_weights` for the modules it does not know."""
        if module is self:
            self.reset_state()

    def reset_state(self) -> None:
        """Sets the state to its start (with `transformers.initialization`, so loading a checkpoint skips it)."""

    def freeze_untrained_parameters(self, student: SelfPatchStudent) -> None:
        """Turns off gradients of the student's parameters that this objective never trains (called after building
        and after loading, which re-creates parameters with gradients)."""

    def last_layer_parameters(self, student: SelfPatchStudent) -> list[nn.Parameter]:
        """Trainable parameters that the training loop freezes during the first epoch(s); none by default."""
        return []


__all__ = ["ImageObjective", "ObjectiveInputError", "ObjectiveOutput"]

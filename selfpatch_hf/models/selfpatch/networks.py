"""The two networks (docs/method.md section 8): the student (MoBY's online network) and the teacher (an EMA of the
student; MoBY's target network).

Both are a backbone f (ViT or Swin), the aggregation module h and the heads of the image-level objective. The
networks compute representations: every view's image representation y (the image head's input) and normalised
patch tokens, and on the teacher's side the positives of every patch and their summaries (the patch head's input).
The objective (`objectives/`) builds the heads, applies them and computes the losses; the heads live here, under
the network's name (`student.image_head`, `teacher.projector`, ...), so that every teacher parameter has a student
parameter of the same name.

Views come in groups of one resolution; within a group they are stacked view-major, `(n_views * B, ...)`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import nn

from selfpatch_hf.models.selfpatch.aggregation import SelfPatchAggregation
from selfpatch_hf.models.selfpatch.backbone import build_backbone, encode
from selfpatch_hf.models.selfpatch.configuration import SelfPatchConfig
from selfpatch_hf.models.selfpatch.neighbors import select_positive_neighbors

if TYPE_CHECKING:
    from selfpatch_hf.models.selfpatch.objectives.base import ImageObjective


@dataclass
class StudentOutput:
    """What the student computes for all views of a batch (before the heads)."""

    grids: list[tuple[int, int]]  # per group, the (h, w) patch grid
    num_views: list[int]  # per group
    batch_size: int  # B
    patch_tokens: list[torch.Tensor]  # per group, (n*B, N, D): patch tokens after the output norm
    image_representations: torch.Tensor  # (V*B, D): y, the image head's input


@dataclass
class TeacherOutput:
    """What the teacher computes for the views it is given (same grouping as [`StudentOutput`])."""

    num_views: list[int]  # per group
    batch_size: int  # B
    image_representations: torch.Tensor  # (V_t*B, D): y~
    # per group, (n*B, N, D): y~_i = out_norm(h~(positives of i)), the patch head's input; None without the patch
    # objective
    patch_summaries: list[torch.Tensor] | None
    positive_indices: list[torch.Tensor] | None  # per group, (n*B, N, k); None without the patch objective


class SelfPatchNetwork(nn.Module):
    """The architecture shared by student and teacher: backbone (ViT or Swin) + aggregation module h + the heads
    the objective builds for this side (`online`: the student).

    The steps both sides take are methods here (`encode`, `image_representation`); what each side computes is its
    own `forward` ([`SelfPatchStudent`], [`SelfPatchTeacher`]).
    """

    online: ClassVar[bool]

    def __init__(
        self, config: SelfPatchConfig, objective_class: type[ImageObjective], drop_path_rate: float = 0.0
    ):
        super().__init__()
        self.config = config
        self.backbone = build_backbone(config, drop_path_rate)
        self.aggregation = SelfPatchAggregation(config) if config.use_aggregation_module else None
        heads = objective_class.build_heads(config, online=self.online)
        self.head_names = tuple(heads)
        for name, head in heads.items():  # absent heads stay attributes, set to None
            setattr(self, name, head)

    def heads(self) -> dict[str, nn.Module]:
        """The heads this network has, by name (e.g. `image_head`, `patch_head`; `projector`, `predictor`)."""
        return {name: head for name in self.head_names if (head := getattr(self, name)) is not None}

    @property
    def output_norm(self) -> nn.LayerNorm:
        """The one LayerNorm after the backbone (`ViTModel.layernorm` / `SwinModel.layernorm`), shared by every reader
        of its tokens."""
        return self.backbone.layernorm

    @property
    def num_prefix_tokens(self) -> int:
        """Tokens before the patch tokens in `last_hidden_state`: the ViT's CLS, none for a Swin."""
        return 0 if self.config.backbone_type == "swin" else 1

    def patch_grid(self, pixel_values: torch.Tensor) -> tuple[int, int]:
        """The `(h, w)` grid of the tokens of f for images `(..., 3, H, W)` (a Swin's last stage)."""
        patch = self.config.patch_size
        return pixel_values.shape[-2] // patch, pixel_values.shape[-1] // patch

    def encode(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`(B, 3, H, W)` -> raw patch features f `(B, N, D)` and the backbone's `last_hidden_state`
        `(B, prefix + N, D)` (see `backbone.encode`)."""
        return encode(self.backbone, pixel_values)

    def image_representation(self, patch_features: torch.Tensor, normed_tokens: torch.Tensor) -> torch.Tensor:
        """The image head's input `(B, D)`: out_norm(h(f_1..f_N)) (SelfPatch, the paper's Eq. 4), the normed CLS
        (DINO, MoBY on a ViT) or the mean of the normed patch tokens (MoBY on a Swin: its average pool)."""
        if self.config.image_representation == "cls":
            return normed_tokens[:, 0]
        if self.config.image_representation == "average_pool":
            return normed_tokens[:, self.num_prefix_tokens :].mean(dim=1)
        return self.output_norm(self.aggregation(patch_features))


class SelfPatchStudent(SelfPatchNetwork):
    """The student (MoBY's online network): every view, with gradients. Image representations and the normalised
    patch tokens of every view (the patch head's input). It never runs the neighbour path (the teacher does)."""

    online = True

    def forward(self, view_groups: Sequence[torch.Tensor]) -> StudentOutput:
        """`view_groups`: groups of same-resolution views, each `(n_views, B, 3, H, W)`."""
        offset = self.num_prefix_tokens
        grids, num_views, patch_tokens, representations = [], [], [], []
        for group in view_groups:
            grids.append(self.patch_grid(group))
            num_views.append(group.shape[0])
            features, normed = self.encode(group.flatten(0, 1))  # (n*B, N, D), (n*B, prefix + N, D)
            representations.append(self.image_representation(features, normed))
            patch_tokens.append(normed[:, offset:])
        return StudentOutput(
            grids, num_views, view_groups[0].shape[1], patch_tokens, torch.cat(representations)
        )


class SelfPatchTeacher(SelfPatchNetwork):
    """The teacher (MoBY's target network): an EMA of the student, never trained by gradients; call it under
    `torch.no_grad()`.

    Image representations for the views it is given and, with the patch objective, the summaries of every patch's
    positives: for every patch i, the k neighbours most similar to it (`select_positive_neighbors`), summarised by
    h (or averaged, in the ablation), `out_norm(h~({f_j : j in top-k of N(i)}))`."""

    online = False

    def forward(self, view_groups: Sequence[torch.Tensor]) -> TeacherOutput:
        """`view_groups`: groups of same-resolution views, each `(n_views, B, 3, H, W)`."""
        use_patch = self.config.use_patch_objective
        num_views, representations, summaries, positive_indices = [], [], [], []
        for group in view_groups:
            num_views.append(group.shape[0])
            features, normed = self.encode(group.flatten(0, 1))
            representations.append(self.image_representation(features, normed))
            if use_patch:
                positives = self.select_positives(features, self.patch_grid(group))  # (n*B, N, k)
                positive_indices.append(positives)
                summaries.append(self.output_norm(self.summarize_positives(features, positives)))
        return TeacherOutput(
            num_views,
            view_groups[0].shape[1],
            torch.cat(representations),
            summaries if use_patch else None,
            positive_indices if use_patch else None,
        )

    def select_positives(self, patch_features: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """`(B, N, D)` raw features -> `(B, N, k)` indices of each patch's positives."""
        return select_positive_neighbors(
            patch_features, grid, self.config.num_positives, self.config.neighborhood_size
        )

    def summarize_positives(
        self, patch_features: torch.Tensor, positive_indices: torch.Tensor
    ) -> torch.Tensor:
        """y_i before the output norm: h (or the mean, in the ablation) over the selected neighbours, `(B, N, D)`."""
        if self.config.neighbor_aggregation == "mean":
            gather_index = positive_indices.flatten(1).unsqueeze(-1).expand(-1, -1, patch_features.shape[-1])
            return patch_features.gather(1, gather_index).view(*positive_indices.shape, -1).mean(dim=2)
        return self.aggregation.aggregate_neighbors(patch_features, positive_indices)

    # ------------------------------------------------------------------------------------------------ the EMA
    def _paired_parameters(self, student: SelfPatchStudent) -> tuple[list[nn.Parameter], list[torch.Tensor]]:
        """Every teacher parameter and the student parameter of the same name (the student also has MoBY's
        predictors, which the teacher lacks)."""
        student_parameters = dict(student.named_parameters())
        teacher_params, student_params = [], []
        for name, param in self.named_parameters():
            teacher_params.append(param)
            student_params.append(student_parameters[name].detach())
        return teacher_params, student_params

    @torch.no_grad()
    def copy_from(self, student: SelfPatchStudent) -> None:
        """Every teacher parameter set to the student's (the start of training)."""
        for teacher_param, student_param in zip(*self._paired_parameters(student), strict=True):
            teacher_param.copy_(student_param)

    @torch.no_grad()
    def momentum_update(self, student: SelfPatchStudent, momentum: float) -> None:
        """`teacher = m * teacher + (1 - m) * student` for every teacher parameter."""
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"Teacher momentum must be in [0, 1], got {momentum}.")
        teacher_params, student_params = self._paired_parameters(student)
        torch._foreach_lerp_(teacher_params, student_params, 1.0 - momentum)


__all__ = ["SelfPatchNetwork", "SelfPatchStudent", "SelfPatchTeacher", "StudentOutput", "TeacherOutput"]

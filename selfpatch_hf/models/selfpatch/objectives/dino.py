"""DINO as the image-level objective (Caron et al. 2021), with SelfPatch's patch loss in DINO's distance
(docs/method.md sections 6-8).

`DINOObjective` owns the projection heads' class (`DINOHead`: g and g' on both networks), the two cross-entropy
criteria and the image and patch centres (buffers). The teacher moves after the optimiser step
(`model.update_teacher(m)`); the teacher temperature of the step is `forward`'s input.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize
from transformers import initialization as init

from selfpatch_hf.models.selfpatch.objectives.base import ImageObjective, ObjectiveOutput
from selfpatch_hf.models.selfpatch.recipes import DINO_TEACHER_TEMPERATURE

if TYPE_CHECKING:
    from selfpatch_hf.models.selfpatch.configuration import SelfPatchConfig
    from selfpatch_hf.models.selfpatch.networks import SelfPatchNetwork, SelfPatchStudent, SelfPatchTeacher

# ---------------------------------------------------------------------------------------------------------------------
# Projection heads (docs/method.md section 6)
# ---------------------------------------------------------------------------------------------------------------------


class DINOHead(nn.Module):
    """MLP -> L2 normalisation -> weight-normalised Linear without bias (DINO's projection head).

    `mlp` is an `nn.Sequential` of Linear/GELU whose Linear indices (0, 2, 4) match the reference checkpoints.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        hidden_dim: int,
        bottleneck_dim: int,
        num_layers: int,
    ):
        super().__init__()
        if num_layers == 1:
            layers: list[nn.Module] = [nn.Linear(in_dim, bottleneck_dim)]
        else:
            layers = [nn.Linear(in_dim, hidden_dim), nn.GELU()]
            for _ in range(num_layers - 2):
                layers += [nn.Linear(hidden_dim, hidden_dim), nn.GELU()]
            layers.append(nn.Linear(hidden_dim, bottleneck_dim))
        self.mlp = nn.Sequential(*layers)
        self.last_layer = nn.utils.parametrizations.weight_norm(
            nn.Linear(bottleneck_dim, out_dim, bias=False)
        )
        # g starts at 1 (the objective's init_weights) and with norm_last_layer stays frozen (also after loading):
        # only the direction of each output row is learned

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = F.normalize(self.mlp(hidden_states), dim=-1, p=2)
        return self.last_layer(hidden_states)


def patch_logits(
    head: DINOHead, patch_inputs: Sequence[torch.Tensor], num_views: Sequence[int], batch_size: int
) -> list[torch.Tensor]:
    """A patch head on every group's `(n*B, N, D)` inputs -> per group `(n, B, N, K')`, in one call on the tokens of
    every group concatenated (one large matrix product per layer, and the weight-normalised last layer is
    normalised once per step)."""
    logits = head(torch.cat([x.flatten(0, 1) for x in patch_inputs]))
    sizes = [x.shape[0] * x.shape[1] for x in patch_inputs]
    return [
        chunk.view(n, batch_size, x.shape[1], -1)
        for chunk, n, x in zip(logits.split(sizes), num_views, patch_inputs)
    ]


# ---------------------------------------------------------------------------------------------------------------------
# Losses and their centres (docs/method.md section 7)
# ---------------------------------------------------------------------------------------------------------------------


class DINOImageLoss(nn.Module):
    """DINO's cross-view loss (docs/method.md section 7): every teacher view q (a global crop) against every student view
    v != q, `CE(softmax((t_q - C) / T_t), log_softmax(s_v / T_s))`, averaged over the batch and the G * (V - 1) pairs.
    """

    def __init__(self, student_temperature: float):
        super().__init__()
        self.student_temperature = student_temperature

    def forward(
        self,
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor,
        center: torch.Tensor,
        teacher_temperature: float,
    ) -> torch.Tensor:
        """
        Args:
            student_logits: `(V, B, K)` for all views.
            teacher_logits: `(G, B, K)` for the first G views (the globals).
            center: `(1, K)`.
        Returns:
            The loss, a scalar.
        """
        num_views, num_teacher = student_logits.shape[0], teacher_logits.shape[0]
        num_pairs = num_teacher * (num_views - 1)
        if num_pairs == 0:
            raise ValueError(
                "The image loss needs at least two views (e.g. 2 global crops, or 1 global + local crops)."
            )
        teacher_probs = F.softmax((teacher_logits - center) / teacher_temperature, dim=-1)  # (G, B, K)
        student_log_probs = F.log_softmax(student_logits / self.student_temperature, dim=-1)  # (V, B, K)
        # sum_q sum_{v != q} CE(q, v) = sum_v CE(sum_q p_q, v) - sum_q CE(p_q, q): one pass over the V student views
        all_pairs = -(teacher_probs.sum(0, keepdim=True) * student_log_probs).sum(-1).sum(0)  # (B,)
        same_view = -(teacher_probs * student_log_probs[:num_teacher]).sum(-1).sum(0)  # (B,)
        return (all_pairs - same_view).mean() / num_pairs


class DINOPatchLoss(nn.Module):
    """SelfPatch's patch loss with DINO's distance (docs/method.md section 7): for every view, each student patch output
    against the teacher's summary of that patch's positives, `CE(softmax((t_i - C_p) / T_t), log_softmax(s_i / T_s))`;
    the mean over batch and patches of each view, then over the views."""

    def __init__(self, student_temperature: float):
        super().__init__()
        self.student_temperature = student_temperature

    def forward(
        self,
        student_logits: Sequence[torch.Tensor],
        teacher_logits: Sequence[torch.Tensor],
        center: torch.Tensor,
        teacher_temperature: float,
    ) -> torch.Tensor:
        """
        Args:
            student_logits: per group of same-resolution views, `(n, B, N, K')`.
            teacher_logits: the teacher's patch targets, same shapes.
            center: `(1, K')`.
        Returns:
            The loss, a scalar: every view weighs the same, whatever its number of patches.
        """
        per_view = [
            self.per_view_losses(student.float(), teacher.float(), center, teacher_temperature)
            for student, teacher in zip(student_logits, teacher_logits, strict=True)
        ]
        return torch.cat(per_view).mean()

    def per_view_losses(
        self,
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor,
        center: torch.Tensor,
        temperature: float,
    ) -> torch.Tensor:
        """`(n, B, N, K')` logits -> `(n,)` per-view means over batch and patches."""
        teacher_probs = F.softmax((teacher_logits - center) / temperature, dim=-1)
        # cross_entropy with probability targets: one fused pass instead of log_softmax, product and sum (~17% faster)
        per_token = F.cross_entropy(
            (student_logits / self.student_temperature).flatten(0, -2),
            teacher_probs.flatten(0, -2),
            reduction="none",
        )
        return per_token.view(student_logits.shape[0], -1).mean(dim=1)


@torch.no_grad()
def ema_center_update(center: torch.Tensor, logits: Sequence[torch.Tensor], momentum: float) -> None:
    """`center <- m * center + (1 - m) * mean(logits)`, the mean over every row of every tensor and every process."""
    total = torch.stack([x.reshape(-1, x.shape[-1]).float().sum(0) for x in logits]).sum(0, keepdim=True)
    # a fill on the device, not a copy of a host scalar (which would wait for the GPU's queue)
    count = torch.full(
        (), float(sum(x.reshape(-1, x.shape[-1]).shape[0] for x in logits)), device=center.device
    )
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(total)
        dist.all_reduce(count)
    center.mul_(momentum).add_(total / count, alpha=1 - momentum)


# ---------------------------------------------------------------------------------------------------------------------
# The objective
# ---------------------------------------------------------------------------------------------------------------------


class DINOObjective(ImageObjective):
    """DINO + (with `patch_loss_weight > 0`) SelfPatch's patch loss: heads g, g' (`image_head`, `patch_head` on
    both networks), their criteria, and the centres `image_center` `(1, K)` and `patch_center` `(1, K')` (empty
    without the patch objective), which move after the loss used them when `update_state` is set."""

    name = "dino"
    display_name = "DINO"
    step_inputs = ("teacher_temperature",)
    input_hints = {
        "teacher_momentum": (
            "DINO moves the teacher after the optimiser step: call model.update_teacher(momentum) then, instead "
            "of passing teacher_momentum."
        )
    }

    def __init__(self, config: SelfPatchConfig):
        super().__init__(config)
        self.use_patch = config.use_patch_objective
        self.image_criterion = DINOImageLoss(config.student_temperature)
        self.patch_criterion = DINOPatchLoss(config.student_temperature) if self.use_patch else None
        self.register_buffer("image_center", torch.zeros(1, config.image_out_dim))
        self.register_buffer("patch_center", torch.zeros(1, config.patch_out_dim if self.use_patch else 0))

    @classmethod
    def build_heads(cls, config: SelfPatchConfig, online: bool) -> dict[str, nn.Module | None]:
        """The same heads on both networks: g (image) and, with the patch objective, g' (patch)."""
        head_kwargs = {
            "hidden_dim": config.head_hidden_dim,
            "bottleneck_dim": config.head_bottleneck_dim,
            "num_layers": config.head_num_layers,
        }
        return {
            "image_head": DINOHead(config.hidden_size, config.image_out_dim, **head_kwargs),
            "patch_head": (
                DINOHead(config.hidden_size, config.patch_out_dim, **head_kwargs)
                if config.use_patch_objective
                else None
            ),
        }

    def forward(
        self,
        student: SelfPatchStudent,
        teacher: SelfPatchTeacher,
        global_groups: list[torch.Tensor],
        local_groups: list[torch.Tensor],
        *,
        update_state: bool,
        teacher_temperature: float = DINO_TEACHER_TEMPERATURE,
    ) -> ObjectiveOutput:
        """
        teacher_temperature (`float`, *optional*, defaults to `DINO_TEACHER_TEMPERATURE`, 0.04):
            Teacher softmax temperature of this step (its warm-up schedule belongs to the training loop).
        """
        num_global = sum(group.shape[0] for group in global_groups)
        # Student: every view, views of one resolution as one batch. Teacher: the globals for the image targets;
        # with the patch objective every view (patch targets per view).
        online = student(global_groups + local_groups)
        with torch.no_grad():
            target = teacher(global_groups + local_groups if self.use_patch else global_groups)
        batch_size = online.batch_size
        student_logits = student.image_head(online.image_representations).unflatten(0, (-1, batch_size))
        with torch.no_grad():
            teacher_logits = teacher.image_head(target.image_representations).unflatten(0, (-1, batch_size))
        image_loss = self.image_criterion(
            student_logits.float(),  # (V, B, K)
            teacher_logits[:num_global].float(),  # (G, B, K)
            self.image_center,
            teacher_temperature,
        )
        patch_loss, teacher_patch_logits, loss = None, None, image_loss
        if self.use_patch:
            student_patch_logits = patch_logits(
                student.patch_head, online.patch_tokens, online.num_views, batch_size
            )
            with torch.no_grad():
                teacher_patch_logits = patch_logits(
                    teacher.patch_head, target.patch_summaries, target.num_views, batch_size
                )
            patch_loss = self.patch_criterion(
                student_patch_logits, teacher_patch_logits, self.patch_center, teacher_temperature
            )
            loss = image_loss + self.config.patch_loss_weight * patch_loss
        if update_state:
            self.update_centers(teacher_logits, teacher_patch_logits)
        return ObjectiveOutput(loss, image_loss, patch_loss, online, target)

    @torch.no_grad()
    def update_centers(
        self, teacher_logits: torch.Tensor, teacher_patch_logits: Sequence[torch.Tensor] | None
    ) -> None:
        """Moves the centres towards this batch's teacher outputs (after the loss used them). The image centre
        averages over every view the teacher saw: all V with the patch objective (reference SelfPatch), the globals
        for plain DINO (the only views its teacher sees)."""
        momentum = self.config.center_momentum
        ema_center_update(self.image_center, [teacher_logits], momentum)
        if teacher_patch_logits is not None:
            ema_center_update(self.patch_center, teacher_patch_logits, momentum)

    def init_weights(self, module: nn.Module, std: float) -> None:
        """DINO's head init for the weight-normalised last layers: magnitude g = 1 (frozen with `norm_last_layer`),
        direction v as torch's `nn.Linear` draws it (DINO's `DINOHead` sets `weight_g` to 1 and leaves `weight_v`
        at that draw). Every parametrisation in the model is a head's weight norm (`original0` = g)."""
        if isinstance(module, parametrize.ParametrizationList):
            init.ones_(module.original0)
        super().init_weights(module, std)

    def reset_state(self) -> None:
        init.zeros_(self.image_center)
        init.zeros_(self.patch_center)

    def _student_heads(self, student: SelfPatchNetwork) -> list[DINOHead]:
        return [head for head in (student.image_head, student.patch_head) if head is not None]

    def freeze_untrained_parameters(self, student: SelfPatchStudent) -> None:
        """With `norm_last_layer`, the weight-norm magnitudes of the heads' last layers stay at 1."""
        if self.config.norm_last_layer:
            for head in self._student_heads(student):
                head.last_layer.parametrizations.weight.original0.requires_grad_(False)

    def last_layer_parameters(self, student: SelfPatchStudent) -> list[nn.Parameter]:
        """The trainable parameters of the student heads' last layers (frozen during the first epoch)."""
        return [
            p
            for head in self._student_heads(student)
            for p in head.last_layer.parameters()
            if p.requires_grad
        ]


__all__ = ["DINOHead", "DINOImageLoss", "DINOObjective", "DINOPatchLoss", "ema_center_update", "patch_logits"]

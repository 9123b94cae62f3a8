"""MoBY as the image-level objective (Xie et al. 2021, "Self-supervised learning with Swin Transformers"), with
SelfPatch's patch loss in MoBY's distance (docs/moby_swin.md).

`MoBYObjective` owns MoBY's projector / predictor MLPs (`MoBYMLP`: the online network's projectors and predictors,
the target network's projectors), the InfoNCE criteria and the two key queues with their pointer (buffers). As in
MoBY, the target takes its momentum step inside `forward`, before the keys are computed (`teacher_momentum`).

Losses and similarities run in fp32 also under autocast (bf16 / fp16 training): the projectors compute in the
autocast precision, the contrasted vectors are cast to fp32 and normalised, and the products against the queue
and the other images' negatives leave autocast, whose lower precision would otherwise round them.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init

from selfpatch_hf.models.selfpatch.objectives.base import ImageObjective, ObjectiveOutput

if TYPE_CHECKING:
    from selfpatch_hf.models.selfpatch.configuration import SelfPatchConfig
    from selfpatch_hf.models.selfpatch.networks import SelfPatchNetwork, SelfPatchStudent, SelfPatchTeacher

logger = logging.getLogger(__name__)


class MoBYMLP(nn.Module):
    """MoBY's projector / predictor: `Linear(in, inner) - BatchNorm1d - ReLU - Linear(inner, out)`.

    Module names follow MoBY's public code (`linear_hidden.{1,2}`, `linear_out`; index 0 is an identity), so its
    checkpoints map key for key. BatchNorm uses the statistics of the batch it is given (one view at a time, as
    MoBY calls it); `sync_batch_norm` makes them global in multi-process GPU runs.
    """

    def __init__(self, in_dim: int, inner_dim: int, out_dim: int):
        super().__init__()
        self.linear_hidden = nn.Sequential(
            nn.Identity(), nn.Linear(in_dim, inner_dim), nn.BatchNorm1d(inner_dim), nn.ReLU(inplace=True)
        )
        self.linear_out = nn.Linear(inner_dim, out_dim)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """`(..., in_dim)` -> `(..., out_dim)`; leading dimensions are flattened into BatchNorm's batch."""
        leading = hidden_states.shape[:-1]
        hidden_states = self.linear_out(
            self.linear_hidden(hidden_states.reshape(-1, hidden_states.shape[-1]))
        )
        return hidden_states.view(*leading, -1)


def project(
    network: SelfPatchNetwork, hidden_states: torch.Tensor, batch_size: int, patch: bool
) -> torch.Tensor:
    """MoBY's heads on `(n*B, ..., D)` inputs, one view of B images at a time as MoBY calls them (BatchNorm
    statistics per view): the (patch) projector, then, on the online network, the (patch) predictor.
    Returns `(n, B, ..., d)`."""
    projector = network.patch_projector if patch else network.projector
    predictor = network.patch_predictor if patch else network.predictor
    views = []
    for view in hidden_states.split(batch_size):
        projected = projector(view)
        views.append(predictor(projected) if predictor is not None else projected)
    return torch.stack(views)


# ---------------------------------------------------------------------------------------------------------------------
# Losses
# ---------------------------------------------------------------------------------------------------------------------


class MoBYContrastiveLoss(nn.Module):
    """MoBY's `contrastive_loss`: InfoNCE of L2-normalised queries against their key (the positive, first) and the
    queue's keys (the negatives), `CE([q.k, q.queue] / T, 0)`, averaged over the batch. In fp32 under autocast."""

    def __init__(self, temperature: float):
        super().__init__()
        self.temperature = temperature

    def forward(self, queries: torch.Tensor, keys: torch.Tensor, queue: torch.Tensor) -> torch.Tensor:
        """queries, keys: `(B, d)`, normalised; queue: `(d, K)` normalised keys. Returns a scalar."""
        with torch.autocast(queries.device.type, enabled=False):
            queries, keys = queries.float(), keys.float()
            positive = (queries * keys).sum(-1, keepdim=True)  # (B, 1)
            # a copy: the queue is updated in place after the loss, before the backward pass needs it
            negative = queries @ queue.detach().float().clone()  # (B, K)
            logits = torch.cat([positive, negative], dim=1) / self.temperature
            return F.cross_entropy(logits, torch.zeros(len(logits), dtype=torch.long, device=logits.device))


class MoBYPatchCosineLoss(nn.Module):
    """SelfPatch's patch loss with MoBY's distance, without negatives (`patch_negatives=False`; docs/moby_swin.md):
    for every view and every patch i, BYOL's `2 - 2 cos(p_i, z_i)` between the online output
    p_i = pred'(proj'(out_norm(f_i))) and the target z_i = proj~'(y~_i). The mean over batch and patches of each
    view, then over the views (like the DINO patch loss)."""

    def forward(
        self, online_outputs: Sequence[torch.Tensor], target_outputs: Sequence[torch.Tensor]
    ) -> torch.Tensor:
        """online_outputs, target_outputs: per group of views, `(n, B, N, d)`. Returns a scalar."""
        per_view = []
        for online, target in zip(online_outputs, target_outputs, strict=True):
            online = F.normalize(online.float(), dim=-1)
            target = F.normalize(target.float(), dim=-1)
            positive = (online * target).sum(-1)  # (n, B, N)
            per_view.append((2 - 2 * positive).flatten(1).mean(1))
        return torch.cat(per_view).mean()


class MoBYPatchInfoNCELoss(nn.Module):
    """SelfPatch's patch loss with MoBY's distance and negatives (`patch_negatives=True`, the paper's Table 5
    "Negative"; docs/moby_swin.md): for every view and every patch i of image b, InfoNCE at `temperature`,
    `CE([p_i.z_i, p_i.n_c for c != b] / T, 0)`, between the online output p_i and the target z_i (as in
    [`MoBYPatchCosineLoss`]), whose negatives n_c are the target patch projector's outputs for the target image
    representations y~ of the other images c of the batch (same view). Needs at least 2 images. The mean over batch
    and patches of each view, then over the views. In fp32 under autocast."""

    def __init__(self, temperature: float):
        super().__init__()
        self.temperature = temperature

    def forward(
        self,
        online_outputs: Sequence[torch.Tensor],
        target_outputs: Sequence[torch.Tensor],
        target_negatives: Sequence[torch.Tensor],
    ) -> torch.Tensor:
        """
        Args:
            online_outputs: per group of views, `(n, B, N, d)`.
            target_outputs: per group, `(n, B, N, d)`.
            target_negatives: per group, `(n, B, d)`.
        Returns:
            The loss, a scalar.
        """
        per_view = []
        for online, target, negatives in zip(online_outputs, target_outputs, target_negatives, strict=True):
            batch = online.shape[1]
            if batch < 2:
                raise ValueError(
                    "The MoBY patch loss with negatives takes its negatives from the other images of the batch: "
                    "use a batch of at least 2 images per process, or patch_negatives=False."
                )
            with torch.autocast(online.device.type, enabled=False):
                online = F.normalize(online.float(), dim=-1)
                target = F.normalize(target.float(), dim=-1)
                positive = (online * target).sum(-1)  # (n, B, N)
                negatives = F.normalize(negatives.float(), dim=-1)  # (n, B, d)
                similarity = torch.einsum("vbnd,vcd->vbnc", online, negatives)  # (n, B, N, B)
                # for image b, the columns of every other image c != b
                others = torch.arange(batch, device=online.device).repeat(batch, 1)
                others = others[~torch.eye(batch, dtype=torch.bool, device=online.device)].view(
                    batch, batch - 1
                )
                index_shape = (*similarity.shape[:-1], batch - 1)
                other_images = similarity.gather(
                    -1, others[None, :, None, :].expand(index_shape)
                )  # (n, B, N, B-1)
                logits = torch.cat([positive.unsqueeze(-1), other_images], dim=-1) / self.temperature
                per_token = F.cross_entropy(
                    logits.flatten(0, -2),
                    torch.zeros(logits[..., 0].numel(), dtype=torch.long, device=logits.device),
                    reduction="none",
                )
            per_view.append(per_token.view(online.shape[0], -1).mean(1))
        return torch.cat(per_view).mean()


# ---------------------------------------------------------------------------------------------------------------------
# Several processes: the keys of every process, BatchNorm over the global batch
# ---------------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def gather_across_processes(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenates `tensor` `(n, ...)` of every process in rank order, `(world_size * n, ...)`; itself when
    `torch.distributed` is not initialised (MoBY's `dist_collect`, for keys without gradient)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensor
    gathered = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, tensor.contiguous())
    return torch.cat(gathered)


def sync_batch_norm(model: nn.Module, device: torch.device | str) -> nn.Module:
    """Converts the BatchNorm layers of MoBY's MLPs (projectors, predictors) to `nn.SyncBatchNorm`, as MoBY does in
    multi-process runs, so their batch statistics cover the global batch. Call it before wrapping the model in
    DDP (e.g. before `accelerator.prepare`), where `device` is the training device.

    torch's `SyncBatchNorm` runs on GPUs only: on a CPU (gloo) the model is returned unchanged, each process
    normalising with its own batch's statistics, and a warning says so. A single process needs no conversion
    (`SyncBatchNorm` then equals `BatchNorm1d`)."""
    if torch.device(device).type == "cpu":
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            logger.warning(
                "MoBY's BatchNorm stays per process on the CPU (torch's SyncBatchNorm needs a GPU): each process "
                "normalises with its own batch's statistics."
            )
        return model
    return nn.SyncBatchNorm.convert_sync_batchnorm(model)


# ---------------------------------------------------------------------------------------------------------------------
# The objective
# ---------------------------------------------------------------------------------------------------------------------


class MoBYObjective(ImageObjective):
    """MoBY + (with `patch_loss_weight > 0`) SelfPatch's patch loss with MoBY's distance.

    Heads: projector and predictor on the online network, projector on the target (`projector`, `predictor`;
    with the patch objective also `patch_projector`, `patch_predictor`). State: one `(d, K)` queue of keys per view
    (`queue1`, `queue2`) and their shared pointer `queue_ptr`, MoBY's layout; with `update_state` this step's keys
    of every process replace the oldest ones after the loss used the queues. Inputs: exactly two views as
    `global_crops` and no local crops."""

    name = "moby"
    display_name = "MoBY"
    moves_teacher_in_forward = True
    uses_local_crops = False  # two views: the global crops
    # the target network runs in the model's mode: its BatchNorm normalises with batch statistics in training
    teacher_follows_training_mode = True
    input_hints = {
        "teacher_temperature": "MoBY's temperature is the config's moby_temperature, the same at every step."
    }

    def __init__(self, config: SelfPatchConfig):
        super().__init__(config)
        self.use_patch = config.use_patch_objective
        self.negatives = config.patch_negatives
        self.image_criterion = MoBYContrastiveLoss(config.moby_temperature)
        self.patch_criterion = None
        if self.use_patch:
            self.patch_criterion = (
                MoBYPatchInfoNCELoss(config.moby_temperature) if self.negatives else MoBYPatchCosineLoss()
            )
        self.register_buffer("queue1", torch.zeros(config.moby_projection_dim, config.moby_queue_size))
        self.register_buffer("queue2", torch.zeros(config.moby_projection_dim, config.moby_queue_size))
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))

    @classmethod
    def build_heads(cls, config: SelfPatchConfig, online: bool) -> dict[str, nn.Module | None]:
        """Projector (and, online, predictor); with the patch objective their patch-level twins (own weights, same
        shapes), which read the patch tokens (online) or the summaries of the positives (target)."""
        dim, inner, out = config.hidden_size, config.moby_projector_hidden_dim, config.moby_projection_dim
        predictor_inner = config.moby_predictor_hidden_dim
        patch = config.use_patch_objective
        heads: dict[str, nn.Module | None] = {"projector": MoBYMLP(dim, inner, out)}
        heads["predictor"] = MoBYMLP(out, predictor_inner, out) if online else None
        heads["patch_projector"] = MoBYMLP(dim, inner, out) if patch else None
        heads["patch_predictor"] = MoBYMLP(out, predictor_inner, out) if patch and online else None
        return heads

    def check_views(
        self, global_groups: Sequence[torch.Tensor], local_groups: Sequence[torch.Tensor]
    ) -> None:
        num_views = sum(group.shape[0] for group in global_groups)
        if num_views != 2 or local_groups:
            raise ValueError(
                f"MoBY takes exactly two views as global_crops, (B, 2, 3, H, W), and local_crops=None; got "
                f"{num_views} global and {sum(g.shape[0] for g in local_groups)} local crops."
            )
        if self.training and global_groups[0].shape[1] < 2:
            raise ValueError(
                "MoBY's projectors normalise with the statistics of the batch (BatchNorm): training needs at "
                "least 2 images per process."
            )

    def forward(
        self,
        student: SelfPatchStudent,
        teacher: SelfPatchTeacher,
        global_groups: list[torch.Tensor],
        local_groups: list[torch.Tensor],
        *,
        update_state: bool,
        teacher_momentum: float | None = None,
    ) -> ObjectiveOutput:
        """
        teacher_momentum (`float`, *optional*):
            This step's target momentum: the target network takes its momentum step with it at the start of the
            call, before the keys are computed, from the online weights before this step's update (MoBY's order).
            `None` (e.g. the later micro-batches of an accumulated step) leaves the target as it is.
        """
        views = global_groups  # the two views (check_views)
        online = student(views)
        batch_size = online.batch_size
        queries = project(student, online.image_representations, batch_size, patch=False)  # (2, B, d)
        online_patch = None
        if self.use_patch:
            online_patch = [
                project(student, tokens, batch_size, patch=True) for tokens in online.patch_tokens
            ]
        if teacher_momentum is not None:
            teacher.momentum_update(student, teacher_momentum)  # before the key forward, as MoBY
        with torch.no_grad():
            target = teacher(views)
            keys = project(teacher, target.image_representations, batch_size, patch=False)  # (2, B, d)
            if self.use_patch:
                target_patch = [
                    project(teacher, summaries, batch_size, patch=True)
                    for summaries in target.patch_summaries
                ]
                # the other images' negatives: the patch projector on the target's image representations y~
                negatives = None
                if self.negatives:
                    negatives = [
                        project(teacher, group, batch_size, patch=True)  # (n, B, d)
                        for group in target.image_representations.split(
                            [n * batch_size for n in target.num_views]
                        )
                    ]
        queries = F.normalize(queries.float(), dim=-1)
        keys = F.normalize(keys.float(), dim=-1)
        # each view's prediction against the other view's key and the queue of that other view's keys
        image_loss = self.image_criterion(queries[0], keys[1], self.queue2) + self.image_criterion(
            queries[1], keys[0], self.queue1
        )
        patch_loss, loss = None, image_loss
        if self.use_patch:
            if self.negatives:
                patch_loss = self.patch_criterion(online_patch, target_patch, negatives)
            else:
                patch_loss = self.patch_criterion(online_patch, target_patch)
            loss = image_loss + self.config.patch_loss_weight * patch_loss
        if update_state:
            self.enqueue_keys(keys[0], keys[1])
        return ObjectiveOutput(loss, image_loss, patch_loss, online, target)

    @torch.no_grad()
    def enqueue_keys(self, keys1: torch.Tensor, keys2: torch.Tensor) -> None:
        """Replaces the oldest keys of `queue1` / `queue2` by this step's normalised keys `(B, d)` of view 1 / view 2,
        gathered from every process in rank order, and advances `queue_ptr` (after the loss used the queues).
        Unlike MoBY, the queue size need not be a multiple of the global batch: writing wraps around."""
        keys1, keys2 = gather_across_processes(keys1), gather_across_processes(keys2)
        count, size = keys1.shape[0], self.queue1.shape[1]
        if count > size:
            raise ValueError(
                f"A global batch of {count} keys does not fit a queue of {size}: raise moby_queue_size to at least "
                f"the global batch size."
            )
        pointer = int(self.queue_ptr)
        columns = (pointer + torch.arange(count, device=self.queue1.device)) % size
        self.queue1[:, columns] = keys1.T.to(self.queue1.dtype)
        self.queue2[:, columns] = keys2.T.to(self.queue2.dtype)
        self.queue_ptr[0] = (pointer + count) % size

    def reset_state(self) -> None:
        """The queues start as random unit keys (MoBY), the pointer at 0."""
        for queue in (self.queue1, self.queue2):
            init.copy_(queue, F.normalize(torch.randn_like(queue), dim=0))
        init.zeros_(self.queue_ptr)


__all__ = [
    "MoBYContrastiveLoss",
    "MoBYMLP",
    "MoBYObjective",
    "MoBYPatchCosineLoss",
    "MoBYPatchInfoNCELoss",
    "gather_across_processes",
    "project",
    "sync_batch_norm",
]

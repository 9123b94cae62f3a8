"""SelfPatch pretraining model: an image-level self-supervised objective (DINO or MoBY) plus the patch-level objective
of Yun et al., "Patch-level Representation Learning for Self-supervised Vision Transformers" (CVPR 2022), on a ViT
or a Swin Transformer backbone.

The model composes the parts, each in its own module (docs/method.md section 15):

- `backbone`: the ViT / Swin backbone f, with the student's stochastic depth (section 2);
- `neighbors`: the neighbourhood table and the teacher's positive matching (sections 3-4);
- `aggregation`: the aggregation module h (section 5);
- `networks`: the student and its EMA teacher (backbone + h + the objective's heads; section 8);
- `objectives/`: the image-level objective, one module each (`dino`: heads, losses and centres, sections 6-7;
  `moby`: projectors, predictors, InfoNCE losses and key queues, `docs/moby_swin.md`).

`SelfPatchForPretraining` (alias `SelfPatchViTForPretraining`) holds the student, the teacher and ONE objective,
chosen by `config.image_objective`; one call returns the losses.

Notation in shape comments: B images, V views (G global + L local crops), N patches of a view on an h x w grid,
D hidden size, k positives, K / K' image / patch head output sizes.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import parametrize
from transformers import AutoModelForPreTraining, PreTrainedModel
from transformers import initialization as init
from transformers.conversion_mapping import register_checkpoint_conversion_mapping
from transformers.core_model_loading import WeightRenaming
from transformers.utils import ModelOutput

from selfpatch_hf.models.selfpatch.aggregation import SelfPatchAggregation
from selfpatch_hf.models.selfpatch.configuration import SelfPatchConfig
from selfpatch_hf.models.selfpatch.neighbors import build_neighbor_table, select_positive_neighbors
from selfpatch_hf.models.selfpatch.networks import SelfPatchNetwork, SelfPatchStudent, SelfPatchTeacher
from selfpatch_hf.models.selfpatch.objectives import ObjectiveOutput, image_objective_class
from selfpatch_hf.models.selfpatch.objectives.moby import sync_batch_norm

# The objective's buffers, which lived at the top of the model before the objectives owned their state, now under
# `objective.`. `save_pretrained` folders keep their former names on disk (transformers' conversion mapping below
# renames them when loading and back when saving, as it does for the backbones' v4 names), so folders of every
# version load; accelerate's checkpoints hold the live names, and those of earlier versions are renamed by a
# `load_state_dict` pre-hook.
LEGACY_STATE_NAMES = ("image_center", "patch_center", "queue1", "queue2", "queue_ptr")
OBJECTIVE_PREFIX = "objective."


@dataclass
class SelfPatchPretrainingOutput(ModelOutput):
    """
    Output of [`SelfPatchForPretraining`].

    loss (`torch.FloatTensor` of shape `()`):
        `image_loss + patch_loss_weight * patch_loss`.
    image_loss (`torch.FloatTensor` of shape `()`):
        The image-level loss: DINO's cross-view loss, or MoBY's two InfoNCE terms (summed, as MoBY does).
    patch_loss (`torch.FloatTensor` of shape `()`, *optional*):
        SelfPatch patch-level loss; `None` when `patch_loss_weight == 0` (the patch path is skipped).
    student_patch_representations (`tuple[torch.FloatTensor]`):
        Per view (globals first, then locals), `(B, N_v, D)`: the student's patch tokens after the output norm (what
        the patch head reads and what an exported backbone's `last_hidden_state` returns, after the CLS for a ViT).
    student_image_representations (`tuple[torch.FloatTensor]`):
        Per view, `(B, D)`: the image-level representation fed to the image head.
    teacher_positive_indices (`tuple[torch.LongTensor]`, *optional*):
        Per view, `(B, N_v, k)`: the neighbours the teacher selected as positives for each patch (row-major indices
        into the view's patch grid). `None` without the patch objective.
    patch_grids (`tuple[tuple[int, int]]`):
        Per view, the `(h, w)` patch grid.
    """

    loss: torch.FloatTensor | None = None
    image_loss: torch.FloatTensor | None = None
    patch_loss: torch.FloatTensor | None = None
    student_patch_representations: tuple[torch.FloatTensor, ...] | None = None
    student_image_representations: tuple[torch.FloatTensor, ...] | None = None
    teacher_positive_indices: tuple[torch.LongTensor, ...] | None = None
    patch_grids: tuple[tuple[int, int], ...] | None = None


def group_views_by_resolution(
    crops: torch.Tensor | Sequence[torch.Tensor] | None, name: str
) -> list[torch.Tensor]:
    """Normalises crops to a list of `(n_views, B, 3, H, W)` tensors, one per run of same-resolution views."""
    if crops is None:
        return []
    if isinstance(crops, torch.Tensor):
        if crops.ndim == 4:  # a single view (B, 3, H, W)
            crops = crops.unsqueeze(1)
        if crops.ndim != 5:
            raise ValueError(
                f"{name} must be (B, n_views, 3, H, W) or a list of (B, 3, H, W), got {tuple(crops.shape)}."
            )
        return [crops.transpose(0, 1)] if crops.shape[1] > 0 else []
    groups: list[list[torch.Tensor]] = []
    for view in crops:
        if view.ndim != 4:
            raise ValueError(f"Each view in {name} must be (B, 3, H, W), got {tuple(view.shape)}.")
        if groups and groups[-1][-1].shape == view.shape:
            groups[-1].append(view)
        else:
            groups.append([view])
    return [torch.stack(group) for group in groups]


def _load_legacy_state_names(module, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
    """`load_state_dict` pre-hook: renames the objective's buffers of older checkpoints (`image_center`, ...) to
    their place under `objective.` (accelerate's `load_state` resumes through `load_state_dict`)."""
    for name in LEGACY_STATE_NAMES:
        old, new = prefix + name, prefix + OBJECTIVE_PREFIX + name
        if old in state_dict and new not in state_dict:
            state_dict[new] = state_dict.pop(old)


class SelfPatchPreTrainedModel(PreTrainedModel):
    config_class = (
        SelfPatchConfig  # explicit: annotations are strings under `from __future__ import annotations`
    )
    base_model_prefix = "selfpatch"
    main_input_name = "global_crops"
    input_modalities = ("image",)
    supports_gradient_checkpointing = True
    _no_split_modules = [
        "ViTEmbeddings",
        "ViTLayer",
        "StochasticDepthViTLayer",
        "SwinStage",
        "ClassAttentionBlock",
    ]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """Truncated-normal Linear weights with zero biases, unit LayerNorms and BatchNorms (DINO, SelfPatch and
        MoBY init); the objective initialises its own modules and state (MoBY's queues start as random unit keys).
        The backbones (`ViTModel`, `SwinModel`) initialise themselves."""
        std = self.config.initializer_range
        if isinstance(module, nn.Linear) and not parametrize.is_parametrized(module):
            init.trunc_normal_(module.weight, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm | nn.BatchNorm1d):
            init.ones_(module.weight)
            init.zeros_(module.bias)
            if isinstance(module, nn.BatchNorm1d):
                init.zeros_(module.running_mean)
                init.ones_(module.running_var)
                init.zeros_(module.num_batches_tracked)
        elif isinstance(module, SelfPatchAggregation):
            init.trunc_normal_(module.cls_token, std=std)
        else:
            self.objective.init_weights(module, std)


class SelfPatchForPretraining(SelfPatchPreTrainedModel):
    """SelfPatch pretraining of a ViT or Swin backbone with DINO or MoBY as the image-level objective (and, with
    `patch_loss_weight=0` and a CLS / average-pool image representation, plain DINO or plain MoBY). Also available
    as `SelfPatchViTForPretraining`, its former name.

    Holds the student (`self.student`, [`SelfPatchStudent`]), its EMA teacher (`self.teacher`,
    [`SelfPatchTeacher`]) and the objective (`self.objective`, [`DINOObjective`] or [`MoBYObjective`]), which
    built the networks' heads and owns its state as buffers (DINO's `image_center`, `patch_center`; MoBY's key
    queues `queue1`, `queue2` `(d, K)` and `queue_ptr`), so a checkpoint resumes them exactly. One call computes
    the losses for a batch and, in training mode, moves the centres / enqueues the keys.

    DINO (multi-crop; the teacher moves after the optimiser step):

    ```python
    >>> out = model(global_crops, local_crops, teacher_temperature=0.04)  # (B, 2, 3, H, W), (B, L, 3, h, w)
    >>> out.loss.backward(); optimizer.step(); optimizer.zero_grad()
    >>> model.update_teacher(momentum)
    ```

    MoBY (two views, no local crops; as in MoBY, the target moves at the start of the call, before the keys are
    computed, from the weights before this step's update):

    ```python
    >>> out = model(two_views, None, teacher_momentum=momentum)  # (B, 2, 3, H, W)
    >>> out.loss.backward(); optimizer.step(); optimizer.zero_grad()
    ```
    """

    def __init__(self, config: SelfPatchConfig):
        super().__init__(config)
        objective_class = image_objective_class(config.image_objective)
        self.student = SelfPatchStudent(config, objective_class, drop_path_rate=config.drop_path_rate)
        self.teacher = SelfPatchTeacher(config, objective_class)
        # registered after the networks: its state is initialised after their weights (the random queues)
        self.objective = objective_class(config)
        self.register_load_state_dict_pre_hook(_load_legacy_state_names)
        self.post_init()
        self.teacher.copy_from(self.student)
        self._freeze_untrained_parameters()

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        loaded = super().from_pretrained(*args, **kwargs)
        # loading re-creates every floating-point parameter with requires_grad=True
        model = loaded[0] if isinstance(loaded, tuple) else loaded
        model._freeze_untrained_parameters()
        return loaded

    def _freeze_untrained_parameters(self) -> None:
        """The teacher only moves by EMA; the objective may keep some student parameters fixed."""
        self.teacher.requires_grad_(False)
        self.objective.freeze_untrained_parameters(self.student)

    def train(self, mode: bool = True) -> SelfPatchForPretraining:
        super().train(mode)
        if not self.objective.teacher_follows_training_mode:
            # DINO's teacher has neither dropout nor drop-path, but keep it in eval mode as a rule: it only serves
            # targets
            self.teacher.eval()
        return self

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        """EMA step `teacher = m * teacher + (1 - m) * student` for every teacher parameter. DINO: call it after each
        optimiser step. MoBY (`objective.moves_teacher_in_forward`): pass `teacher_momentum` to `forward` instead,
        which takes this step before the keys."""
        self.teacher.momentum_update(self.student, momentum)

    def get_last_layer_parameters(self) -> list[nn.Parameter]:
        """Trainable parameters of DINO's heads' last layers (frozen during the first epoch by the training loop);
        none for MoBY."""
        return self.objective.last_layer_parameters(self.student)

    def prepare_views(
        self,
        global_crops: torch.Tensor | Sequence[torch.Tensor],
        local_crops: torch.Tensor | Sequence[torch.Tensor] | None,
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Checks the crops and groups them by resolution: (global groups, local groups), each group
        `(n_views, B, 3, H, W)`. Raises a `ValueError` naming the problem and the fix."""
        global_groups = group_views_by_resolution(global_crops, "global_crops")
        local_groups = group_views_by_resolution(local_crops, "local_crops")
        if not global_groups:
            raise ValueError(
                "At least one global crop is required: the teacher's image-level targets come from them."
            )
        self.objective.check_views(global_groups, local_groups)
        patch = self.config.patch_size
        batch_size = global_groups[0].shape[1]
        for group in global_groups + local_groups:
            height, width = group.shape[-2:]
            if height % patch or width % patch:
                unit = "patch size" if self.config.backbone_type == "vit" else "Swin's last-stage stride"
                raise ValueError(
                    f"Crop size {height}x{width} is not divisible by the {unit} {patch}: the patch grid would "
                    f"drop pixels. Resize or crop to a multiple of {patch} (e.g. "
                    f"{max(1, round(height / patch)) * patch}x{max(1, round(width / patch)) * patch})."
                )
            if group.shape[1] != batch_size:
                raise ValueError(
                    f"All crops must share the batch size; got {batch_size} and {group.shape[1]}."
                )
        return global_groups, local_groups

    def forward(
        self,
        global_crops: torch.Tensor | Sequence[torch.Tensor],
        local_crops: torch.Tensor | Sequence[torch.Tensor] | None = None,
        *,
        update_state: bool | None = None,
        return_dict: bool | None = None,
        update_centers: bool | None = None,
        **objective_inputs,
    ) -> SelfPatchPretrainingOutput | tuple:
        r"""
        global_crops (`torch.FloatTensor` of shape `(B, G, 3, H, W)`, or a list of G `(B, 3, H, W)` tensors):
            Global crops: the teacher's image-level views (MoBY: its two views). Sizes must be multiples of the patch
            size (a Swin: of its last stage's stride, `config.patch_size`).
        local_crops (`torch.FloatTensor` of shape `(B, L, 3, h, w)`, or a list of `(B, 3, h_l, w_l)`, *optional*):
            DINO's local crops, any resolution (position embeddings are interpolated), square or not. `None` (or 0
            crops) for MoBY.
        update_state (`bool`, *optional*):
            Update the objective's state after computing the loss: move DINO's centres, enqueue MoBY's keys.
            Defaults to `self.training`.
        update_centers (`bool`, *optional*):
            Deprecated name of `update_state`.
        objective_inputs:
            This step's inputs of the objective, named by its `forward`
            (`self.objective.accepted_inputs`): DINO takes `teacher_temperature` (defaults to 0.04; the warm-up
            schedule belongs to the training loop); MoBY takes `teacher_momentum` (the target's momentum step,
            taken at the start of the call, before the keys; `None`: no step). Anything else is refused.
        """
        if update_centers is not None:
            warnings.warn(
                "update_centers is deprecated: pass update_state (it updates the objective's state, DINO's centres "
                "or MoBY's queues).",
                FutureWarning,
                stacklevel=2,
            )
            if update_state is not None and update_state != update_centers:
                raise ValueError(f"update_state={update_state} and update_centers={update_centers} disagree.")
            update_state = update_centers
        self.objective.check_inputs(objective_inputs)
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        update_state = self.training if update_state is None else update_state
        global_groups, local_groups = self.prepare_views(global_crops, local_crops)
        output = self.objective(
            self.student,
            self.teacher,
            global_groups,
            local_groups,
            update_state=update_state,
            **objective_inputs,
        )
        output = self._pretraining_output(output)
        return output if return_dict else output.to_tuple()

    def _pretraining_output(self, step: ObjectiveOutput) -> SelfPatchPretrainingOutput:
        student, teacher = step.student, step.teacher
        batch_size = student.batch_size

        def split_views(tensors: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
            # per group (n*B, ...) view-major -> one (B, ...) tensor per view
            return tuple(view for t in tensors for view in t.unflatten(0, (-1, batch_size)).unbind(0))

        return SelfPatchPretrainingOutput(
            loss=step.loss,
            image_loss=step.image_loss,
            patch_loss=step.patch_loss,
            student_patch_representations=split_views(student.patch_tokens),
            student_image_representations=split_views([student.image_representations]),
            teacher_positive_indices=(
                split_views(teacher.positive_indices) if teacher.positive_indices is not None else None
            ),
            patch_grids=tuple(grid for grid, n in zip(student.grids, student.num_views) for _ in range(n)),
        )


# The former name, kept for code and checkpoints written against it.
SelfPatchViTForPretraining = SelfPatchForPretraining

AutoModelForPreTraining.register(SelfPatchConfig, SelfPatchForPretraining, exist_ok=True)
register_checkpoint_conversion_mapping(
    SelfPatchConfig.model_type,
    [WeightRenaming(f"^{name}", OBJECTIVE_PREFIX + name) for name in LEGACY_STATE_NAMES],
    overwrite=True,
)

# build_neighbor_table, select_positive_neighbors and sync_batch_norm are defined in `neighbors` and
# `objectives.moby`; they are also importable from here, where they lived before the model was split by concern.
__all__ = [
    "LEGACY_STATE_NAMES",
    "SelfPatchForPretraining",
    "SelfPatchNetwork",
    "SelfPatchPreTrainedModel",
    "SelfPatchPretrainingOutput",
    "SelfPatchStudent",
    "SelfPatchTeacher",
    "SelfPatchViTForPretraining",
    "build_neighbor_table",
    "group_views_by_resolution",
    "select_positive_neighbors",
    "sync_batch_norm",
]

"""SelfPatch pretraining model: an image-level self-supervised objective plus the patch-level objective of Yun et al.,
"Patch-level Representation Learning for Self-supervised Vision Transformers" (CVPR 2022).

Laid out like a transformers modeling file and in the order of `docs/method.md` (the method as implemented; the
code cites its sections):

1. output dataclasses;
2. building blocks: the neighbourhood table and the positive matching (sections 3-4), the aggregation module h
   (section 5), the projection heads and stochastic depth (section 6), the losses and their centres (section 7);
3. the two networks: `SelfPatchStudent` (every view, gradients) and `SelfPatchTeacher` (EMA copy, no gradients,
   picks the positives and summarises them into patch targets);
4. the pretraining model `SelfPatchViTForPretraining`: student + teacher + centres; one call returns the losses.

Notation in shape comments: B images, V views (G global + L local crops), N patches of a view on an h x w grid,
D hidden size, k positives, M neighbours per patch, K / K' image / patch head output sizes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize
from transformers import AutoModelForPreTraining, PreTrainedModel, ViTModel
from transformers import initialization as init
from transformers.models.vit.modeling_vit import ViTEmbeddings
from transformers.utils import ModelOutput

from .configuration_selfpatch import SelfPatchConfig

# =====================================================================================================================
# Outputs
# =====================================================================================================================


@dataclass
class SelfPatchPretrainingOutput(ModelOutput):
    """
    Output of [`SelfPatchViTForPretraining`].

    loss (`torch.FloatTensor` of shape `()`):
        `image_loss + patch_loss_weight * patch_loss`.
    image_loss (`torch.FloatTensor` of shape `()`):
        DINO cross-view loss of the image-level outputs.
    patch_loss (`torch.FloatTensor` of shape `()`, *optional*):
        SelfPatch patch-level loss; `None` when `patch_loss_weight == 0` (the patch path is skipped).
    student_patch_representations (`tuple[torch.FloatTensor]`):
        Per view (globals first, then locals), `(B, N_v, D)`: the student's patch tokens after the output norm (what
        the patch head reads and what an exported backbone's `last_hidden_state[:, 1:]` returns).
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


@dataclass
class StudentOutput:
    """What the student computes for all views of a batch.

    Views come in groups of one resolution; within a group they are stacked view-major, `(n_views * B, ...)`.
    """

    grids: list[tuple[int, int]]  # per group, the (h, w) patch grid
    num_views: list[int]  # per group
    patch_tokens: list[torch.Tensor]  # per group, (n*B, N, D): patch tokens after the output norm
    image_representations: torch.Tensor  # (V*B, D), the image head's input
    image_logits: torch.Tensor  # (V, B, K)
    patch_logits: list[torch.Tensor] | None  # per group, (n, B, N, K'); None without the patch objective


@dataclass
class TeacherOutput:
    """What the teacher computes for the views it is given (same grouping as [`StudentOutput`])."""

    image_logits: torch.Tensor  # (V_t, B, K)
    patch_targets: list[torch.Tensor] | None  # per group, (n, B, N, K'); None without the patch objective
    positive_indices: list[torch.Tensor] | None  # per group, (n*B, N, k); None without the patch objective


# =====================================================================================================================
# Building blocks
# =====================================================================================================================


# ---------------------------------------------------------------------------------------------------------------------
# Neighbourhood table (docs/method.md section 3): the candidate positives of every patch
# ---------------------------------------------------------------------------------------------------------------------
def neighborhood_offsets(window: int) -> list[tuple[int, int]]:
    """(row, col) offsets of a `window` x `window` square around a patch, the patch itself excluded, row-major."""
    radius = window // 2
    return [
        (dr, dc)
        for dr in range(-radius, radius + 1)
        for dc in range(-radius, radius + 1)
        if (dr, dc) != (0, 0)
    ]


@lru_cache(maxsize=64)
def _neighbor_table_cpu(height: int, width: int, window: int | str) -> torch.Tensor:
    num_patches = height * width
    index = torch.arange(num_patches)
    if window == "all":
        # every other patch: row p lists 0..N-1 without p
        table = index.repeat(num_patches, 1)
        keep = ~torch.eye(num_patches, dtype=torch.bool)
        return table[keep].view(num_patches, num_patches - 1)
    rows, cols = index // width, index % width
    columns = [
        ((rows + dr) % height) * width + (cols + dc) % width for dr, dc in neighborhood_offsets(window)
    ]
    return torch.stack(columns, dim=1)


def build_neighbor_table(
    height: int, width: int, window: int | str = 3, device: torch.device | str | None = None
) -> torch.Tensor:
    """Neighbour indices of every patch of an `height` x `width` grid, as a `(N, M)` LongTensor.

    Patches are indexed row-major (`p = row * width + col`, the order in which ViT flattens them). For an odd
    `window`, the M = window**2 - 1 neighbours are the cells of the window around p except p, with wrap-around at
    the borders (rows modulo `height`, columns modulo `width`: a torus). `window="all"` lists every other patch
    (M = N - 1). On small grids the wrapped window can visit a cell twice; the table keeps such duplicates, as a
    torus does.
    """
    if window != "all" and (not isinstance(window, int) or window < 3 or window % 2 == 0):
        raise ValueError(f'window must be an odd int >= 3 or "all", got {window!r}.')
    if height < 1 or width < 1:
        raise ValueError(f"Empty patch grid {height}x{width}.")
    return _neighbor_table_on(height, width, window, torch.device(device if device is not None else "cpu"))


@lru_cache(maxsize=64)
def _neighbor_table_on(height: int, width: int, window: int | str, device: torch.device) -> torch.Tensor:
    # one copy per device: a host-to-GPU copy every step would make the host wait for the GPU's queue
    return _neighbor_table_cpu(height, width, window).to(device)


# ---------------------------------------------------------------------------------------------------------------------
# Positive matching (docs/method.md section 4): the teacher keeps the k most similar neighbours
# ---------------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def select_positive_neighbors(
    patch_features: torch.Tensor, grid: tuple[int, int], num_positives: int, window: int | str = 3
) -> torch.Tensor:
    """The `num_positives` neighbours most cosine-similar to each patch (docs/method.md section 4).

    Args:
        patch_features: `(B, N, D)` raw patch features (teacher, before the output norm), N = h * w row-major.
        grid: `(h, w)` patch grid of the view.
        num_positives: k.
        window: odd window side (wrap-around neighbourhood) or `"all"`.

    Returns:
        `(B, N, k)` LongTensor of patch indices into the same view. The order among the k is not meaningful.
    """
    height, width = grid
    batch, num_patches, dim = patch_features.shape
    if num_patches != height * width:
        raise ValueError(f"{num_patches} patch tokens do not form a {height}x{width} grid.")
    table = build_neighbor_table(height, width, window, device=patch_features.device)  # (N, M)
    if num_positives > table.shape[1]:
        raise ValueError(
            f"num_positives (k={num_positives}) exceeds the {table.shape[1]} neighbours available on a "
            f"{height}x{width} grid."
        )
    normed = F.normalize(patch_features.float(), dim=-1)
    if window == "all":
        similarity = torch.bmm(normed, normed.transpose(1, 2))  # (B, N, N)
        neighbor_similarity = similarity.gather(2, table.unsqueeze(0).expand(batch, -1, -1))
    else:
        # One shifted copy of the grid per offset: O(M * B * N * D) time and O(B * N * D) extra memory, instead of
        # materialising a (B, N, M, D) gather. roll(-offset)[r, c] == x[(r + dr) % h, (c + dc) % w].
        grid_features = normed.view(batch, height, width, dim)
        neighbor_similarity = torch.stack(
            [
                (grid_features * torch.roll(grid_features, shifts=(-dr, -dc), dims=(1, 2)))
                .sum(-1)
                .view(batch, -1)
                for dr, dc in neighborhood_offsets(window)
            ],
            dim=-1,
        )  # (B, N, M), same column order as the table
    top = neighbor_similarity.topk(num_positives, dim=-1).indices  # (B, N, k) columns of the table
    return table.unsqueeze(0).expand(batch, -1, -1).gather(2, top)


# ---------------------------------------------------------------------------------------------------------------------
# Aggregation module h (docs/method.md section 5): class attention as in CaiT
# ---------------------------------------------------------------------------------------------------------------------


class ClassAttention(nn.Module):
    """Attention in which only the class token queries; keys and values are the class token and the tokens.

    Token keys/values depend only on each token (the class token never updates them), so they are projected once
    per token (`project_tokens`) and may then be gathered into many sequences, e.g. one per patch neighbourhood.
    """

    def __init__(self, hidden_size: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        self.scale = self.head_dim**-0.5
        self.q = nn.Linear(hidden_size, hidden_size)
        self.k = nn.Linear(hidden_size, hidden_size)
        self.v = nn.Linear(hidden_size, hidden_size)
        self.proj = nn.Linear(hidden_size, hidden_size)

    def forward(
        self, cls: torch.Tensor, token_keys: torch.Tensor, token_values: torch.Tensor
    ) -> torch.Tensor:
        """cls: `(..., D)` normalised class tokens (or one broadcast to all sequences); token_keys/values:
        `(..., T, D)`. Returns `(..., D)`."""
        heads, head_dim = self.num_heads, self.head_dim
        query = self.q(cls).unflatten(-1, (heads, head_dim))  # (..., H, hd)
        cls_key = self.k(cls).unflatten(-1, (heads, head_dim))
        cls_value = self.v(cls).unflatten(-1, (heads, head_dim))
        keys = token_keys.unflatten(-1, (heads, head_dim))  # (..., T, H, hd)
        values = token_values.unflatten(-1, (heads, head_dim))
        token_scores = torch.einsum("...hd,...thd->...ht", query, keys)  # (..., H, T)
        # the class token may be shared by all sequences (broadcast): its own score is then expanded
        cls_score = (query * cls_key).sum(-1, keepdim=True).expand(*token_scores.shape[:-1], 1)
        scores = torch.cat(
            [cls_score, token_scores], dim=-1
        )  # (..., H, 1 + T): class first, as concat(cls, tokens)
        weights = (scores * self.scale).softmax(dim=-1)
        mixed = weights[..., :1] * cls_value + torch.einsum("...ht,...thd->...hd", weights[..., 1:], values)
        return self.proj(mixed.flatten(-2))


class AggregationMLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, intermediate_size)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(intermediate_size, hidden_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(hidden_states)))


class ClassAttentionBlock(nn.Module):
    """`cls = cls + Attn(LN1(concat(cls, tokens)))[cls]; cls = cls + MLP(LN2(cls))`; no LayerScale, no dropout."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float, eps: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, eps=eps)
        self.attn = ClassAttention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, eps=eps)
        self.mlp = AggregationMLP(hidden_size, int(hidden_size * mlp_ratio))

    def project_tokens(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of the (non-class) tokens: `(..., D)` -> two `(..., D)` tensors."""
        normed = self.norm1(tokens)
        return self.attn.k(normed), self.attn.v(normed)

    def forward(
        self, cls: torch.Tensor, token_keys: torch.Tensor, token_values: torch.Tensor
    ) -> torch.Tensor:
        cls = cls + self.attn(self.norm1(cls), token_keys, token_values)
        return cls + self.mlp(self.norm2(cls))


class SelfPatchAggregation(nn.Module):
    """The aggregation module h: a learnable class token refined by class-attention blocks over a set of tokens.

    Its final norm is the backbone's output norm (`ViTModel.layernorm`), applied by the caller, so that it is shared
    with everything else that reads the backbone (docs/method.md section 2).
    """

    def __init__(self, config: SelfPatchConfig):
        super().__init__()
        backbone = config.backbone_config
        self.cls_token = nn.Parameter(torch.zeros(1, 1, backbone.hidden_size))
        self.blocks = nn.ModuleList(
            ClassAttentionBlock(
                backbone.hidden_size,
                backbone.num_attention_heads,
                config.aggregation_mlp_ratio,
                backbone.layer_norm_eps,
            )
            for _ in range(config.num_aggregation_blocks)
        )

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Summarises each sequence of tokens: `(B, T, D)` -> `(B, D)` (before the output norm)."""
        cls = self.cls_token[0].expand(tokens.shape[0], -1)
        for block in self.blocks:
            cls = block(cls, *block.project_tokens(tokens))
        return cls

    def aggregate_neighbors(self, tokens: torch.Tensor, neighbor_index: torch.Tensor) -> torch.Tensor:
        """Summarises, for every patch at once, its selected neighbours.

        Equivalent to `forward(tokens[b, neighbor_index[b, i]])` for each (b, i) (B * N independent sequences of k
        tokens plus the class token), but each block normalises and projects every token once and gathers the
        keys/values, instead of once per (patch, neighbour) pair.

        Args:
            tokens: `(B, N, D)` raw patch features.
            neighbor_index: `(B, N, k)` indices into the N tokens.
        Returns:
            `(B, N, D)` summaries (before the output norm).
        """
        dim = tokens.shape[-1]
        flat_index = neighbor_index.flatten(1)  # (B, N * k)
        gather_index = flat_index.unsqueeze(-1).expand(-1, -1, dim)
        # (1, 1, D) and broadcast: the first block's class-token query, key and value are the same for every patch,
        # so they are computed once; the class tokens become (B, N, D) after its residual update
        cls = self.cls_token
        for block in self.blocks:
            keys, values = block.project_tokens(tokens)  # (B, N, D) each
            keys = keys.gather(1, gather_index).view(*neighbor_index.shape, dim)  # (B, N, k, D)
            values = values.gather(1, gather_index).view(*neighbor_index.shape, dim)
            cls = block(cls, keys, values)
        return cls


# ---------------------------------------------------------------------------------------------------------------------
# Projection heads (docs/method.md section 6) and stochastic depth
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
        # with norm_last_layer the magnitude g stays 1 and frozen (set by the model, also after loading): only the
        # direction of each output row is learned

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = F.normalize(self.mlp(hidden_states), dim=-1, p=2)
        return self.last_layer(hidden_states)


class DropPath(nn.Module):
    """Stochastic depth per sample. Stands in for the `dropout` of a `ViTLayer`, which wraps exactly the two
    residual branches, so the backbone stays a plain `ViTModel` (this module has no weights)."""

    def __init__(self, drop_prob: float):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return hidden_states
        keep_prob = 1 - self.drop_prob
        shape = (hidden_states.shape[0],) + (1,) * (hidden_states.ndim - 1)
        mask = hidden_states.new_empty(shape).bernoulli_(keep_prob)
        return hidden_states * mask / keep_prob

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob:.3f}"


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
# Views
# ---------------------------------------------------------------------------------------------------------------------


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


# =====================================================================================================================
# Student and teacher
# =====================================================================================================================


class SelfPatchNetwork(nn.Module):
    """The architecture shared by student and teacher: backbone + aggregation module h + image head g + patch head g'.

    The steps both sides take are methods here (`encode`, `image_representation`, `project_patches`); what each side
    computes is its own `forward` ([`SelfPatchStudent`], [`SelfPatchTeacher`]). Both have the same parameters in the
    same order, so the teacher is an exact EMA copy of the student.
    """

    def __init__(self, config: SelfPatchConfig, drop_path_rate: float = 0.0):
        super().__init__()
        self.config = config
        backbone_config = config.backbone_config
        self.backbone = ViTModel(backbone_config, add_pooling_layer=False)
        if drop_path_rate > 0:
            rates = torch.linspace(0, drop_path_rate, backbone_config.num_hidden_layers).tolist()
            for layer, rate in zip(self.backbone.layers, rates):
                layer.dropout = DropPath(rate)
        self.aggregation = SelfPatchAggregation(config) if config.use_aggregation_module else None
        head_kwargs = {
            "hidden_dim": config.head_hidden_dim,
            "bottleneck_dim": config.head_bottleneck_dim,
            "num_layers": config.head_num_layers,
        }
        self.image_head = DINOHead(backbone_config.hidden_size, config.image_out_dim, **head_kwargs)
        self.patch_head = (
            DINOHead(backbone_config.hidden_size, config.patch_out_dim, **head_kwargs)
            if config.use_patch_objective
            else None
        )

    @property
    def output_norm(self) -> nn.LayerNorm:
        """The one LayerNorm after the backbone (`ViTModel.layernorm`), shared by every reader of its tokens."""
        return self.backbone.layernorm

    def patch_grid(self, pixel_values: torch.Tensor) -> tuple[int, int]:
        """The `(h, w)` patch grid of images `(..., 3, H, W)`."""
        patch = self.config.patch_size
        return pixel_values.shape[-2] // patch, pixel_values.shape[-1] // patch

    def encode(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`(B, 3, H, W)` -> raw patch features f `(B, N, D)` (last encoder layer, before the output norm) and the
        backbone's `last_hidden_state` `(B, 1 + N, D)` (output norm applied, CLS first): what an exported backbone
        returns."""
        outputs = self.backbone(pixel_values, interpolate_pos_encoding=True, output_hidden_states=[-1])
        # hidden_states are taken before the final layernorm (tie_last_hidden_states=False in ViTModel)
        return outputs.hidden_states[-1][:, 1:], outputs.last_hidden_state

    def image_representation(self, patch_features: torch.Tensor, normed_tokens: torch.Tensor) -> torch.Tensor:
        """The image head's input `(B, D)`: out_norm(h(f_1..f_N)) (SelfPatch, the paper's Eq. 4) or the normed CLS (DINO)."""
        if self.config.image_representation == "cls":
            return normed_tokens[:, 0]
        return self.output_norm(self.aggregation(patch_features))

    def project_patches(
        self, patch_inputs: list[torch.Tensor], num_views: list[int], batch_size: int
    ) -> list[torch.Tensor]:
        """The patch head g' on every group's `(n*B, N, D)` inputs -> per group `(n, B, N, K')`.

        One call on the tokens of every group concatenated: one large matrix product per layer, and the
        weight-normalised last layer is normalised once per step."""
        logits = self.patch_head(torch.cat([x.flatten(0, 1) for x in patch_inputs]))
        sizes = [x.shape[0] * x.shape[1] for x in patch_inputs]
        return [
            chunk.view(n, batch_size, x.shape[1], -1)
            for chunk, n, x in zip(logits.split(sizes), num_views, patch_inputs)
        ]


class SelfPatchStudent(SelfPatchNetwork):
    """The student: every view, with gradients. Image outputs g(y) and, with the patch objective, patch outputs
    g'(out_norm(f_i)) for every patch of every view. It never runs the neighbour path (the teacher does)."""

    def forward(self, view_groups: Sequence[torch.Tensor]) -> StudentOutput:
        """`view_groups`: groups of same-resolution views, each `(n_views, B, 3, H, W)`."""
        batch_size = view_groups[0].shape[1]
        grids, num_views, patch_tokens, representations = [], [], [], []
        for group in view_groups:
            grids.append(self.patch_grid(group))
            num_views.append(group.shape[0])
            features, normed = self.encode(group.flatten(0, 1))  # (n*B, N, D), (n*B, 1 + N, D)
            representations.append(self.image_representation(features, normed))
            patch_tokens.append(normed[:, 1:])
        image_representations = torch.cat(representations)  # (V*B, D)
        image_logits = self.image_head(image_representations).unflatten(0, (-1, batch_size))  # (V, B, K)
        patch_logits = None
        if self.config.use_patch_objective:
            patch_logits = self.project_patches(patch_tokens, num_views, batch_size)
        return StudentOutput(
            grids, num_views, patch_tokens, image_representations, image_logits, patch_logits
        )


class SelfPatchTeacher(SelfPatchNetwork):
    """The teacher (an EMA of the student, never trained by gradients; call it under `torch.no_grad()`).

    Image outputs g(y) for the views it is given and, with the patch objective, the patch targets: for every patch
    i, the k neighbours most similar to it (`select_positive_neighbors`), summarised by h (or averaged, in the
    ablation) and projected, g'(out_norm(h({f_j : j in top-k of N(i)})))."""

    def forward(self, view_groups: Sequence[torch.Tensor]) -> TeacherOutput:
        """`view_groups`: groups of same-resolution views, each `(n_views, B, 3, H, W)`."""
        batch_size = view_groups[0].shape[1]
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
        image_logits = self.image_head(torch.cat(representations)).unflatten(0, (-1, batch_size))
        if not use_patch:
            return TeacherOutput(image_logits, patch_targets=None, positive_indices=None)
        patch_targets = self.project_patches(summaries, num_views, batch_size)
        return TeacherOutput(image_logits, patch_targets, positive_indices)

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


# =====================================================================================================================
# The pretraining model
# =====================================================================================================================


class SelfPatchPreTrainedModel(PreTrainedModel):
    config_class = (
        SelfPatchConfig  # explicit: annotations are strings under `from __future__ import annotations`
    )
    base_model_prefix = "selfpatch"
    main_input_name = "global_crops"
    input_modalities = ("image",)
    supports_gradient_checkpointing = True
    _no_split_modules = ["ViTEmbeddings", "ViTLayer", "ClassAttentionBlock"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """Truncated-normal(0.02) Linear weights with zero biases, unit LayerNorms (DINO/SelfPatch init)."""
        std = self.config.initializer_range
        if isinstance(module, nn.Linear) and not parametrize.is_parametrized(module):
            init.trunc_normal_(module.weight, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, DINOHead):
            weight = module.last_layer.parametrizations.weight
            init.trunc_normal_(weight.original1, std=std)  # direction v
            init.ones_(weight.original0)  # magnitude g = 1
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, nn.Conv2d):
            init.trunc_normal_(module.weight, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, ViTEmbeddings):
            init.trunc_normal_(module.position_embeddings, std=std)
            init.trunc_normal_(module.cls_token, std=std)
        elif isinstance(module, SelfPatchAggregation):
            init.trunc_normal_(module.cls_token, std=std)
        elif isinstance(module, SelfPatchViTForPretraining):
            init.zeros_(module.image_center)
            init.zeros_(module.patch_center)


class SelfPatchViTForPretraining(SelfPatchPreTrainedModel):
    """SelfPatch (or, with `image_representation="cls"` and `patch_loss_weight=0`, plain DINO) pretraining of a ViT.

    Holds the student (`self.student`, [`SelfPatchStudent`]) and its EMA teacher (`self.teacher`,
    [`SelfPatchTeacher`]) of the same architecture, and the image/patch centres as buffers. One call computes the
    losses for a batch of multi-crop views and (in training mode) updates the centres; the optimiser step and
    `update_teacher` belong to the training loop:

    ```python
    >>> out = model(global_crops, local_crops, teacher_temperature=0.04)  # (B, 2, 3, H, W), (B, L, 3, h, w)
    >>> out.loss.backward(); optimizer.step(); optimizer.zero_grad()
    >>> model.update_teacher(momentum)
    ```
    """

    def __init__(self, config: SelfPatchConfig):
        super().__init__(config)
        self.student = SelfPatchStudent(config, drop_path_rate=config.drop_path_rate)
        self.teacher = SelfPatchTeacher(config)
        self.image_criterion = DINOImageLoss(config.student_temperature)
        self.patch_criterion = (
            DINOPatchLoss(config.student_temperature) if config.use_patch_objective else None
        )
        self.register_buffer("image_center", torch.zeros(1, config.image_out_dim))
        self.register_buffer(
            "patch_center", torch.zeros(1, config.patch_out_dim if config.use_patch_objective else 0)
        )
        self.post_init()
        self._copy_student_to_teacher()
        self._freeze_untrained_parameters()

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        loaded = super().from_pretrained(*args, **kwargs)
        # loading re-creates every floating-point parameter with requires_grad=True
        model = loaded[0] if isinstance(loaded, tuple) else loaded
        model._freeze_untrained_parameters()
        return loaded

    def _freeze_untrained_parameters(self) -> None:
        """The teacher only moves by EMA; with `norm_last_layer` the heads' weight-norm magnitudes stay 1."""
        self.teacher.requires_grad_(False)
        if self.config.norm_last_layer:
            for head in (self.student.image_head, self.student.patch_head):
                if head is not None:
                    head.last_layer.parametrizations.weight.original0.requires_grad_(False)

    @torch.no_grad()
    def _copy_student_to_teacher(self) -> None:
        for teacher_param, student_param in zip(
            self.teacher.parameters(), self.student.parameters(), strict=True
        ):
            teacher_param.copy_(student_param)

    def train(self, mode: bool = True) -> SelfPatchViTForPretraining:
        super().train(mode)
        # the teacher has neither dropout nor drop-path, but keep it in eval mode as a rule: it only serves targets
        self.teacher.eval()
        return self

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        """EMA step `teacher = m * teacher + (1 - m) * student`, for every parameter (call after each optimiser step)."""
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"Teacher momentum must be in [0, 1], got {momentum}.")
        teacher_params = list(self.teacher.parameters())
        student_params = [p.detach() for p in self.student.parameters()]
        torch._foreach_lerp_(teacher_params, student_params, 1.0 - momentum)

    def get_last_layer_parameters(self) -> list[nn.Parameter]:
        """Trainable parameters of the heads' last layers (frozen during the first epoch by the training loop)."""
        heads = [self.student.image_head, self.student.patch_head]
        return [
            p for head in heads if head is not None for p in head.last_layer.parameters() if p.requires_grad
        ]

    # ------------------------------------------------------------------------------------------ the steps of a call
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
        patch = self.config.patch_size
        batch_size = global_groups[0].shape[1]
        for group in global_groups + local_groups:
            height, width = group.shape[-2:]
            if height % patch or width % patch:
                raise ValueError(
                    f"Crop size {height}x{width} is not divisible by the patch size {patch}: the patch grid would "
                    f"drop pixels. Resize or crop to a multiple of {patch} (e.g. "
                    f"{max(1, round(height / patch)) * patch}x{max(1, round(width / patch)) * patch})."
                )
            if group.shape[1] != batch_size:
                raise ValueError(
                    f"All crops must share the batch size; got {batch_size} and {group.shape[1]}."
                )
        return global_groups, local_groups

    @torch.no_grad()
    def update_centers(self, teacher: TeacherOutput) -> None:
        """Moves the centres towards this batch's teacher outputs (after the loss used them). The image centre
        averages over every view the teacher saw: all V with the patch objective (reference SelfPatch), the globals
        for plain DINO (the only views its teacher sees)."""
        momentum = self.config.center_momentum
        ema_center_update(self.image_center, [teacher.image_logits], momentum)
        if teacher.patch_targets is not None:
            ema_center_update(self.patch_center, teacher.patch_targets, momentum)

    def forward(
        self,
        global_crops: torch.Tensor | Sequence[torch.Tensor],
        local_crops: torch.Tensor | Sequence[torch.Tensor] | None = None,
        teacher_temperature: float = 0.04,
        update_centers: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> SelfPatchPretrainingOutput | tuple:
        r"""
        global_crops (`torch.FloatTensor` of shape `(B, G, 3, H, W)`, or a list of G `(B, 3, H, W)` tensors):
            Global crops: the teacher's image-level views. Sizes must be multiples of the patch size.
        local_crops (`torch.FloatTensor` of shape `(B, L, 3, h, w)`, or a list of `(B, 3, h_l, w_l)`, *optional*):
            Local crops, any resolution (position embeddings are interpolated), square or not.
        teacher_temperature (`float`, *optional*, defaults to 0.04):
            Teacher softmax temperature of this step (the warm-up schedule belongs to the training loop).
        update_centers (`bool`, *optional*):
            Update the EMA centres after computing the loss. Defaults to `self.training`.
        """
        if kwargs:
            raise TypeError(f"Unexpected arguments: {', '.join(kwargs)}.")
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        update_centers = self.training if update_centers is None else update_centers
        global_groups, local_groups = self.prepare_views(global_crops, local_crops)
        num_global = sum(group.shape[0] for group in global_groups)
        use_patch = self.config.use_patch_objective

        # Student: every view. Views of one resolution run as one batch (view-major).
        student = self.student(global_groups + local_groups)
        # Teacher: the globals for the image targets; with the patch objective every view (patch targets per view).
        with torch.no_grad():
            teacher = self.teacher(global_groups + local_groups if use_patch else global_groups)

        image_loss = self.image_criterion(
            student.image_logits.float(),  # (V, B, K)
            teacher.image_logits[:num_global].float(),  # (G, B, K)
            self.image_center,
            teacher_temperature,
        )
        patch_loss = None
        loss = image_loss
        if use_patch:
            patch_loss = self.patch_criterion(
                student.patch_logits, teacher.patch_targets, self.patch_center, teacher_temperature
            )
            loss = image_loss + self.config.patch_loss_weight * patch_loss
        if update_centers:
            self.update_centers(teacher)

        output = self._pretraining_output(loss, image_loss, patch_loss, student, teacher)
        return output if return_dict else output.to_tuple()

    def _pretraining_output(
        self,
        loss: torch.Tensor,
        image_loss: torch.Tensor,
        patch_loss: torch.Tensor | None,
        student: StudentOutput,
        teacher: TeacherOutput,
    ) -> SelfPatchPretrainingOutput:
        batch_size = student.image_logits.shape[1]

        def split_views(tensors: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
            # per group (n*B, ...) view-major -> one (B, ...) tensor per view
            return tuple(view for t in tensors for view in t.unflatten(0, (-1, batch_size)).unbind(0))

        return SelfPatchPretrainingOutput(
            loss=loss,
            image_loss=image_loss,
            patch_loss=patch_loss,
            student_patch_representations=split_views(student.patch_tokens),
            student_image_representations=split_views([student.image_representations]),
            teacher_positive_indices=(
                split_views(teacher.positive_indices) if teacher.positive_indices is not None else None
            ),
            patch_grids=tuple(grid for grid, n in zip(student.grids, student.num_views) for _ in range(n)),
        )


AutoModelForPreTraining.register(SelfPatchConfig, SelfPatchViTForPretraining, exist_ok=True)

__all__ = [
    "ClassAttentionBlock",
    "DINOHead",
    "DINOImageLoss",
    "DINOPatchLoss",
    "SelfPatchAggregation",
    "SelfPatchNetwork",
    "SelfPatchPreTrainedModel",
    "SelfPatchPretrainingOutput",
    "SelfPatchStudent",
    "SelfPatchTeacher",
    "SelfPatchViTForPretraining",
    "build_neighbor_table",
    "ema_center_update",
    "group_views_by_resolution",
    "select_positive_neighbors",
]

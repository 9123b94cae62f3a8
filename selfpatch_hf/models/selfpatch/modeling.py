"""SelfPatch pretraining model: an image-level self-supervised objective (DINO or MoBY) plus the patch-level objective
of Yun et al., "Patch-level Representation Learning for Self-supervised Vision Transformers" (CVPR 2022), on a ViT
or a Swin Transformer backbone.

Laid out like a transformers modeling file and in the order of `docs/method.md` (the method as implemented; the
code cites its sections):

1. output dataclasses;
2. building blocks: the neighbourhood table and the positive matching (sections 3-4), the aggregation module h
   (section 5), the projection heads and stochastic depth (section 6), the DINO losses and their centres
   (section 7), MoBY's MLP, losses and key queues (`docs/moby_swin.md`);
3. the two networks: `SelfPatchStudent` (every view, gradients; MoBY's online network) and `SelfPatchTeacher` (EMA
   copy, no gradients, picks the positives and summarises them into patch targets; MoBY's target network);
4. the pretraining model `SelfPatchForPretraining` (alias `SelfPatchViTForPretraining`): student + teacher +
   centres (DINO) or key queues (MoBY); one call returns the losses.

Notation in shape comments: B images, V views (G global + L local crops), N patches of a view on an h x w grid,
D hidden size, k positives, M neighbours per patch, K / K' image / patch head output sizes.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize
from transformers import AutoModelForPreTraining, PreTrainedModel, SwinModel, ViTModel
from transformers import initialization as init
from transformers.models.swin.modeling_swin import SwinEmbeddings
from transformers.models.vit.modeling_vit import ViTEmbeddings
from transformers.utils import ModelOutput

from selfpatch_hf.models.selfpatch.configuration import SelfPatchConfig

logger = logging.getLogger(__name__)

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


@dataclass
class StudentOutput:
    """What the student computes for all views of a batch.

    Views come in groups of one resolution; within a group they are stacked view-major, `(n_views * B, ...)`.
    """

    grids: list[tuple[int, int]]  # per group, the (h, w) patch grid
    num_views: list[int]  # per group
    patch_tokens: list[torch.Tensor]  # per group, (n*B, N, D): patch tokens after the output norm
    image_representations: torch.Tensor  # (V*B, D), the image head's input
    image_outputs: torch.Tensor  # (V, B, K): DINO logits g(y); MoBY predictions pred(proj(y))
    patch_outputs: list[torch.Tensor] | None  # per group, (n, B, N, K'); None without the patch objective


@dataclass
class TeacherOutput:
    """What the teacher computes for the views it is given (same grouping as [`StudentOutput`])."""

    image_outputs: torch.Tensor  # (V_t, B, K): DINO logits; MoBY keys proj~(y~) (not yet normalised)
    patch_targets: list[torch.Tensor] | None  # per group, (n, B, N, K'); None without the patch objective
    positive_indices: list[torch.Tensor] | None  # per group, (n*B, N, k); None without the patch objective
    # MoBY + SelfPatch with negatives: per group (n, B, K'), the patch projector on the target's image
    # representations y~, the negatives of the other images' patches
    patch_negatives: list[torch.Tensor] | None = None


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

    Its final norm is the backbone's output norm (`ViTModel.layernorm`, `SwinModel.layernorm`), applied by the
    caller, so that it is shared with everything else that reads the backbone (docs/method.md section 2). Heads and
    LayerNorm eps are the backbone's (its last stage's, for a Swin).
    """

    def __init__(self, config: SelfPatchConfig):
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.hidden_size))
        self.blocks = nn.ModuleList(
            ClassAttentionBlock(
                config.hidden_size,
                config.num_attention_heads,
                config.aggregation_mlp_ratio,
                config.layer_norm_eps,
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
# MoBY (Xie et al. 2021): projector / predictor MLP, contrastive losses, key queues (docs/moby_swin.md)
# ---------------------------------------------------------------------------------------------------------------------


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


class MoBYContrastiveLoss(nn.Module):
    """MoBY's `contrastive_loss`: InfoNCE of L2-normalised queries against their key (the positive, first) and the
    queue's keys (the negatives), `CE([q.k, q.queue] / T, 0)`, averaged over the batch."""

    def __init__(self, temperature: float):
        super().__init__()
        self.temperature = temperature

    def forward(self, queries: torch.Tensor, keys: torch.Tensor, queue: torch.Tensor) -> torch.Tensor:
        """queries, keys: `(B, d)`, normalised; queue: `(d, K)` normalised keys. Returns a scalar."""
        positive = (queries * keys).sum(-1, keepdim=True)  # (B, 1)
        # a copy: the queue is updated in place after the loss, before the backward pass needs it
        negative = queries @ queue.detach().clone()  # (B, K)
        logits = torch.cat([positive, negative], dim=1) / self.temperature
        return F.cross_entropy(logits, torch.zeros(len(logits), dtype=torch.long, device=logits.device))


class MoBYPatchLoss(nn.Module):
    """SelfPatch's patch loss with MoBY's distance (`docs/moby_swin.md`). For every view and every patch i, the
    online output p_i = pred'(proj'(out_norm(f_i))) against the target z_i = proj~'(y~_i), both L2-normalised:

    - without negatives: BYOL's `2 - 2 cos(p_i, z_i)`;
    - with negatives: InfoNCE at `temperature`, `CE([p_i.z_i, p_i.n_c for c != b] / T, 0)`, whose negatives n_c are
      the target patch projector's outputs for the target image representations y~ of the other images c of the
      batch (same view).

    The mean over batch and patches of each view, then over the views (like the DINO patch loss)."""

    def __init__(self, temperature: float, negatives: bool):
        super().__init__()
        self.temperature = temperature
        self.negatives = negatives

    def forward(
        self,
        online_outputs: Sequence[torch.Tensor],
        target_outputs: Sequence[torch.Tensor],
        target_negatives: Sequence[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """
        Args:
            online_outputs: per group of views, `(n, B, N, d)`.
            target_outputs: per group, `(n, B, N, d)`.
            target_negatives: per group, `(n, B, d)`; required with negatives.
        Returns:
            The loss, a scalar.
        """
        if self.negatives and target_negatives is None:
            raise ValueError("The MoBY patch loss with negatives needs the target's image-level negatives.")
        per_view = []
        for index, (online, target) in enumerate(zip(online_outputs, target_outputs, strict=True)):
            online = F.normalize(online.float(), dim=-1)
            target = F.normalize(target.float(), dim=-1)
            positive = (online * target).sum(-1)  # (n, B, N)
            if not self.negatives:
                per_view.append((2 - 2 * positive).flatten(1).mean(1))
                continue
            negatives = F.normalize(target_negatives[index].float(), dim=-1)  # (n, B, d)
            batch = online.shape[1]
            if batch < 2:
                raise ValueError(
                    "The MoBY patch loss with negatives takes its negatives from the other images of the batch: "
                    "use a batch of at least 2 images per process, or patch_negatives=False."
                )
            similarity = torch.einsum("vbnd,vcd->vbnc", online, negatives)  # (n, B, N, B)
            # for image b, the columns of every other image c != b
            others = torch.arange(batch, device=online.device).repeat(batch, 1)
            others = others[~torch.eye(batch, dtype=torch.bool, device=online.device)].view(batch, batch - 1)
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
    """The architecture shared by student and teacher: backbone (ViT or Swin) + aggregation module h + heads.

    Heads: DINO's image head g and patch head g' (`image_head`, `patch_head`); for MoBY the projectors
    (`projector`, `patch_projector`) and, on the student only, the predictors (`predictor`, `patch_predictor`).
    The steps both sides take are methods here (`encode`, `image_representation`, `image_outputs`,
    `patch_outputs`); what each side computes is its own `forward` ([`SelfPatchStudent`], [`SelfPatchTeacher`]).
    Every teacher parameter has a student parameter of the same name, so the teacher is an EMA copy of the student.
    """

    has_predictors = False  # MoBY's predictors belong to the online (student) network only

    def __init__(self, config: SelfPatchConfig, drop_path_rate: float = 0.0):
        super().__init__()
        self.config = config
        self.backbone = self._build_backbone(config, drop_path_rate)
        self.aggregation = SelfPatchAggregation(config) if config.use_aggregation_module else None
        self.image_head = self.patch_head = None
        self.projector = self.patch_projector = self.predictor = self.patch_predictor = None
        if config.image_objective == "moby":
            self._build_moby_heads(config)
        else:
            head_kwargs = {
                "hidden_dim": config.head_hidden_dim,
                "bottleneck_dim": config.head_bottleneck_dim,
                "num_layers": config.head_num_layers,
            }
            self.image_head = DINOHead(config.hidden_size, config.image_out_dim, **head_kwargs)
            if config.use_patch_objective:
                self.patch_head = DINOHead(config.hidden_size, config.patch_out_dim, **head_kwargs)

    @staticmethod
    def _build_backbone(config: SelfPatchConfig, drop_path_rate: float) -> ViTModel | SwinModel:
        if config.backbone_type == "swin":
            # Swin's own stochastic depth (linear over all blocks, as in Swin and MoBY); the stored backbone config
            # keeps 0 so that exported backbones have none
            backbone_config = copy.deepcopy(config.backbone_config)
            backbone_config.drop_path_rate = drop_path_rate
            backbone = SwinModel(backbone_config, add_pooling_layer=False)
            # every block's stage and configured window and shift, for `_set_swin_windows`
            backbone._selfpatch_windows = [
                (stage_index, block, block.window_size, block.shift_size)
                for stage_index, stage in enumerate(backbone.encoder.layers)
                for block in stage.blocks
            ]
            return backbone
        backbone = ViTModel(config.backbone_config, add_pooling_layer=False)
        if drop_path_rate > 0:
            rates = torch.linspace(0, drop_path_rate, config.backbone_config.num_hidden_layers).tolist()
            for layer, rate in zip(backbone.layers, rates):
                layer.dropout = DropPath(rate)
        return backbone

    def _build_moby_heads(self, config: SelfPatchConfig) -> None:
        dim, inner, out = config.hidden_size, config.moby_projector_hidden_dim, config.moby_projection_dim
        self.projector = MoBYMLP(dim, inner, out)
        if self.has_predictors:
            self.predictor = MoBYMLP(out, config.moby_predictor_hidden_dim, out)
        if config.use_patch_objective:
            self.patch_projector = MoBYMLP(dim, inner, out)
            if self.has_predictors:
                self.patch_predictor = MoBYMLP(out, config.moby_predictor_hidden_dim, out)

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
        """`(B, 3, H, W)` -> raw patch features f `(B, N, D)` (last layer / last stage, before the output norm) and
        the backbone's `last_hidden_state` `(B, prefix + N, D)` (output norm applied; a ViT's CLS first): what an
        exported backbone returns."""
        if self.config.backbone_type == "swin":
            # SwinModel.forward without its pooler: embeddings, stages, output norm
            embeddings, grid = self.backbone.embeddings(pixel_values)
            self._set_swin_windows(grid)
            features = self.backbone.encoder(embeddings, grid, always_partition=True).last_hidden_state
            return features, self.backbone.layernorm(features)
        outputs = self.backbone(pixel_values, interpolate_pos_encoding=True, output_hidden_states=[-1])
        # hidden_states are taken before the final layernorm (tie_last_hidden_states=False in ViTModel)
        return outputs.hidden_states[-1][:, 1:], outputs.last_hidden_state

    def _set_swin_windows(self, grid: tuple[int, int]) -> None:
        """Sets every Swin block's window and shift for an input whose first-stage grid is `grid`.

        Where a stage's grid is at least the window, this is what `SwinModel` does itself (the configured window;
        no shift once the grid fits in one window), so the exported backbone computes the same features. Where it is
        smaller (e.g. the 3x3 last stage of a 96 px crop on Swin-T), transformers' Swin shrinks the window below its
        relative-position table and fails; here the window keeps its size and the grid is padded into it, without
        shift (the reference Swin shrinks the window with its table instead, so such grids differ from it; see
        docs/moby_swin.md). The blocks are set on every call because transformers' Swin changes them
        in place."""
        height, width = grid
        resolutions = []
        for _ in self.backbone.encoder.layers:
            resolutions.append(min(height, width))
            height, width = (height + 1) // 2, (width + 1) // 2
        for stage_index, block, window_size, shift_size in self.backbone._selfpatch_windows:
            block.window_size = window_size
            block.shift_size = 0 if resolutions[stage_index] <= window_size else shift_size

    def image_representation(self, patch_features: torch.Tensor, normed_tokens: torch.Tensor) -> torch.Tensor:
        """The image head's input `(B, D)`: out_norm(h(f_1..f_N)) (SelfPatch, the paper's Eq. 4), the normed CLS
        (DINO, MoBY on a ViT) or the mean of the normed patch tokens (MoBY on a Swin: its average pool)."""
        if self.config.image_representation == "cls":
            return normed_tokens[:, 0]
        if self.config.image_representation == "average_pool":
            return normed_tokens[:, self.num_prefix_tokens :].mean(dim=1)
        return self.output_norm(self.aggregation(patch_features))

    def image_outputs(self, representations: torch.Tensor, batch_size: int) -> torch.Tensor:
        """`(V*B, D)` image representations -> `(V, B, K)`: DINO's g (one call for all views); MoBY's projector
        (and the student's predictor), one view at a time as MoBY calls them (BatchNorm statistics per view)."""
        if self.config.image_objective == "dino":
            return self.image_head(representations).unflatten(0, (-1, batch_size))
        return torch.stack(
            [self._moby_project(view, patch=False) for view in representations.split(batch_size)]
        )

    def patch_outputs(
        self, patch_inputs: list[torch.Tensor], num_views: list[int], batch_size: int
    ) -> list[torch.Tensor]:
        """The patch head on every group's `(n*B, N, D)` inputs -> per group `(n, B, N, K')`.

        DINO: one call on the tokens of every group concatenated (one large matrix product per layer, and the
        weight-normalised last layer is normalised once per step). MoBY: one view at a time (BatchNorm statistics
        over the B*N patches of a view)."""
        if self.config.image_objective == "moby":
            return [
                torch.stack([self._moby_project(view, patch=True) for view in tokens.split(batch_size)])
                for tokens in patch_inputs
            ]
        logits = self.patch_head(torch.cat([x.flatten(0, 1) for x in patch_inputs]))
        sizes = [x.shape[0] * x.shape[1] for x in patch_inputs]
        return [
            chunk.view(n, batch_size, x.shape[1], -1)
            for chunk, n, x in zip(logits.split(sizes), num_views, patch_inputs)
        ]

    def _moby_project(self, hidden_states: torch.Tensor, patch: bool) -> torch.Tensor:
        """MoBY's heads on one view: projector, then (student only) predictor."""
        projector, predictor = (
            (self.patch_projector, self.patch_predictor) if patch else (self.projector, self.predictor)
        )
        projected = projector(hidden_states)
        return predictor(projected) if predictor is not None else projected


class SelfPatchStudent(SelfPatchNetwork):
    """The student (MoBY's online network): every view, with gradients. Image outputs (DINO: g(y); MoBY:
    pred(proj(y))) and, with the patch objective, patch outputs for every patch of every view (DINO:
    g'(out_norm(f_i)); MoBY: pred'(proj'(out_norm(f_i)))). It never runs the neighbour path (the teacher does)."""

    has_predictors = True

    def forward(self, view_groups: Sequence[torch.Tensor]) -> StudentOutput:
        """`view_groups`: groups of same-resolution views, each `(n_views, B, 3, H, W)`."""
        batch_size = view_groups[0].shape[1]
        offset = self.num_prefix_tokens
        grids, num_views, patch_tokens, representations = [], [], [], []
        for group in view_groups:
            grids.append(self.patch_grid(group))
            num_views.append(group.shape[0])
            features, normed = self.encode(group.flatten(0, 1))  # (n*B, N, D), (n*B, prefix + N, D)
            representations.append(self.image_representation(features, normed))
            patch_tokens.append(normed[:, offset:])
        image_representations = torch.cat(representations)  # (V*B, D)
        image_outputs = self.image_outputs(image_representations, batch_size)  # (V, B, K)
        patch_outputs = None
        if self.config.use_patch_objective:
            patch_outputs = self.patch_outputs(patch_tokens, num_views, batch_size)
        return StudentOutput(
            grids, num_views, patch_tokens, image_representations, image_outputs, patch_outputs
        )


class SelfPatchTeacher(SelfPatchNetwork):
    """The teacher (MoBY's target network; an EMA of the student, never trained by gradients; call it under
    `torch.no_grad()`).

    Image outputs for the views it is given and, with the patch objective, the patch targets: for every patch i,
    the k neighbours most similar to it (`select_positive_neighbors`), summarised by h (or averaged, in the
    ablation) and projected, g~'(out_norm(h~({f_j : j in top-k of N(i)}))). For MoBY + SelfPatch with negatives
    also the patch projector's outputs for its image representations (the other images' negatives)."""

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
        image_representations = torch.cat(representations)
        image_outputs = self.image_outputs(image_representations, batch_size)
        if not use_patch:
            return TeacherOutput(image_outputs, patch_targets=None, positive_indices=None)
        patch_targets = self.patch_outputs(summaries, num_views, batch_size)
        negatives = None
        if self.config.image_objective == "moby" and self.config.patch_negatives:
            negatives = [
                torch.stack([self.patch_projector(view) for view in group.split(batch_size)])  # (n, B, d)
                for group in image_representations.split([n * batch_size for n in num_views])
            ]
        return TeacherOutput(image_outputs, patch_targets, positive_indices, negatives)

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
    _no_split_modules = ["ViTEmbeddings", "ViTLayer", "SwinStage", "ClassAttentionBlock"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """Truncated-normal(0.02) Linear weights with zero biases, unit LayerNorms and BatchNorms (DINO, SelfPatch,
        MoBY and Swin init); MoBY's queues start as random unit keys."""
        std = self.config.initializer_range
        if isinstance(module, nn.Linear) and not parametrize.is_parametrized(module):
            init.trunc_normal_(module.weight, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, DINOHead):
            weight = module.last_layer.parametrizations.weight
            init.trunc_normal_(weight.original1, std=std)  # direction v
            init.ones_(weight.original0)  # magnitude g = 1
        elif isinstance(module, nn.LayerNorm | nn.BatchNorm1d):
            init.ones_(module.weight)
            init.zeros_(module.bias)
            if isinstance(module, nn.BatchNorm1d):
                init.zeros_(module.running_mean)
                init.ones_(module.running_var)
                init.zeros_(module.num_batches_tracked)
        elif isinstance(module, nn.Conv2d):
            init.trunc_normal_(module.weight, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, ViTEmbeddings):
            init.trunc_normal_(module.position_embeddings, std=std)
            init.trunc_normal_(module.cls_token, std=std)
        elif isinstance(module, SwinEmbeddings):
            if module.mask_token is not None:
                init.zeros_(module.mask_token)
        elif isinstance(getattr(module, "relative_position_bias_table", None), nn.Parameter):
            # Swin's relative position bias (its own module in recent transformers releases, part of the attention
            # in older ones: found by the attribute)
            init.trunc_normal_(module.relative_position_bias_table, std=std)  # as the reference Swin
            if hasattr(module, "_create_relative_position_index"):
                # a non-persistent buffer: recomputed here when the model is loaded
                init.copy_(module.relative_position_index, module._create_relative_position_index().view(-1))
        elif isinstance(module, SelfPatchAggregation):
            init.trunc_normal_(module.cls_token, std=std)
        elif isinstance(module, SelfPatchForPretraining):
            if module.config.image_objective == "moby":
                for queue in (module.queue1, module.queue2):
                    init.copy_(queue, F.normalize(torch.randn_like(queue), dim=0))
                init.zeros_(module.queue_ptr)
            else:
                init.zeros_(module.image_center)
                init.zeros_(module.patch_center)


class SelfPatchForPretraining(SelfPatchPreTrainedModel):
    """SelfPatch pretraining of a ViT or Swin backbone with DINO or MoBY as the image-level objective (and, with
    `patch_loss_weight=0` and a CLS / average-pool image representation, plain DINO or plain MoBY). Also available
    as `SelfPatchViTForPretraining`, its former name.

    Holds the student (`self.student`, [`SelfPatchStudent`]) and its EMA teacher (`self.teacher`,
    [`SelfPatchTeacher`]); DINO's image/patch centres (`image_center`, `patch_center`) or MoBY's key queues
    (`queue1`, `queue2` `(d, K)`, `queue_ptr`) are buffers, so a checkpoint resumes them exactly. One call computes
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
        self.student = SelfPatchStudent(config, drop_path_rate=config.drop_path_rate)
        self.teacher = SelfPatchTeacher(config)
        if config.image_objective == "moby":
            self.image_criterion = MoBYContrastiveLoss(config.moby_temperature)
            self.patch_criterion = (
                MoBYPatchLoss(config.moby_temperature, config.patch_negatives)
                if config.use_patch_objective
                else None
            )
            # MoBY's layout: one (d, K) queue of keys per view and one shared pointer
            self.register_buffer("queue1", torch.zeros(config.moby_projection_dim, config.moby_queue_size))
            self.register_buffer("queue2", torch.zeros(config.moby_projection_dim, config.moby_queue_size))
            self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))
        else:
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
        if self.config.image_objective == "dino" and self.config.norm_last_layer:
            for head in (self.student.image_head, self.student.patch_head):
                if head is not None:
                    head.last_layer.parametrizations.weight.original0.requires_grad_(False)

    def _teacher_student_pairs(self) -> tuple[list[nn.Parameter], list[torch.Tensor]]:
        """Every teacher parameter and the student parameter of the same name (the student also has MoBY's
        predictors, which the teacher lacks)."""
        student = dict(self.student.named_parameters())
        teacher_params, student_params = [], []
        for name, param in self.teacher.named_parameters():
            teacher_params.append(param)
            student_params.append(student[name].detach())
        return teacher_params, student_params

    @torch.no_grad()
    def _copy_student_to_teacher(self) -> None:
        for teacher_param, student_param in zip(*self._teacher_student_pairs(), strict=True):
            teacher_param.copy_(student_param)

    def train(self, mode: bool = True) -> SelfPatchForPretraining:
        super().train(mode)
        if self.config.image_objective == "dino":
            # the teacher has neither dropout nor drop-path, but keep it in eval mode as a rule: it only serves
            # targets. MoBY's target network stays in the model's mode: its BatchNorm normalises with batch
            # statistics in training, as in MoBY.
            self.teacher.eval()
        return self

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        """EMA step `teacher = m * teacher + (1 - m) * student` for every teacher parameter. DINO: call it after each
        optimiser step. MoBY: pass `teacher_momentum` to `forward` instead, which calls this before the keys."""
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"Teacher momentum must be in [0, 1], got {momentum}.")
        teacher_params, student_params = self._teacher_student_pairs()
        torch._foreach_lerp_(teacher_params, student_params, 1.0 - momentum)

    def get_last_layer_parameters(self) -> list[nn.Parameter]:
        """Trainable parameters of DINO's heads' last layers (frozen during the first epoch by the training loop);
        none for MoBY."""
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
        if self.config.image_objective == "moby":
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

    @torch.no_grad()
    def update_centers(self, teacher: TeacherOutput) -> None:
        """DINO: moves the centres towards this batch's teacher outputs (after the loss used them). The image centre
        averages over every view the teacher saw: all V with the patch objective (reference SelfPatch), the globals
        for plain DINO (the only views its teacher sees)."""
        momentum = self.config.center_momentum
        ema_center_update(self.image_center, [teacher.image_outputs], momentum)
        if teacher.patch_targets is not None:
            ema_center_update(self.patch_center, teacher.patch_targets, momentum)

    @torch.no_grad()
    def enqueue_keys(self, keys1: torch.Tensor, keys2: torch.Tensor) -> None:
        """MoBY: replaces the oldest keys of `queue1` / `queue2` by this step's normalised keys `(B, d)` of view 1 /
        view 2, gathered from every process in rank order, and advances `queue_ptr` (after the loss used the
        queues). Unlike MoBY, the queue size need not be a multiple of the global batch: writing wraps around."""
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

    def forward(
        self,
        global_crops: torch.Tensor | Sequence[torch.Tensor],
        local_crops: torch.Tensor | Sequence[torch.Tensor] | None = None,
        teacher_temperature: float = 0.04,
        update_centers: bool | None = None,
        return_dict: bool | None = None,
        teacher_momentum: float | None = None,
        **kwargs,
    ) -> SelfPatchPretrainingOutput | tuple:
        r"""
        global_crops (`torch.FloatTensor` of shape `(B, G, 3, H, W)`, or a list of G `(B, 3, H, W)` tensors):
            Global crops: the teacher's image-level views (MoBY: its two views). Sizes must be multiples of the patch
            size (a Swin: of its last stage's stride, `config.patch_size`).
        local_crops (`torch.FloatTensor` of shape `(B, L, 3, h, w)`, or a list of `(B, 3, h_l, w_l)`, *optional*):
            DINO's local crops, any resolution (position embeddings are interpolated), square or not. `None` for
            MoBY.
        teacher_temperature (`float`, *optional*, defaults to 0.04):
            DINO: teacher softmax temperature of this step (the warm-up schedule belongs to the training loop).
            MoBY ignores it (its temperature is `config.moby_temperature`).
        update_centers (`bool`, *optional*):
            Move DINO's centres / enqueue MoBY's keys after computing the loss. Defaults to `self.training`.
        teacher_momentum (`float`, *optional*):
            MoBY: this step's target momentum; the target network is updated with it at the start of the call,
            before the keys are computed (MoBY's order). DINO refuses it: call `update_teacher` after the step.
        """
        if kwargs:
            raise TypeError(f"Unexpected arguments: {', '.join(kwargs)}.")
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        update_state = self.training if update_centers is None else update_centers
        global_groups, local_groups = self.prepare_views(global_crops, local_crops)
        if self.config.image_objective == "moby":
            output = self._moby_step(global_groups, teacher_momentum, update_state)
        else:
            if teacher_momentum is not None:
                raise ValueError(
                    "DINO moves the teacher after the optimiser step: call model.update_teacher(momentum) then, "
                    "instead of passing teacher_momentum."
                )
            output = self._dino_step(global_groups, local_groups, teacher_temperature, update_state)
        return output if return_dict else output.to_tuple()

    def _dino_step(
        self,
        global_groups: list[torch.Tensor],
        local_groups: list[torch.Tensor],
        teacher_temperature: float,
        update_centers: bool,
    ) -> SelfPatchPretrainingOutput:
        num_global = sum(group.shape[0] for group in global_groups)
        use_patch = self.config.use_patch_objective
        # Student: every view. Views of one resolution run as one batch (view-major).
        student = self.student(global_groups + local_groups)
        # Teacher: the globals for the image targets; with the patch objective every view (patch targets per view).
        with torch.no_grad():
            teacher = self.teacher(global_groups + local_groups if use_patch else global_groups)

        image_loss = self.image_criterion(
            student.image_outputs.float(),  # (V, B, K)
            teacher.image_outputs[:num_global].float(),  # (G, B, K)
            self.image_center,
            teacher_temperature,
        )
        patch_loss = None
        loss = image_loss
        if use_patch:
            patch_loss = self.patch_criterion(
                student.patch_outputs, teacher.patch_targets, self.patch_center, teacher_temperature
            )
            loss = image_loss + self.config.patch_loss_weight * patch_loss
        if update_centers:
            self.update_centers(teacher)
        return self._pretraining_output(loss, image_loss, patch_loss, student, teacher)

    def _moby_step(
        self, views: list[torch.Tensor], teacher_momentum: float | None, update_queues: bool
    ) -> SelfPatchPretrainingOutput:
        student = self.student(views)
        if teacher_momentum is not None:
            self.update_teacher(teacher_momentum)  # before the key forward, as MoBY
        with torch.no_grad():
            teacher = self.teacher(views)
        queries = F.normalize(student.image_outputs.float(), dim=-1)  # (2, B, d)
        keys = F.normalize(teacher.image_outputs.float(), dim=-1)  # (2, B, d)
        # each view's prediction against the other view's key and the queue of that other view's keys
        image_loss = self.image_criterion(queries[0], keys[1], self.queue2) + self.image_criterion(
            queries[1], keys[0], self.queue1
        )
        patch_loss = None
        loss = image_loss
        if self.config.use_patch_objective:
            patch_loss = self.patch_criterion(
                student.patch_outputs, teacher.patch_targets, teacher.patch_negatives
            )
            loss = image_loss + self.config.patch_loss_weight * patch_loss
        if update_queues:
            self.enqueue_keys(keys[0], keys[1])
        return self._pretraining_output(loss, image_loss, patch_loss, student, teacher)

    def _pretraining_output(
        self,
        loss: torch.Tensor,
        image_loss: torch.Tensor,
        patch_loss: torch.Tensor | None,
        student: StudentOutput,
        teacher: TeacherOutput,
    ) -> SelfPatchPretrainingOutput:
        batch_size = student.image_outputs.shape[1]

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


# The former name, kept for code and checkpoints written against it.
SelfPatchViTForPretraining = SelfPatchForPretraining

AutoModelForPreTraining.register(SelfPatchConfig, SelfPatchForPretraining, exist_ok=True)

__all__ = [
    "ClassAttentionBlock",
    "DINOHead",
    "DINOImageLoss",
    "DINOPatchLoss",
    "MoBYContrastiveLoss",
    "MoBYMLP",
    "MoBYPatchLoss",
    "SelfPatchAggregation",
    "SelfPatchForPretraining",
    "SelfPatchNetwork",
    "SelfPatchPreTrainedModel",
    "SelfPatchPretrainingOutput",
    "SelfPatchStudent",
    "SelfPatchTeacher",
    "SelfPatchViTForPretraining",
    "build_neighbor_table",
    "ema_center_update",
    "gather_across_processes",
    "group_views_by_resolution",
    "select_positive_neighbors",
    "sync_batch_norm",
]

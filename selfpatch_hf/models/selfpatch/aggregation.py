"""The aggregation module h (docs/method.md section 5; the paper's Eq. 4): class attention as in CaiT.

One learnable class token refined by class-attention blocks over a set of tokens. The same weights serve two uses:
the image representation (h over all patch tokens of a view, student and teacher) and, in the teacher only, the
summary of each patch's positives (h over its k selected neighbours, for every patch at once).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from selfpatch_hf.models.selfpatch.configuration import SelfPatchConfig


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


__all__ = ["AggregationMLP", "ClassAttention", "ClassAttentionBlock", "SelfPatchAggregation"]

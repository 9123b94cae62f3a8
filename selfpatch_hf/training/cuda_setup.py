"""Defaults for training on CUDA GPUs. Every function here changes nothing on other devices (the CPU path stays
as tested).

- TF32 matmuls and convolutions for the fp32 parts (`enable_tf32`): ~8x the fp32 rate on Ampere and later, with a
  10-bit mantissa in the products, as PyTorch Lightning, timm and DINOv2's trainers use;
- fused AdamW (`adamw_kwargs`): one kernel for all parameters instead of a loop of small ones;
- DDP (`ddp_kwargs`): gradients as views of the all-reduce buckets (no second copy of every gradient), and a static
  graph when each step uses the same parameters in the same order (no gradient accumulation through `no_sync`);
- which fused scaled-dot-product-attention kernels run for the backbone's shapes (`sdpa_backends`), reported by
  `benchmarks/device_check.py`.

Pinned host memory and non-blocking copies are the data loader's defaults on CUDA
(`MultiCropDataLoader(pin_memory=None)`).
"""

from __future__ import annotations

import torch


def _is_cuda(device: torch.device | str) -> bool:
    return torch.device(device).type == "cuda"


def enable_tf32(device: torch.device | str) -> bool:
    """TF32 for fp32 matmuls and cuDNN convolutions on CUDA; returns whether it was enabled."""
    if not _is_cuda(device):
        return False
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    return True


def adamw_kwargs(device: torch.device | str) -> dict[str, bool]:
    """Extra `torch.optim.AdamW` arguments for parameters that will live on `device`."""
    return {"fused": True} if _is_cuda(device) else {}


def ddp_kwargs(device: torch.device | str, gradient_accumulation_steps: int = 1) -> dict[str, bool]:
    """`DistributedDataParallelKwargs` fields for `device`: the centres are all-reduced inside the forward and the
    model has no other buffers worth broadcasting, so buffers are never broadcast."""
    kwargs = {"broadcast_buffers": False}
    if _is_cuda(device):
        kwargs["gradient_as_bucket_view"] = True
        # accumulation runs its micro-steps under no_sync, whose skipped reductions a static graph does not expect
        kwargs["static_graph"] = gradient_accumulation_steps == 1
    return kwargs


def sdpa_backends(
    device: torch.device | str, dtype: torch.dtype, num_heads: int = 6, head_dim: int = 64, tokens: int = 197
) -> dict[str, bool]:
    """Which SDPA kernels accept the backbone's attention (batch 2, `num_heads` x `tokens` x `head_dim`) in `dtype`
    on `device`: `{"flash": ..., "efficient": ..., "cudnn": ..., "math": ...}` (each tried alone)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backends = {
        "flash": SDPBackend.FLASH_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "cudnn": SDPBackend.CUDNN_ATTENTION,
        "math": SDPBackend.MATH,
    }
    query = torch.randn(2, num_heads, tokens, head_dim, device=device, dtype=dtype, requires_grad=True)
    report = {}
    for name, backend in backends.items():
        try:
            with sdpa_kernel([backend]):
                torch.nn.functional.scaled_dot_product_attention(query, query, query).sum().backward()
            report[name] = True
        except RuntimeError:
            report[name] = False
    return report


__all__ = ["adamw_kwargs", "ddp_kwargs", "enable_tf32", "sdpa_backends"]

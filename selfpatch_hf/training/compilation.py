"""`torch.compile` for pretraining: the parts of each network that pay, compiled in place (`--torch_compile`).

What is compiled, for the student AND the teacher (each `SelfPatchNetwork`): the backbone (`ViTModel` or
`SwinModel`: patch embedding, position-embedding interpolation, encoder, output norm) and the heads the objective
built (DINO's projection heads; MoBY's projectors and predictors). These hold nearly all of a step's
multiply-accumulates. The glue between them (grouping views by resolution, positive matching, the neighbour path
of the aggregation module, losses, centres) stays eager: it is cheap, and its shapes vary between views.

Why per module and in place (`nn.Module.compile`) rather than `torch.compile(model)` / accelerate's dynamo plugin:

- parameter names do not change (no `_orig_mod.` prefix), so checkpoints, `save_pretrained`, the exported backbone
  and resuming are the same with and without compilation;
- `dynamic=False`: each crop resolution gets its own static graph (2 per backbone: 224 and 96 px in the recipe),
  compiled at the first step; later steps reuse them. Automatic dynamic shapes would instead recompile the backbone
  with symbolic sizes on the second resolution and give slower kernels;
- the teacher's modules only ever run under `no_grad`, the student's with gradients: one set of graphs each.

A Swin backbone is encoded through its `embeddings`, `encoder` and `layernorm` (`backbone.encode`), not through
`SwinModel.__call__`: compiling the `SwinModel` therefore leaves a Swin's encoding eager.

Recompilation check: `torch.compiler.set_stance("fail_on_recompile")` after the first step (see
tests/test_gpu_training.py) makes any later recompilation an error.
"""

from __future__ import annotations

import weakref

from torch import nn

# the modules `compile_for_training` compiled (nn.Module.compile keeps no public record of it)
_compiled: weakref.WeakSet[nn.Module] = weakref.WeakSet()


def compiled_modules(model: nn.Module) -> list[nn.Module]:
    """The modules `compile_for_training` compiles: each network's backbone and heads (whichever exist)."""
    modules = []
    for network in (model.student, model.teacher):
        modules.append(network.backbone)
        modules += list(network.heads().values())
    return modules


def compile_for_training(
    model: nn.Module, backend: str = "inductor", mode: str | None = None
) -> list[nn.Module]:
    """Compiles, in place, the backbones and heads of `model.student` and `model.teacher`; returns them.

    Call before `accelerator.prepare` (DDP then wraps the model whose submodules are compiled; gradients still
    reach DDP's hooks as in eager mode). `mode="max-autotune-no-cudagraphs"` tunes matmul kernels on a GPU at the
    cost of a longer first step; CUDA graphs are not used (the step has host-side control flow between modules).
    """
    modules = compiled_modules(model)
    for module in modules:
        module.compile(backend=backend, mode=mode, dynamic=False)
        _compiled.add(module)
    return modules


def is_compiled(module: nn.Module) -> bool:
    """Whether `compile_for_training` compiled `module` in place."""
    return module in _compiled


__all__ = ["compile_for_training", "compiled_modules", "is_compiled"]

"""Released reference checkpoints (SelfPatch, DINO, MoBY) converted into transformers folders.

- `checkpoints`: reading `.pth` files safely (weights only) and the strict key checks;
- `vit` / `swin`: the reference backbones' layouts -> `ViTModel` / `SiglipVisionModel` / `SwinModel`, and their
  reference forward passes;
- `dino_selfpatch` / `moby`: each family's checkpoint format, heads and pretraining checkpoint;
- `writing`: staging, the self-check against the reference forward pass and the atomic move into place, written
  once for every family; `convert`: `convert_checkpoint`, the entry point; `cli`: `selfpatch-convert`.
"""

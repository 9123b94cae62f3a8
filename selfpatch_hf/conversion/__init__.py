"""Released reference checkpoints (SelfPatch, DINO, MoBY) converted into transformers folders."""

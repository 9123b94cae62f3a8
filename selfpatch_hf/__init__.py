"""SelfPatch: patch-level self-supervised Vision Transformers for the Hugging Face ecosystem."""

__version__ = "0.1.0"

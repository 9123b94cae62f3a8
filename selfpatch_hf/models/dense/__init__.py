"""Pretrained backbones as transformers backbones (`BackboneMixin`) and the dense heads built around them."""

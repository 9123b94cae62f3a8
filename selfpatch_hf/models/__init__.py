"""The networks: `selfpatch` (the pretraining model: configuration, matching, aggregation, objectives) and `dense`
(pretrained backbones as transformers backbones for dense heads, and builders of those heads)."""

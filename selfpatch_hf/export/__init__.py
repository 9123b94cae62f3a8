"""Model folders written from trained weights: the plain backbone (`backbone`: `export_backbone`, the image processor
every export and conversion writes), and the `selfpatch export` command (`cli`)."""

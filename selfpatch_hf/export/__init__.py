"""Model folders written from trained weights: the plain backbone (`backbone`), loadable with `AutoModel`."""

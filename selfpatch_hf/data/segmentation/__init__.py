"""Semantic segmentation data: loading image + mask datasets, and the joint augmentation of image and mask."""

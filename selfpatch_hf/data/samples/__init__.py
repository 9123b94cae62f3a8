"""Offline data bundled with the package: sample photographs for pretraining, synthetic scenes for evaluation."""

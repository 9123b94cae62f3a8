"""The training scripts' options: recipe files and command lines (`recipe_files`), and each script's argument
dataclasses (`pretraining`, `segmentation`). Nothing here loads torch, so `--help` answers at once."""

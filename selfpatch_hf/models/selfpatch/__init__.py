"""The SelfPatch pretraining model: its configuration and modeling (submodules are imported on first use)."""

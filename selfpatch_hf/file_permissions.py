"""Files and folders written with the user's normal permissions.

`tempfile.mkdtemp` creates folders 0700, and `save_pretrained` writes `model.safetensors` 0600 (through a private
temporary file): an export shared with a group or served from a web folder would be unreadable to the others. After
writing into a private staging folder, `apply_default_permissions` gives the tree the modes a plain `mkdir` / `open`
would have given it under the process's umask (0755 / 0644 with the usual umask 022), just before it is moved into
place.
"""

from __future__ import annotations

import os
from pathlib import Path


def current_umask() -> int:
    """The process's umask, read without changing it where the system allows (Linux), else by setting it back."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_default_permissions(root: str | os.PathLike) -> None:
    """Sets `root` and every folder under it to `0o777 & ~umask` and every file to `0o666 & ~umask`. Links are left
    alone."""
    mask = current_umask()
    folder_mode, file_mode = 0o777 & ~mask, 0o666 & ~mask
    root = Path(root)
    os.chmod(root, folder_mode)
    for directory, folders, files in os.walk(root):
        for name in folders:
            path = os.path.join(directory, name)
            if not os.path.islink(path):
                os.chmod(path, folder_mode)
        for name in files:
            path = os.path.join(directory, name)
            if not os.path.islink(path):
                os.chmod(path, file_mode)


__all__ = ["apply_default_permissions", "current_umask"]

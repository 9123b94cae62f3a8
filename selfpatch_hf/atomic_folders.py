"""Files and folders written with the user's normal permissions.

`tempfile.mkdtemp` creates folders 0700, and `save_pretrained` writes `model.safetensors` 0600 (through a private
temporary file): an export shared with a group or served from a web folder would be unreadable to the others. After
writing into a private staging folder, `apply_default_permissions` gives the tree the modes a plain `mkdir` / `open`
would have given it under the process's umask (0755 / 0644 with the usual umask 022), just before it is moved into
place. `staged_folder` does the three steps (stage privately, set the modes, swap in atomically) for every writer
of a model folder.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
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


def replace_directory(staging: Path, target: Path) -> None:
    """Moves `staging` to `target` so that `target` is always either the old or the new complete folder."""
    if target.exists():
        retired = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, retired)
        os.replace(staging, target)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        os.replace(staging, target)


@contextlib.contextmanager
def staged_folder(target: str | os.PathLike) -> Iterator[Path]:
    """Yields a private staging folder beside `target` (whose parent must exist) to write into; when the block ends
    without error, gives the staged tree the user's normal permissions and swaps it in for `target` atomically (a
    crash mid-write leaves the previous `target` intact); on an error, removes the staging folder."""
    target = Path(target)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield staging
        apply_default_permissions(staging)  # mkdtemp's 0700 and save_pretrained's 0600 -> the user's umask
        replace_directory(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


__all__ = ["apply_default_permissions", "current_umask", "replace_directory", "staged_folder"]

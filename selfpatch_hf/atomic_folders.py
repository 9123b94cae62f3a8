"""Model folders written whole, swapped in atomically, with the user's normal permissions.

`staged_folder(target)` is how every writer of a model folder writes it: into a hidden staging folder beside the
target (`.NAME.tmp-HOST-PID-XXXX`), then, when the block ends without error, gives the tree the modes a plain
`mkdir` / `open` would have given it (`tempfile.mkdtemp` creates folders 0700 and `save_pretrained` writes
`model.safetensors` 0600, unreadable to a group or a web server) and swaps it in for the target.

The swap (`replace_directory`) leaves the old or the new complete folder under the target's name at every instant:
on Linux it exchanges the two names in one `renameat2(RENAME_EXCHANGE)` call and then deletes the old tree. Where
that call does not exist (other systems, some network file systems), the fallback is two renames (old -> hidden
`.NAME.old-HOST-PID`, staging -> target): a process killed between them leaves no folder under the target's name
for that moment, and the next writer of the folder puts the old one back first.

Nothing hidden is left for good: before it stages, a writer removes the staging and retired folders beside its
target that writers which are no longer running on this host left behind (a folder of a live process, or of another
host, is named in a warning instead).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import logging
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

logger = logging.getLogger(__name__)

_AT_FDCWD = -100
_RENAME_EXCHANGE = 1 << 1
# errors that mean "no atomic exchange here" (old kernel, a file system without it, no such libc function)
_NO_EXCHANGE_ERRNOS = (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP)


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


def _host() -> str:
    return socket.gethostname().replace("-", "_") or "localhost"


def _owner_tag() -> str:
    return f"{_host()}-{os.getpid()}"


def exchange_paths(first: Path, second: Path) -> bool:
    """Swaps the names of two existing paths in one atomic step (Linux `renameat2(RENAME_EXCHANGE)`); returns False
    where the system or the file system cannot do it (nothing was changed then)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    renameat2.restype = ctypes.c_int
    if renameat2(_AT_FDCWD, os.fsencode(first), _AT_FDCWD, os.fsencode(second), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in _NO_EXCHANGE_ERRNOS:
        return False
    raise OSError(code, f"cannot swap {first} and {second}: {os.strerror(code)}")


def replace_directory(staging: Path, target: Path) -> None:
    """Moves `staging` to `target`; `target` is the old or the new complete folder at every instant where the
    system can exchange two names atomically (see the module docstring for the fallback)."""
    staging, target = Path(staging), Path(target)
    if not target.exists():
        os.replace(staging, target)
        return
    if exchange_paths(staging, target):
        shutil.rmtree(staging, ignore_errors=True)  # the old tree, now under the staging name
        return
    retired = target.with_name(f".{target.name}.old-{_owner_tag()}")
    os.replace(target, retired)
    os.replace(staging, target)
    shutil.rmtree(retired, ignore_errors=True)


def _writer_is_gone(tag: str) -> bool | None:
    """Whether the writer a leftover's `HOST-PID` tag names has ended: True / False, None when it cannot be told
    (another host, or a name of an older version without a tag)."""
    host, _, pid = tag.rpartition("-")
    if host != _host() or not pid.isdigit():
        return None
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


def clean_leftovers(target: str | os.PathLike) -> None:
    """Removes the staging (`.NAME.tmp-...`) and retired (`.NAME.old-...`) folders beside `target` left by writers
    that no longer run; a retired folder whose swap was cut short (no `target`) is put back first."""
    target = Path(target)
    parent = target.parent
    if not parent.is_dir():
        return
    for kind in ("old", "tmp"):  # a retired folder may be the only copy: restore before anything is deleted
        for leftover in sorted(parent.glob(f".{target.name}.{kind}-*")):
            tag = leftover.name[len(f".{target.name}.{kind}-") :]
            gone = _writer_is_gone(tag.rsplit("-", 1)[0] if kind == "tmp" else tag)
            if gone is None:
                logger.warning(
                    "Leaving %s beside %s: written by another host or an older version, it may still be in use "
                    "(remove it by hand if no other run writes there).",
                    leftover.name,
                    target,
                )
            if not gone:
                continue
            if kind == "old" and not target.exists():
                os.replace(leftover, target)
                logger.warning("Restored %s from %s (a swap that was cut short).", target, leftover.name)
                continue
            shutil.rmtree(leftover, ignore_errors=True)


def private_folder_beside(target: str | os.PathLike) -> Path:
    """A new hidden folder beside `target` named as a staging folder of this process (`.NAME.tmp-HOST-PID-XXXX`),
    after removing those of writers that died: whatever a killed process left there is cleaned by the next
    writer or reader of `target` (`clean_leftovers`)."""
    target = Path(target)
    clean_leftovers(target)
    return Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-{_owner_tag()}-", dir=target.parent))


@contextlib.contextmanager
def staged_folder(target: str | os.PathLike) -> Iterator[Path]:
    """Yields a private staging folder beside `target` (whose parent must exist) to write into; when the block ends
    without error, gives the staged tree the user's normal permissions and swaps it in for `target` atomically (a
    crash mid-write leaves the previous `target` intact); on an error, removes the staging folder. Leftovers of
    earlier writers that died are cleaned first (`clean_leftovers`)."""
    target = Path(target)
    staging = private_folder_beside(target)
    try:
        yield staging
        apply_default_permissions(staging)  # mkdtemp's 0700 and save_pretrained's 0600 -> the user's umask
        replace_directory(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


__all__ = [
    "apply_default_permissions",
    "clean_leftovers",
    "current_umask",
    "exchange_paths",
    "private_folder_beside",
    "replace_directory",
    "staged_folder",
]

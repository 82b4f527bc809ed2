"""Writing files and directories so that a reader (or a resumed run) never sees half of one.

Everything is written under a temporary name beside its target, fsynced, and renamed into place; the directory
entry is fsynced too. A kill or a node crash leaves the old version or the new one, never a torn one.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Callable


def write_text(path: str | os.PathLike, text: str) -> Path:
    """`path` holds exactly `text` (UTF-8), or what it held before."""
    path = Path(path)
    tmp = path.with_name(f".tmp-{path.name}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)
    return path


def save_directory(directory: str | os.PathLike, write: Callable[[Path], object]) -> Path:
    """`write(tmp)` fills a temporary sibling of `directory`, which then replaces it."""
    directory = Path(directory)
    tmp = directory.with_name(f".tmp-{directory.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    write(tmp)
    fsync_tree(tmp)
    shutil.rmtree(directory, ignore_errors=True)
    os.replace(tmp, directory)
    fsync_dir(directory.parent)
    return directory


def fsync_tree(root: Path) -> None:
    """Make every file under `root` durable, then the directories: a rename after this publishes whole files even
    if the node crashes right after (a directory fsync alone does not flush the files' data)."""
    for directory, _, files in os.walk(root):
        for name in files:
            path = os.path.join(directory, name)
            if os.path.islink(path):
                continue
            with open(path, "rb") as f:
                os.fsync(f.fileno())
        fsync_dir(Path(directory))


def fsync_dir(path: Path) -> None:
    """Make a directory's entries (a rename, a new file) durable; a no-op where directories cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)

"""Writes that survive a power loss, not only a kill: fsync of files and directories around an atomic rename.

A rename is atomic against a crash of the process, but after a power loss the kernel may have persisted the
rename and not the data of the files renamed (ext4 and XFS both allow it): the checkpoint exists and is empty.
So a directory published by rename is made durable in three steps: fsync every file in it and the directory
itself (its entries), rename, fsync the parent (the rename itself).
"""

from __future__ import annotations

import contextlib
import os
import shutil


def fsync_path(path: str) -> None:
    """Flush ``path`` (a file or a directory) to stable storage. A read-only descriptor suffices on Linux and
    macOS; a filesystem that cannot fsync a directory (some network and FUSE ones) is let be."""
    flags = os.O_RDONLY | (os.O_DIRECTORY if os.path.isdir(path) and hasattr(os, "O_DIRECTORY") else 0)
    fd = os.open(path, flags)
    try:
        with contextlib.suppress(OSError) if os.path.isdir(path) else contextlib.nullcontext():
            os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(directory: str) -> None:
    """fsync every file under ``directory``, then each directory bottom-up (so its entries are on disk)."""
    for root, _dirs, files in os.walk(directory, topdown=False):
        for name in files:
            fsync_path(os.path.join(root, name))
        fsync_path(root)


def publish_dir(tmp: str, final: str) -> None:
    """Make the complete directory ``tmp`` durable and rename it to ``final`` (which must not exist), then make
    the rename durable."""
    fsync_tree(tmp)
    os.rename(tmp, final)
    fsync_path(os.path.dirname(os.path.abspath(final)))


def replace_dir(tmp: str, final: str) -> None:
    """Replace ``final`` by the complete directory ``tmp``, durably. The old ``final`` stays whole until the new
    one is in place: it is first renamed to ``final.old``; a run killed between the two renames leaves
    ``final.old`` and ``tmp``, which :func:`fastlora.train.rundir.clean_leftovers` puts back."""
    fsync_tree(tmp)
    old = None
    if os.path.exists(final):
        old = final + ".old"
        shutil.rmtree(old, ignore_errors=True)
        os.rename(final, old)
    os.rename(tmp, final)
    fsync_path(os.path.dirname(os.path.abspath(final)))
    if old:
        shutil.rmtree(old, ignore_errors=True)

"""Outputs that are whole or absent, and never written over an input or an earlier result by accident.

``check_output`` runs before any work: it refuses an output that is one of the command's inputs (or holds
one), and one that already holds files unless ``--overwrite`` was given. ``replaced_folder`` and
``replaced_file`` give a temporary place beside the target (same filesystem); only when everything was
written does it take the target's place, by rename, so a failure leaves the target as it was.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from contextlib import contextmanager
from typing import Iterator, Mapping, Optional

__all__ = ["check_output", "replaced_folder", "replaced_file"]


def _inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def check_output(path: str, inputs: Mapping[str, Optional[str]], overwrite: bool = False,
                 option: str = "--output", existing_ok: bool = False) -> None:
    """Refuse ``path`` when it is, or holds, one of ``inputs`` ({option: path}), always; and when it already
    holds files (a non-empty folder, an existing file), unless ``overwrite`` or ``existing_ok`` (``--resume``)."""
    out = os.path.realpath(path)
    for name, given in inputs.items():
        if given and os.path.exists(given) and _inside(os.path.realpath(given), out):  # not a hub id
            what = "is" if os.path.realpath(given) == out else "holds"
            raise ValueError(f"{option} {path} {what} the input {name} {given}: writing there would destroy it; "
                             f"choose another {option}")
    if overwrite or existing_ok or not os.path.lexists(path):
        return
    if os.path.isdir(path):
        entries = sorted(os.listdir(path))
        if entries:
            shown = ", ".join(entries[:4]) + (", ..." if len(entries) > 4 else "")
            raise ValueError(f"{option} {path} already holds {len(entries)} entries ({shown}): pass --overwrite "
                             f"to write over them, or choose a new or empty {option}")
        return
    raise ValueError(f"{option} {path} already exists: pass --overwrite to replace it, or choose another name")


def _umask_mode(mode: int) -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mode & ~mask


@contextmanager
def replaced_folder(path: str) -> Iterator[str]:
    """Yields a new empty folder beside ``path``. When the block ends normally it takes ``path``'s place
    (an older ``path`` is moved aside, then deleted); when the block raises it is deleted, ``path`` untouched."""
    path = os.path.abspath(path)
    if os.path.lexists(path) and not os.path.isdir(path):
        raise ValueError(f"{path} is a file; the output must be a folder")
    parent, name = os.path.split(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{name}.partial-", dir=parent)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    os.chmod(tmp, _umask_mode(0o777))  # mkdtemp makes it private; the result gets the usual mode
    old = os.path.join(parent, f".{name}.old-{uuid.uuid4().hex[:8]}")
    had_old = os.path.lexists(path)
    if had_old:
        os.rename(path, old)
    try:
        os.rename(tmp, path)
    except BaseException:
        if had_old:
            os.rename(old, path)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if had_old:
        shutil.rmtree(old, ignore_errors=True)


@contextmanager
def replaced_file(path: str) -> Iterator[str]:
    """Yields a temporary file name beside ``path``; what is written there replaces ``path`` in one rename
    when the block ends normally, and is deleted when it raises."""
    path = os.path.abspath(path)
    if os.path.isdir(path):
        raise ValueError(f"{path} is a folder; the output must be a file name")
    parent, name = os.path.split(path)
    os.makedirs(parent, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.partial-", dir=parent)
    os.close(fd)
    try:
        yield tmp
    except BaseException:
        if os.path.lexists(tmp):
            os.remove(tmp)
        raise
    os.chmod(tmp, _umask_mode(0o666))
    os.replace(tmp, path)

"""Readers and writers for diffraction stacks and results (no Qt, no napari import).

Writing is atomic: every writer writes to a temporary file beside the target and renames it
at the end, so a failed or interrupted run never leaves a half-written file under the final
name, nor overwrites an existing one.
"""

from __future__ import annotations

import contextlib
import os
import tempfile

import numpy as np

__all__ = ["atomic_output", "check_writable", "write_npz"]


def check_writable(path):
    """Raise ``OSError`` with one clear sentence when ``path`` cannot be written."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise OSError(f"the output folder {folder!r} does not exist")
    if os.path.isdir(path):
        raise OSError(f"the output {path!r} is a folder")
    if not os.access(folder, os.W_OK):
        raise OSError(f"the output folder {folder!r} is not writable")


@contextlib.contextmanager
def atomic_output(path):
    """Yield a temporary path beside ``path``; rename it to ``path`` only on success.

    The temporary name keeps the extension (``.name.XXXX.tmp.npz``) so that libraries that
    choose a format by extension behave; on any exception it is removed and the error re-raised.
    """
    check_writable(path)
    folder, name = os.path.split(os.path.abspath(path))
    stem, ext = os.path.splitext(name)
    fd, tmp = tempfile.mkstemp(prefix=f".{stem}.", suffix=f".tmp{ext}", dir=folder)
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def write_npz(path, arrays):
    """Write a dict of arrays to an ``.npz`` file atomically (uncompressed, fast to load)."""
    with atomic_output(path) as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, **{k: np.asarray(v) for k, v in arrays.items()})

"""Atomic outputs: build in a temporary sibling directory, rename at the end."""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from typing import Iterator


@contextlib.contextmanager
def atomic_output_dir(path: str, *, overwrite: bool = False) -> Iterator[str]:
    """Yield a temporary directory that becomes ``path`` only if the block succeeds.

    An existing ``path`` is an error unless ``overwrite``; then it is replaced
    only after the new output is complete.  On failure nothing is left behind.
    """
    path = os.path.abspath(path)
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"output '{path}' already exists; pass --overwrite to replace it")
    parent = os.path.dirname(path)
    created = []  # parent directories this call creates, removed again on failure
    d = parent
    while not os.path.exists(d):
        created.append(d)
        d = os.path.dirname(d)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.tmp-", dir=parent)
    try:
        yield tmp
        if os.path.exists(path):
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.old-", dir=parent)
            os.rename(path, os.path.join(old, "x"))
            os.rename(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for d in created:  # deepest first
            try:
                os.rmdir(d)
            except OSError:
                break
        raise

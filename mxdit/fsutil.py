"""Atomic outputs: write to a temporary sibling, rename at the end (one place for the rule
"tools never leave partial outputs").  Imports nothing from mxdit, so every layer may use it."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


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
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; outputs get the usual permissions
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


@contextlib.contextmanager
def atomic_file(path: "str | os.PathLike", suffix: str = ".tmp") -> Iterator[str]:
    """Yield a temporary path next to ``path``; it replaces ``path`` only if the block
    succeeds (and is removed otherwise).  ``suffix`` keeps an extension that writers
    such as ffmpeg look at."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"output {path} is a directory")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=str(path.parent))
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; outputs get the usual permissions
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


# ---- strict JSON (inputs) ------------------------------------------------------------------
# Python's json keeps the last of duplicate keys and accepts NaN/Infinity; a file read from
# disk gets neither.  Used by the loader (headers, indexes, config.json) and the description
# parser; ``error`` is the caller's one error type.

def parse_json_strict(raw: bytes, where: str, what: str = "JSON", *, error: type = ValueError):
    """Parse ``raw`` (UTF-8 JSON): duplicate keys, NaN/Infinity, bad UTF-8 and deep nesting
    raise ``error`` with a one-line message naming ``where``."""
    class _Dup(Exception):
        pass

    def pairs(items):
        d = {}
        for k, v in items:
            if k in d:
                raise _Dup(k)
            d[k] = v
        return d

    def constant(c):
        raise ValueError(f"non-finite number {c}")

    try:
        return json.loads(raw.decode("utf-8"), object_pairs_hook=pairs, parse_constant=constant)
    except _Dup as e:
        raise error(f"'{where}': duplicate key {e.args[0]!r} in {what}") from None
    except RecursionError:
        raise error(f"'{where}': {what} is nested too deeply") from None
    except (UnicodeDecodeError, ValueError) as e:  # JSONDecodeError is a ValueError
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise error(f"'{where}': {what} is not valid JSON ({msg})") from None


def read_json_strict(path: str, what: str = "JSON file", *, error: type = ValueError):
    """:func:`parse_json_strict` of a file; an unreadable file raises ``error`` too."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise error(f"cannot read '{path}': {e.strerror or e}") from None
    return parse_json_strict(raw, path, what, error=error)

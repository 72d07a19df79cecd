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


#: the file inside every output directory an mxdit tool wrote; ``--overwrite`` replaces only
#: directories that hold it
MARKER = ".mxdit-output.json"


class OutputError(ValueError):
    """An output path that would hurt an input, or that mxdit may not replace (bad input)."""


class OutputBusyError(OutputError, FileExistsError):
    """The output exists or another run is writing it."""


class Terminated(SystemExit):
    """SIGTERM arrived while an output was being written (exit status 143)."""

    def __init__(self):
        super().__init__(143)


def _real(p: "str | os.PathLike") -> str:
    return os.path.realpath(os.path.abspath(os.fspath(p)))


def check_output_vs_inputs(output: "str | os.PathLike", inputs: "dict[str, str | os.PathLike]", flag: str = "output") -> None:
    """Refuse an ``output`` that is (after resolving symlinks) equal to, inside, or a parent
    of any input (``{flag: path}``)."""
    out = _real(output)
    for what, inp in inputs.items():
        if inp is None:
            continue
        i = _real(inp)
        same = out == i
        if not same and os.path.exists(output) and os.path.exists(inp):
            try:
                same = os.path.samefile(output, inp)
            except OSError:
                pass
        if same or os.path.commonpath([out, i]) in (out, i):
            rel = "is" if same else ("is inside" if os.path.commonpath([out, i]) == i else "contains")
            raise OutputError(f"{flag} '{output}' {rel} {what} '{inp}' (real paths '{out}', '{i}'); choose another output")


def _pid_alive(pid) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _read_pid(path: str):
    try:
        with open(path) as f:
            return json.load(f).get("pid")
    except (OSError, ValueError, AttributeError):
        return None


@contextlib.contextmanager
def _cleanup_on_signals() -> Iterator[None]:
    """While writing: SIGTERM raises :class:`Terminated` and SIGINT ``KeyboardInterrupt`` in
    the main thread, so the caller's cleanup runs; the previous handlers are restored after."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_term(signum, frame):
        raise Terminated()

    def on_int(signum, frame):
        raise KeyboardInterrupt

    old = {signal.SIGTERM: signal.signal(signal.SIGTERM, on_term), signal.SIGINT: signal.signal(signal.SIGINT, on_int)}
    try:
        yield
    finally:
        for sig, h in old.items():
            signal.signal(sig, h if h is not None else signal.SIG_DFL)


@contextlib.contextmanager
def _lock(path: str) -> Iterator[None]:
    """An exclusive lock file ``.<name>.lock`` next to ``path`` holding our pid.  It appears
    complete (written to a private file, then hard-linked into place, which fails if it
    exists); a lock whose writer is gone is taken over (renamed away first, so two runs
    cannot both take it)."""
    lock = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.lock")
    mine = f"{lock}.{os.getpid()}.{id(path)}"
    with open(mine, "w") as f:
        json.dump({"pid": os.getpid()}, f)
    try:
        for _ in range(3):
            try:
                os.link(mine, lock)
                break
            except FileExistsError:
                pid = _read_pid(lock)
                if _pid_alive(pid):
                    raise OutputBusyError(
                        f"output '{path}' already exists or is being written (by process {pid}; lock '{lock}')") from None
                stale = f"{lock}.stale-{os.getpid()}"
                try:
                    os.rename(lock, stale)
                except FileNotFoundError:
                    continue
                if _pid_alive(_read_pid(stale)):  # another run took it over meanwhile: give it back
                    try:
                        os.link(stale, lock)
                    except OSError:
                        pass
                    os.unlink(stale)
                    raise OutputBusyError(f"output '{path}' already exists or is being written (lock '{lock}')") from None
                os.unlink(stale)
        else:
            raise OutputBusyError(f"output '{path}' already exists or is being written (lock '{lock}')")
    finally:
        os.unlink(mine)
    try:
        yield
    finally:
        try:
            os.unlink(lock)
        except OSError:
            pass


def _recover(path: str) -> None:
    """Finish what an interrupted run left next to ``path`` (called with the lock held):
    an old output moved aside but no new one in place is moved back; temp outputs and
    moved-aside outputs whose writer is gone are removed."""
    parent, name = os.path.dirname(path), os.path.basename(path)
    try:
        entries = os.listdir(parent)
    except OSError:
        return
    for e in sorted(entries):
        full = os.path.join(parent, e)
        if e.startswith(f".{name}.old-"):
            if not os.path.lexists(path) and os.path.isdir(os.path.join(full, "x")):
                os.rename(os.path.join(full, "x"), path)
            shutil.rmtree(full, ignore_errors=True)
        elif e.startswith(f".{name}.lock."):  # .NAME.lock.<pid>.<n> / .NAME.lock.stale-<pid> of a killed run
            pid = e[len(f".{name}.lock."):].split(".")[0].replace("stale-", "")
            if pid.isdigit() and not _pid_alive(int(pid)):
                try:
                    os.unlink(full)
                except OSError:
                    pass
        elif e.startswith(f".{name}.tmp-") and os.path.isdir(full) and not _pid_alive(_read_pid(os.path.join(full, MARKER))):
            shutil.rmtree(full, ignore_errors=True)


def written_by_mxdit(path: "str | os.PathLike") -> bool:
    return os.path.isdir(path) and not os.path.islink(path) and os.path.isfile(os.path.join(path, MARKER))


@contextlib.contextmanager
def atomic_output_dir(path: str, *, overwrite: bool = False, tool: str = "mxdit",
                      inputs: "dict[str, str | os.PathLike] | None" = None) -> Iterator[str]:
    """Yield a temporary directory that becomes ``path`` only if the block succeeds.

    * ``inputs`` (``{flag: path}``): an output equal to, inside or containing one of them
      (real paths) is refused (:class:`OutputError`).
    * Exclusive: a lock file next to ``path``; a concurrent run gets :class:`OutputBusyError`.
    * An existing ``path`` is an error unless ``overwrite``, and even then only a directory
      an mxdit tool wrote (it holds :data:`MARKER`) is replaced.
    * Replace: the old output is renamed aside, the new one renamed in, then the old one is
      deleted; a run killed between the renames leaves the old one aside, and the next run
      puts it back.  Temp outputs of runs whose process is gone are removed.
    * SIGTERM / SIGINT while writing remove the temp output (see :class:`Terminated`).
    """
    path = os.path.abspath(path)
    if inputs:
        check_output_vs_inputs(path, inputs)
    parent = os.path.dirname(path)
    created = []  # parent directories this call creates, removed again on failure
    d = parent
    while not os.path.exists(d):
        created.append(d)
        d = os.path.dirname(d)
    os.makedirs(parent, exist_ok=True)
    tmp = None
    try:
        with _lock(path):
            _recover(path)
            if os.path.lexists(path):
                if not overwrite:
                    raise OutputBusyError(f"output '{path}' already exists; pass --overwrite to replace it")
                if not written_by_mxdit(path):
                    raise OutputError(
                        f"output '{path}' was not written by mxdit (no {MARKER} in it); refusing to replace it with --overwrite"
                    )
            with _cleanup_on_signals():
                tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.tmp-", dir=parent)
                os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; outputs get the usual permissions
                with open(os.path.join(tmp, MARKER), "w") as f:
                    json.dump({"tool": tool, "pid": os.getpid()}, f)
                yield tmp
                with open(os.path.join(tmp, MARKER), "w") as f:
                    json.dump({"tool": tool, "complete": True}, f)
                if os.path.lexists(path):
                    old = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.old-", dir=parent)
                    os.rename(path, os.path.join(old, "x"))
                    os.rename(tmp, path)
                    tmp = None
                    shutil.rmtree(old, ignore_errors=True)
                else:
                    os.rename(tmp, path)
                    tmp = None
    except BaseException:
        if tmp is not None:
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
    succeeds (and is removed otherwise, on SIGTERM/SIGINT too).  ``suffix`` keeps an
    extension that writers such as ffmpeg look at.  Temp files of runs whose process is
    gone (their name holds the pid) are removed."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"output {path} is a directory")
    path.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{path.name}.mxdit-"
    try:
        for e in os.listdir(path.parent):
            if e.startswith(prefix):
                pid = e[len(prefix):].split(".", 1)[0]
                if pid.isdigit() and not _pid_alive(int(pid)):
                    try:
                        os.unlink(path.parent / e)
                    except OSError:
                        pass
    except OSError:
        pass
    with _cleanup_on_signals():
        fd, tmp = tempfile.mkstemp(prefix=f"{prefix}{os.getpid()}.", suffix=suffix, dir=str(path.parent))
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

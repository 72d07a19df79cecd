"""The ``mxdit`` command line.

Subcommands live in their own modules and are imported only when used, so
``mxdit --help`` is instant and a broken or missing tool never breaks the
others.  A subcommand module provides::

    def add_arguments(parser: argparse.ArgumentParser) -> None: ...
    def run(args: argparse.Namespace) -> int: ...

and may raise :class:`UsageError` from ``run`` for a bad input: ``main`` prints
it as one line, ``mxdit <command>: error: <message>``, and returns 2 (as
argparse does for its own errors).

To add a subcommand, append ``(name, module, one-line help)`` to
:data:`SUBCOMMANDS`.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import Sequence

#: (command, module, one-line help).  Imported lazily, on use.
SUBCOMMANDS: list[tuple[str, str, str]] = [
    ("generate", "mxdit.tools.generate", "generate a video with a Wan2.2 model (optionally MX-quantized)"),
    ("serve", "mxdit.tools.serve", "serve the /v1/videos API (SGLang / OpenAI style) with one loaded model"),
    ("compare-perf", "mxdit.tools.compare_perf", "compare performance JSON files (markdown report)"),
    ("demo", "mxdit.tools.demo", "offline demo: a tiny random Wan2.2 model in BF16, MXFP8 and MXFP4"),
    # ---- slots for tools owned by other modules (registered always, imported on use) ----
    ("repack", "mxdit.tools.repack", "repack a checkpoint (see mxdit.tools.repack)"),
    ("quantize", "mxdit.tools.quantize", "quantize a checkpoint offline (see mxdit.tools.quantize)"),
]

from mxdit.errors import UsageError  # noqa: F401  (main catches it; the tools import it from mxdit.errors)


def finite_float(text: str) -> float:
    """argparse ``type=`` for float options: NaN and +-Inf are refused (one-line error, exit 2)."""
    import math

    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid float value: {text!r}") from None
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return v


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line errors (``prog: error: message``, exit 2)."""

    def error(self, message: str):  # type: ignore[override]
        sys.stderr.write(f"{self.prog}: error: {message} (see --help)\n")
        raise SystemExit(2)

    def parse_known_args(self, args=None, namespace=None):  # type: ignore[override]
        # a subcommand may set ``parser.before_parse(parser, argv)`` (generate / serve: --config files
        # become defaults, SGLang flags mxdit lacks are refused with a reason) before argparse runs
        hook = getattr(self, "before_parse", None)
        if hook is not None:
            hook(self, list(sys.argv[1:] if args is None else args))
        return super().parse_known_args(args, namespace)


def _top_parser() -> ArgumentParser:
    width = max(len(n) for n, _, _ in SUBCOMMANDS)
    epilog = "commands:\n" + "\n".join(f"  {n:<{width}}  {h}" for n, _, h in SUBCOMMANDS)
    epilog += "\n\nRun 'mxdit <command> --help' for a command's options."
    p = ArgumentParser(
        prog="mxdit",
        usage="mxdit <command> [options]",
        description="Wan2.2 video diffusion with MX quantization.",
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action="store_true", help="print the mxdit version and exit")
    return p


def _quiet_optional_imports() -> None:
    """diffusers imports torchao when it is installed (a test dependency here); mxdit uses
    none of torchao's compiled kernels, so skip loading them and their import-time noise."""
    import logging

    os.environ.setdefault("TORCHAO_FORCE_SKIP_LOADING_SO_FILES", "1")
    logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)
    # diffusers 0.42.1 cannot import some torchao 0.18 classes it only needs for torchao checkpoints
    logging.getLogger("diffusers.quantizers.torchao.torchao_quantizer").setLevel(logging.ERROR)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``mxdit`` script; returns the exit status."""
    _quiet_optional_imports()
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("MXDIT_DEBUG", "") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    top = _top_parser()
    if not argv:
        top.print_help(sys.stderr)
        return 2
    if argv[0] in ("-h", "--help"):
        top.print_help()
        return 0
    if argv[0] == "--version":
        from mxdit import __version__

        print(f"mxdit {__version__}")
        return 0
    commands = {n: (m, h) for n, m, h in SUBCOMMANDS}
    name = argv[0]
    if name not in commands:
        sys.stderr.write(f"mxdit: error: unknown command {name!r} (choose from {', '.join(commands)})\n")
        return 2
    module_name, help_text = commands[name]
    prog = f"mxdit {name}"
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name and (module_name == e.name or module_name.startswith(e.name + ".")):
            sys.stderr.write(f"{prog}: error: this command is not available in this build ({module_name} is missing)\n")
            return 1
        raise
    parser = ArgumentParser(prog=prog, description=help_text)
    module.add_arguments(parser)
    try:
        args = parser.parse_args(argv[1:])
        rc = module.run(args)
    except UsageError as e:
        sys.stderr.write(f"{prog}: error: {e}\n")
        return 2
    except SystemExit as e:  # argparse (--help, errors) inside main(argv) calls
        code = e.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    except KeyboardInterrupt:
        sys.stderr.write(f"{prog}: interrupted\n")
        return 130
    except Exception as e:  # one line for everything else; MXDIT_DEBUG=1 / --debug: the traceback
        if debug:
            import traceback

            traceback.print_exc()
        sys.stderr.write(f"{prog}: error: {one_line_error(e)}\n")
        return 2 if _is_bad_input(e) else 1
    return int(rc or 0)


def one_line_error(e: BaseException) -> str:
    """``e`` as one line: what failed and why (an OSError says which path and the system's reason)."""
    import errno

    if isinstance(e, OSError) and not isinstance(e, (FileNotFoundError, FileExistsError)) and e.errno is not None:
        what = {errno.ENOSPC: "no space left on the device", errno.EROFS: "the output is on a read-only file system",
                errno.EACCES: "permission denied", errno.EDQUOT: "disk quota exceeded"}.get(e.errno, e.strerror or str(e))
        where = f" writing '{e.filename}'" if e.filename else ""
        return f"{what}{where} ({type(e).__name__}: errno {e.errno})"
    msg = "; ".join(line.strip() for line in str(e).splitlines() if line.strip()) or "(no message)"
    if isinstance(e, (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, TypeError)) and type(e).__module__.startswith("mxdit"):
        return msg
    return f"{type(e).__name__}: {msg}"


def _is_bad_input(e: BaseException) -> bool:
    """Bad input (exit 2) rather than a failure while running (exit 1)."""
    if isinstance(e, (FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError)):
        return True
    return isinstance(e, ValueError) and type(e).__module__.startswith("mxdit")


if __name__ == "__main__":  # pragma: no cover
    # `python -m mxdit.cli`: run the imported module's main, so that UsageError raised by the
    # subcommands (which import mxdit.cli) is the class main catches, not a __main__ copy
    from mxdit.cli import main as _main

    sys.exit(_main())

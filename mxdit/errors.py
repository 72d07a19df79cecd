"""Errors shared by the ``mxdit`` command line and its tools (outside the layer order: anything may import it)."""


class UsageError(Exception):
    """Bad command-line input: printed as one line, exit status 2 (``mxdit.cli.main``)."""

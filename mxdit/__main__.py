"""``python -m mxdit ...`` is the ``mxdit`` command."""
import sys

from mxdit.cli import main

sys.exit(main())

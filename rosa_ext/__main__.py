"""``python -m rosa_ext demo``: the command line of :mod:`rosa_ext.harness.cli`."""
import sys

from .harness.cli import main

sys.exit(main())

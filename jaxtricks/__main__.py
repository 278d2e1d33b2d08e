"""``python -m jaxtricks``: the same as the ``jaxtricks`` command (see :mod:`jaxtricks.cli`)."""

import sys

from jaxtricks.cli import main

if __name__ == "__main__":
    sys.exit(main())

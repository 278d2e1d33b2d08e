"""``python -m jaxtricks``: the trainer's command-line tools (see :mod:`jaxtricks.lm.cli`)."""

import sys

from jaxtricks.lm.cli import main

if __name__ == "__main__":
    sys.exit(main())

"""``python -m astral``: the command line (see :mod:`astral._cli`)."""

from __future__ import annotations

import sys

from ._cli import main

if __name__ == "__main__":
    sys.exit(main())

"""``python -m dermal_fn``: the command line (:mod:`dermal_fn.tools.cli`)."""

from __future__ import annotations

import sys

from dermal_fn.tools.cli import main

if __name__ == "__main__":
    sys.exit(main())

"""``python -m mixtral.cli``: the ``mixtral`` command."""

import sys

from . import main

if __name__ == "__main__":
    sys.exit(main())

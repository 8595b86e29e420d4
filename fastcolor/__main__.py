"""``python -m fastcolor ...``: the same command line as the ``fastcolor`` console script."""
import sys

from fastcolor.app.cli import main

if __name__ == "__main__":
    sys.exit(main())

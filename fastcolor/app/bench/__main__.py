"""``python -m fastcolor.app.bench``: the benchmark driver (see :mod:`fastcolor.app.bench`)."""
import sys

from fastcolor.app.bench import main

if __name__ == "__main__":
    sys.exit(main())

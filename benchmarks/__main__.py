"""`python -m benchmarks`: the op sweep, `python -m benchmarks.ops` (its --help lists the options)."""
import sys

from .ops.__main__ import main

if __name__ == "__main__":
    sys.exit(main())

"""``python -m gnopt.bench <suite>``: see :mod:`gnopt.bench`."""

import sys

from gnopt.bench.cli import main

sys.exit(main())

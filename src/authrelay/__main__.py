"""`python -m authrelay`: the same entry point as the `authrelay` console script."""

import sys

from authrelay.cli import main

sys.exit(main())

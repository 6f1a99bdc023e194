"""``python -m hf_ext ...`` is the ``hf-ext`` command (useful where the console script is not installed)."""

import sys

from hf_ext.cli import main

sys.exit(main())

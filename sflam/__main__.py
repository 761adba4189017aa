"""``python -m sflam`` is the ``sflam`` command."""

import sys

from sflam.cli import main

sys.exit(main())

"""``python -m moebsr`` is the ``moebsr`` command."""

import sys

from .cli import main

sys.exit(main())

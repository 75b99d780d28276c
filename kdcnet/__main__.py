"""``python -m kdcnet ...`` is the ``kdcnet`` command."""

import sys

from .cli import main

sys.exit(main())

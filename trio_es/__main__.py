"""``python -m trio_es``: the same as the ``trio-es`` command."""

import sys

from ._cli import main

sys.exit(main())

"""``python -m flannel.lab.compose`` = ``scripts/compose``."""

import sys

from flannel.lab.compose.cli import main

sys.exit(main())

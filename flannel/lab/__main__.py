"""``python -m flannel.lab`` = ``scripts/lab``."""

import sys

from flannel.lab.cli import main

sys.exit(main())

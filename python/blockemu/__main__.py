"""python -m blockemu: the command line."""

import sys

from blockemu.cli import main

sys.exit(main())

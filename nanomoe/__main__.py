"""`python -m nanomoe ...` (what torchrun launches) is the same as the `nanomoe` command."""

import sys

from .cli import main

sys.exit(main())

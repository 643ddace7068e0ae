"""`python -m nanomoe ...` (what torchrun launches) is the same as the `nanomoe` command."""

from .cli import main
from .distributed import exit_worker

exit_worker(main())

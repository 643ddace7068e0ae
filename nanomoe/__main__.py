"""`python -m nanomoe ...` (what torchrun launches) is the same as the `nanomoe` command."""

import sys

from .cli import main

code = main()
# A command that joined a process group must end through runtime.exit_worker; `nanomoe --help` and
# torch-free commands never load the runtime (nor torch), and exit normally.
runtime = sys.modules.get("nanomoe.runtime")
if runtime is not None:
    runtime.exit_worker(code)
sys.exit(code)

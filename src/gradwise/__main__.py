"""``python -m gradwise`` is the ``gradwise`` command (and what every rank of a distributed job runs)."""

import logging
import os
import sys

from gradwise.cli import main

code = main()
if int(os.environ.get("WORLD_SIZE", "1")) > 1:
    # A torch.distributed rank whose work is done and written: leave without C++ static destructors. A
    # gloo/c10d thread still joinable when they run aborts the process ("terminate called without an active
    # exception", SIGABRT) after a finished run, about 1 run in 10 on a loaded machine.
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(code)
raise SystemExit(code)

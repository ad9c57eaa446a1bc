import os
import signal
import sys

if sys.argv[1:2] == ["serve"]:
    # As PID 1 of a container the process never gets a signal it has no handler for: a SIGTERM
    # while the imports below ran was dropped (t192). Nothing has started yet: stopped at once.
    # ``serve`` puts its own handler in place first thing.
    for _stop in (signal.SIGINT, signal.SIGTERM):
        signal.signal(_stop, lambda signum, frame: os._exit(0))

from gateway.cli import main

raise SystemExit(main())

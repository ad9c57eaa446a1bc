"""``python -m gateway.simulated --name small --port 0 --ready-file /tmp/port``."""

import sys

from gateway.simulated.server import main

sys.exit(main())

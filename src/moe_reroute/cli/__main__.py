"""`python -m moe_reroute.cli`: the `moe-reroute` command."""

import sys

from . import main

sys.exit(main())

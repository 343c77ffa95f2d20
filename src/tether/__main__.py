"""`python -m tether` (and `accelerate launch -m tether`): the CLI."""

import sys

from tether.cli import main

sys.exit(main())

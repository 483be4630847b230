"""`python -m adapterhub_lite.cli …` (what torchrun and accelerate launch run)."""

import sys

from adapterhub_lite.cli.main import main

sys.exit(main())

"""python -m fastmask ... (same as the `fastmask` command)."""
import sys

from .cli import main

sys.exit(main())

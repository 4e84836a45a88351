"""`python -m bench.serving ...` (from the repository root) runs the serving benchmark."""

import sys

from .run import main

sys.exit(main())

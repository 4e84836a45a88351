import sys

from pagegen.cli import main

sys.exit(main())

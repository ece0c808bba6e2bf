"""`python -m magmax …` is the `magmax` command."""

import sys

from magmax.cli import main

sys.exit(main())

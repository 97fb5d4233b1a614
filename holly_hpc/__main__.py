"""`python -m holly_hpc` is `holly-hpc`."""

import sys

from .cli import main

sys.exit(main())
